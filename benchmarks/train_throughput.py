"""Training throughput: vsteer (role targets, masks, checks, recipe) vs plain PEFT + TRL.

Both arms train the same LoRA (same target modules, rank, alpha, init seed) with the same TRL
config (vsteer's ``_trainer_config`` of one recipe, so precision, batch and length are equal) on
the same rows of the shipped IMDB SFT data. Design, so that a 3% difference is resolved on a
shared, noisy machine:

* **paired blocks**: ``--blocks`` pairs of training runs, the order alternating (plain, vsteer,
  vsteer, plain, ...), each ``--steps`` steps; the first step of every run is dropped (warm-up);
* **CPU time per step** (``time.process_time`` of this one-thread process, not wall time), which
  other processes on the machine barely move; a wall-time ratio is printed too;
* the headline is the median over pairs of ``step time plain / step time vsteer`` with a 95%
  bootstrap interval over pairs; its half-width is the resolution.

Measured on the embedded model (a non-fused layout: vsteer adds only the trainer callbacks) and on
a **fused** family (a GPT-2 built from a config, v-only on ``c_attn``: vsteer's gradient mask hook
and the per-step zero check are the cost; plain PEFT trains the whole fused projection). A
precision line compares the vsteer recipe in fp32 and bf16 (step time and loss after the same
steps from the same init).

    python benchmarks/train_throughput.py [--blocks 8] [--steps 10] [--no-fused]

Last line: ``train_throughput: <vsteer steps/s / plain steps/s> (target >= 0.97)`` (embedded model).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _recipe(args, precision: str) -> dict:
    return {
        "name": "bench",
        "model": args.model,
        "data": {
            "train": "train/imdb_positive_sft.jsonl.gz",
            "eval": None,
            "eval_size": 0,
            "n_train": args.steps * args.batch,
        },
        "adapter": {"targets": args.targets, "r": args.rank},
        "training": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "max_length": args.max_length,
            "logging_steps": 10**6,
            "save_steps": 10**6,
            "eval_before": False,
            "precision": precision,
            "num_threads": args.threads,
        },
    }


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.cpu, self.wall = [], []

        def on_step_begin(self, args, state, control, **kw):
            self._c, self._w = time.process_time(), time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.cpu.append(time.process_time() - self._c)
            self.wall.append(time.perf_counter() - self._w)

    return StepTimer()


def _train(trainer, timer) -> dict:
    out = trainer.train()
    return {
        "cpu": statistics.median(timer.cpu[1:]),  # first step warms caches up
        "wall": statistics.median(timer.wall[1:]),
        "loss": float(out.training_loss),
    }


def run_vsteer(recipe, base_state, model, tokenizer, out: Path) -> dict:
    from vsteer.lora import add_adapter
    from vsteer.recipes import load_recipe
    from vsteer.train import _make_trainer, load_recipe_data

    r = load_recipe(recipe)
    model.load_state_dict(base_state)
    torch.manual_seed(0)
    peft_model = add_adapter(model, r["adapter.targets"], r["adapter.r"])
    timer = _step_timer()
    trainer = _make_trainer(r, peft_model, tokenizer, load_recipe_data(r), out, callbacks=[timer])
    result = _train(trainer, timer)
    peft_model.unload()
    return result


def run_plain(recipe, base_state, model, tokenizer, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTTrainer

    from vsteer.lora import plan_adapter
    from vsteer.recipes import load_recipe
    from vsteer.train import _trainer_config, load_recipe_data

    r = load_recipe(recipe)
    model.load_state_dict(base_state)
    names = [m.name for m in plan_adapter(model, r["adapter.targets"], r["adapter.r"]).modules]
    fused = getattr(model.config, "model_type", "") == "gpt2"
    config = LoraConfig(
        r=r["adapter.r"],
        lora_alpha=2 * r["adapter.r"],
        target_modules=names,
        task_type="CAUSAL_LM",
        fan_in_fan_out=fused,
    )
    torch.manual_seed(0)
    timer = _step_timer()
    trainer = SFTTrainer(
        model=model,
        args=_trainer_config(r, out),
        train_dataset=Dataset.from_list(load_recipe_data(r).train),
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[timer],
    )
    result = _train(trainer, timer)
    trainer.model.unload()
    return result


def _bootstrap_median(x: list[float], seed: int = 0) -> tuple[float, float, float]:
    a = np.asarray(x)
    rng = np.random.default_rng(seed)
    meds = np.median(a[rng.integers(0, len(a), (4000, len(a)))], axis=1)
    return float(np.median(a)), float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))


def paired(args, model, tokenizer, label: str) -> float:
    """Interleaved plain/vsteer blocks on ``model``; prints the table line, returns the median ratio."""
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = _recipe(args, args.precision)
    if label != "embedded":
        recipe["model"] = "unused"  # the model object is passed in
    ratios, wall_ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for block in range(args.blocks + 1):  # block 0 warms up and is not counted
            order = (("plain", run_plain), ("vsteer", run_vsteer))
            res = {}
            for arm, fn in order if block % 2 == 0 else order[::-1]:
                res[arm] = fn(recipe, base_state, model, tokenizer, Path(tmp) / f"{label}-{arm}{block}")
            if block:
                ratios.append(res["plain"]["cpu"] / res["vsteer"]["cpu"])
                wall_ratios.append(res["plain"]["wall"] / res["vsteer"]["wall"])
            print(
                f"{label} block {block}: plain {res['plain']['cpu'] * 1e3:.0f} ms/step, vsteer {res['vsteer']['cpu'] * 1e3:.0f} "
                f"ms/step (CPU time); loss plain {res['plain']['loss']:.4f} vsteer {res['vsteer']['loss']:.4f}",
                flush=True,
            )
    med, lo, hi = _bootstrap_median(ratios)
    wmed = statistics.median(wall_ratios)
    print(
        f"{label} ({type(model).__name__}, targets {args.targets}): vsteer/plain throughput {med:.3f} "
        f"[{lo:.3f}, {hi:.3f}] over {len(ratios)} paired blocks of {args.steps} steps (CPU time; wall {wmed:.3f})"
    )
    return med


def precision_line(args, model, tokenizer) -> None:
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    res = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        for block in range(args.precision_blocks):
            for prec in ("fp32", "bf16") if block % 2 == 0 else ("bf16", "fp32"):
                r = run_vsteer(
                    _recipe(args, prec), base_state, model, tokenizer, Path(tmp) / f"p{prec}{block}"
                )
                res[prec].append(r)
    speed = _bootstrap_median([f["cpu"] / b["cpu"] for f, b in zip(res["fp32"], res["bf16"])])
    loss = {p: res[p][0]["loss"] for p in res}
    print(
        f"precision: bf16/fp32 training throughput {speed[0]:.2f} [{speed[1]:.2f}, {speed[2]:.2f}] "
        f"(vsteer recipe, {args.steps} steps x batch {args.batch}, {torch.get_num_threads()} thread(s)); "
        f"train loss after {args.steps} steps fp32 {loss['fp32']:.4f} vs bf16 {loss['bf16']:.4f}"
    )


def _fused_model(tokenizer):
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=384,
        n_layer=6,
        n_head=6,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--targets", default="v")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="steps per training run (the first is dropped)")
    p.add_argument("--blocks", type=int, default=8, help="paired plain/vsteer blocks")
    p.add_argument("--precision-blocks", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-fused", action="store_true", help="skip the fused (GPT-2 layout) family")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from vsteer.models import load_model

    model, tokenizer = load_model(args.model)
    print(
        f"{args.steps} steps x batch {args.batch} x <= {args.max_length} tokens, precision {args.precision}, {args.threads} thread(s)"
    )
    if not args.no_fused:
        paired(args, _fused_model(tokenizer), tokenizer, "fused")
    precision_line(args, model, tokenizer)
    ratio = paired(args, model, tokenizer, "embedded")
    print(f"train_throughput: {ratio:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
