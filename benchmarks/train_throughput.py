"""Training throughput: vsteer (role targets, masks, checks, recipe) vs plain PEFT + TRL.

Both arms train the same LoRA (same target modules, rank, alpha, init seed) with the same
``SFTConfig`` on the same rows of the shipped IMDB SFT data, on the embedded model. Runs are
interleaved (plain, vsteer, plain, vsteer, ...) in one process and repeated; we report medians
of training steps per second and of the peak resident-memory increase during ``train()``.

    python benchmarks/train_throughput.py [--model NAME] [--targets v] [--steps 4] [--repeats 3]

Last line: ``train_throughput: <vsteer steps/s / plain steps/s> (target >= 0.97)``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch


class PeakRSS:
    """Peak resident memory (bytes) above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        self.proc = psutil.Process(os.getpid())
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def increase(self) -> int:
        return self.peak - self.base


def _recipe(args) -> dict:
    return {
        "name": "bench",
        "model": args.model,
        "data": {
            "train": "train/imdb_positive_sft.jsonl.gz",
            "eval": "train/imdb_positive_sft_eval.jsonl.gz",
            "n_train": args.steps * args.batch,
            "n_eval": 8,
        },
        "adapter": {"targets": args.targets, "r": args.rank},
        "training": {
            "max_steps": args.steps,
            "batch_size": args.batch,
            "max_length": args.max_length,
            "logging_steps": 1000,
            "save_steps": 1000,
            "eval_before": False,
        },
    }


def _timed_train(trainer) -> tuple[float, int]:
    gc.collect()
    with PeakRSS() as mem:
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
    return trainer.state.global_step / elapsed, mem.increase


def run_vsteer(recipe, base_state, model, tokenizer, out: Path):
    from vsteer.lora import add_adapter
    from vsteer.recipes import load_recipe
    from vsteer.train import _make_trainer, load_recipe_data

    r = load_recipe(recipe)
    model.load_state_dict(base_state)
    torch.manual_seed(0)
    peft_model = add_adapter(model, r["adapter.targets"], r["adapter.r"])
    trainer = _make_trainer(r, peft_model, tokenizer, load_recipe_data(r), out)
    result = _timed_train(trainer)
    return result, peft_model.unload()


def run_plain(recipe, base_state, model, tokenizer, out: Path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTTrainer

    from vsteer.lora import plan_adapter
    from vsteer.recipes import load_recipe
    from vsteer.train import _trainer_config, load_recipe_data

    r = load_recipe(recipe)
    model.load_state_dict(base_state)
    names = [m.name for m in plan_adapter(model, r["adapter.targets"], r["adapter.r"]).modules]
    config = LoraConfig(
        r=r["adapter.r"], lora_alpha=2 * r["adapter.r"], target_modules=names, task_type="CAUSAL_LM"
    )
    data = load_recipe_data(r)
    torch.manual_seed(0)
    trainer = SFTTrainer(
        model=model,
        args=_trainer_config(r, out),
        train_dataset=Dataset.from_list(data.train),
        processing_class=tokenizer,
        peft_config=config,
    )
    result = _timed_train(trainer)
    return result, trainer.model.unload()


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--targets", default="v")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vsteer.models import load_model

    model, tokenizer = load_model(args.model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = _recipe(args)
    speeds = {"plain": [], "vsteer": []}
    mems = {"plain": [], "vsteer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats + 1):  # the first round warms up and is not counted
            for arm, fn in (
                (("plain", run_plain), ("vsteer", run_vsteer))
                if rep % 2
                else (
                    ("vsteer", run_vsteer),
                    ("plain", run_plain),
                )
            ):
                (speed, mem), model = fn(recipe, base_state, model, tokenizer, Path(tmp) / f"{arm}{rep}")
                if rep:
                    speeds[arm].append(speed)
                    mems[arm].append(mem)
                print(
                    f"round {rep} {arm:6s}: {speed:.3f} steps/s, peak RSS +{mem / 2**20:.0f} MiB", flush=True
                )
    med = {a: statistics.median(v) for a, v in speeds.items()}
    mem_med = {a: statistics.median(v) for a, v in mems.items()}
    print(
        f"model {args.model}, targets {args.targets}, r {args.rank}, {args.steps} steps x batch {args.batch} "
        f"x <= {args.max_length} tokens, {args.repeats} interleaved repeats, {torch.get_num_threads()} threads"
    )
    print(f"median steps/s: plain PEFT+TRL {med['plain']:.3f}, vsteer {med['vsteer']:.3f}")
    ratio_mem = mem_med["vsteer"] / mem_med["plain"] if mem_med["plain"] > 0 else float("nan")
    print(
        f"peak memory ratio (vsteer / plain, RSS increase during train): {ratio_mem:.3f} "
        f"({mem_med['vsteer'] / 2**20:.0f} / {mem_med['plain'] / 2**20:.0f} MiB)"
    )
    print(f"train_throughput: {med['vsteer'] / med['plain']:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
