"""Train a role-named LoRA adapter from a recipe with TRL (``SFTTrainer``/``DPOTrainer``).

Runs unchanged under ``accelerate launch`` (see ``accelerate_configs/``). The adapter is
written to ``<output_dir>/<name>/`` (PEFT files plus ``vsteer.json``) only when training has
finished: checkpoints go to ``<output_dir>/.<name>.partial/`` (kept across runs, for
``resume=True``), the final adapter to a temporary directory beside it that replaces the old
one in one rename.

``training.batch_size`` is the *global* batch (examples per optimizer step): the per-device
batch is ``batch_size / (processes * grad_accum)``, so the same recipe means the same
optimisation on 1 or 2 processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vsteer.errors import DataError, RecipeError, VsteerError
from vsteer.recipes import Recipe, RecipeData, load_recipe, load_recipe_data, read_jsonl  # noqa: F401

ADAPTER_META = "vsteer.json"
_BEFORE = "vsteer_before.json"


@dataclass
class TrainResult:
    """What a training run produced.

    ``metrics``: ``train_loss``, ``eval_loss_before``/``eval_loss_after`` (SFT, completion
    tokens of the held-out split), ``preference_accuracy_before``/``_after`` (DPO: share of
    held-out pairs with ``log p(chosen) > log p(rejected)``), ``train_runtime`` (s), ``steps``.
    """

    name: str
    adapter_dir: Path
    metrics: dict
    adapter: dict
    meta: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "adapter_dir": str(self.adapter_dir), "metrics": self.metrics, **self.meta}


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _trainer_config(recipe: Recipe, output_dir: Path, eval_only: bool = False):
    t = recipe.section("training")
    world = _world_size()
    per_device, rest = divmod(t["batch_size"], world * t["grad_accum"])
    if rest or per_device == 0:
        raise RecipeError(
            f"training.batch_size={t['batch_size']} (global) must be a multiple of processes x grad_accum "
            f"= {world} x {t['grad_accum']}"
        )
    common = dict(
        output_dir=str(output_dir),
        max_steps=t["max_steps"],
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=t["eval_batch_size"],
        gradient_accumulation_steps=t["grad_accum"],
        learning_rate=t["learning_rate"],
        weight_decay=t["weight_decay"],
        lr_scheduler_type=t["lr_scheduler"],
        warmup_steps=t["warmup_steps"],
        max_grad_norm=t["max_grad_norm"],
        max_length=t["max_length"],
        logging_steps=t["logging_steps"],
        save_strategy="no" if eval_only else "steps",
        save_steps=t["save_steps"],
        save_total_limit=1,
        eval_strategy="no",
        seed=recipe["seed"],
        data_seed=recipe["seed"],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        ddp_find_unused_parameters=False,
        # without it, processes started by torchrun on a machine with no GPU never join one DDP
        # group (accelerate only builds its MULTI_CPU/gloo state when told it is on the CPU)
        use_cpu=not torch.cuda.is_available(),
    )
    if recipe.method == "sft":
        from trl import SFTConfig

        return SFTConfig(**common)
    from trl import DPOConfig

    return DPOConfig(beta=t["beta"], **common)


def masked_rows_callback():
    """A ``TrainerCallback`` that checks, after every optimizer step, that the masked fused rows of
    ``lora_B`` are still exactly zero (:func:`vsteer.lora.check_masked_rows`)."""
    from transformers import TrainerCallback

    from vsteer.lora import check_masked_rows

    class MaskedRowsCallback(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if model is not None:
                check_masked_rows(model)

    return MaskedRowsCallback()


def _set_threads(recipe: Recipe) -> int:
    """Intra-op threads: ``training.num_threads``, else one per core for each process. Never chosen
    from the machine's load, so a recipe gives the same numbers however busy the machine is
    (on a loaded machine, set ``training.num_threads=1``: it can be much faster there)."""
    n = recipe["training.num_threads"]
    if n is None and _world_size() > 1 and "OMP_NUM_THREADS" not in os.environ:
        n = max(1, (os.cpu_count() or 1) // _world_size())
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _make_trainer(
    recipe: Recipe, model, tokenizer, data: RecipeData, output_dir: Path, eval_only=False, callbacks=()
):
    from datasets import Dataset

    args = _trainer_config(recipe, output_dir, eval_only)
    train_ds = Dataset.from_list(data.train)
    eval_ds = Dataset.from_list(data.eval) if data.eval else None
    callbacks = [] if eval_only else [masked_rows_callback(), *callbacks]
    if recipe.method == "sft":
        from trl import SFTTrainer

        return SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    from trl import DPOTrainer

    return DPOTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def _last_checkpoint(partial: Path) -> Path | None:
    if not partial.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(partial))
    return Path(last) if last else None


def train_from_recipe(
    recipe: str | os.PathLike | Mapping | Recipe,
    overrides: Iterable[str] | Mapping = (),
    *,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool = False,
    model=None,
    tokenizer=None,
    callbacks: Iterable = (),
) -> TrainResult:
    """Train the adapter a recipe describes and write it to ``<output_dir>/<name>/``.

    ``overrides``: ``["training.max_steps=10", "adapter.targets=o"]`` or a dict of dotted keys.
    ``output_dir`` overrides the recipe's ``output_dir``. An existing adapter directory is an
    error unless ``overwrite`` (the old one stays until the new one is complete). ``resume``
    continues from the last checkpoint in ``<output_dir>/.<name>.partial/``. ``model`` and
    ``tokenizer``: an already loaded base model (plain, no adapter) instead of ``recipe.model``.
    ``callbacks``: extra ``transformers.TrainerCallback`` objects.
    """
    recipe = load_recipe(recipe, overrides)
    root = Path(output_dir if output_dir is not None else recipe["output_dir"])
    final, partial = root / recipe.name, root / f".{recipe.name}.partial"
    if final.exists() and not overwrite:
        raise VsteerError(
            f"adapter directory {str(final)!r} exists; pass overwrite=True (--overwrite) to replace it"
        )
    checkpoint = _last_checkpoint(partial) if resume else None
    if resume and checkpoint is None:
        raise VsteerError(f"nothing to resume: no checkpoint in {str(partial)!r}")
    data = load_recipe_data(recipe)
    previous_threads = torch.get_num_threads()
    try:
        return _train(recipe, data, root, final, partial, checkpoint, model, tokenizer, callbacks)
    finally:
        torch.set_num_threads(previous_threads)


def _train(recipe, data, root, final, partial, checkpoint, model, tokenizer, callbacks) -> TrainResult:
    from vsteer.lora import add_adapter, check_masked_rows, count_parameters

    threads = _set_threads(recipe)
    if _is_main() and checkpoint is None and partial.exists():
        shutil.rmtree(partial)

    from transformers import set_seed

    set_seed(recipe["seed"])
    if model is None:
        from vsteer.models import load_model

        model, tokenizer = load_model(recipe["model"])
    elif tokenizer is None:
        raise VsteerError("pass the tokenizer together with the model")
    a = recipe.section("adapter")
    peft_model = add_adapter(
        model,
        a["targets"],
        a["r"],
        layers=a["layers"],
        budget=a["budget"],
        match=a["match"],
        lora_alpha_per_rank=a["alpha_per_rank"],
        dropout=a["dropout"],
    )
    plan = peft_model.vsteer_plan
    counts = count_parameters(peft_model)
    trainer = _make_trainer(recipe, peft_model, tokenizer, data, partial, callbacks=callbacks)

    before = _load_json(partial / _BEFORE) if checkpoint is not None else None
    if before is None:
        before = (
            _evaluate(trainer, recipe, peft_model, tokenizer, data) if recipe["training.eval_before"] else {}
        )
        if _is_main():
            partial.mkdir(parents=True, exist_ok=True)
            (partial / _BEFORE).write_text(json.dumps(before))
    start = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    runtime = time.perf_counter() - start
    after = _evaluate(trainer, recipe, peft_model, tokenizer, data)
    check_masked_rows(peft_model)

    metrics = {
        "train_loss": float(out.training_loss),
        "steps": int(trainer.state.global_step),
        "train_runtime": round(runtime, 3),
        "processes": _world_size(),
        "threads": threads,
        **{f"{k}_before": v for k, v in before.items()},
        **{f"{k}_after": v for k, v in after.items()},
    }
    adapter = {
        **plan.to_dict(),
        "trainable_params_measured": counts["trainable"],
        "effective_params_measured": counts["effective"],
    }
    meta = _metadata(recipe, peft_model, adapter, data, metrics)
    trainer.accelerator.wait_for_everyone()
    if _is_main():
        _publish(trainer.accelerator.unwrap_model(trainer.model), meta, final, root)
        shutil.rmtree(partial, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(recipe.name, final, metrics, adapter, meta)


def _metadata(recipe: Recipe, peft_model, adapter: dict, data: RecipeData, metrics: dict) -> dict:
    import peft
    import transformers
    import trl

    import vsteer

    base = peft_model.get_base_model()
    fingerprint = None
    with contextlib.suppress(ImportError):
        from vsteer.models import config_fingerprint

        fingerprint = config_fingerprint(base.config)
    return {
        "format": "vsteer-adapter/1",
        "recipe": recipe.to_dict(),
        "base_model": {
            "name": getattr(base, "vsteer_model_name", recipe["model"]),
            "config_fingerprint": fingerprint,
            "model_type": base.config.model_type,
        },
        "adapter": adapter,
        "data": data.files,
        "seed": recipe["seed"],
        "method": recipe.method,
        "metrics": metrics,
        "versions": {
            "vsteer": vsteer.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "trl": trl.__version__,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _publish(peft_model, meta: dict, final: Path, root: Path) -> None:
    """Write adapter + ``vsteer.json`` into a temp dir beside ``final``, then swap it in."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        peft_model.save_pretrained(str(tmp), selected_adapters=["default"])
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str))
        old = None
        if final.exists():
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def _evaluate(trainer, recipe: Recipe, model, tokenizer, data: RecipeData) -> dict:
    if not data.eval:
        return {}
    if recipe.method == "sft":
        return {"eval_loss": float(trainer.evaluate()["eval_loss"])}
    t = recipe.section("training")
    return preference_accuracy(model, tokenizer, data.eval, t["max_length"], t["eval_batch_size"])


def evaluate_sft_loss(model, tokenizer, recipe, overrides=()) -> float:
    """Completion-token loss of ``model`` (with or without an adapter) on a recipe's eval split,
    computed exactly as during training (TRL's tokenisation and collation)."""
    recipe = load_recipe(recipe, overrides)
    if recipe.method != "sft":
        raise RecipeError(f"evaluate_sft_loss needs an sft recipe, got method={recipe.method!r}")
    data = load_recipe_data(recipe)
    if not data.eval:
        raise DataError("the recipe has no eval rows (data.eval or data.eval_size)")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = _make_trainer(recipe, model, tokenizer, data, Path(tmp), eval_only=True)
        return float(trainer.evaluate()["eval_loss"])


@torch.no_grad()
def preference_accuracy(
    model, tokenizer, pairs: list[dict], max_length: int = 128, batch_size: int = 16
) -> dict:
    """Share of pairs where the model gives the chosen completion a higher summed log-probability
    than the rejected one, and the mean margin (nats). Conversational rows use the chat template."""
    from trl.data_utils import maybe_apply_chat_template

    was_training = model.training
    model.eval()
    texts = []
    for row in pairs:
        ex = maybe_apply_chat_template(
            {k: row[k] for k in ("prompt", "chosen", "rejected") if k in row}, tokenizer
        )
        prompt = ex.get("prompt", "")
        texts.append((prompt, ex["chosen"], ex["rejected"]))
    chosen = _completion_logps(model, tokenizer, [(p, c) for p, c, _ in texts], max_length, batch_size)
    rejected = _completion_logps(model, tokenizer, [(p, r) for p, _, r in texts], max_length, batch_size)
    model.train(was_training)
    margin = chosen - rejected
    return {
        "preference_accuracy": float((margin > 0).float().mean()),
        "preference_margin": float(margin.mean()),
    }


def _completion_logps(model, tokenizer, items, max_length: int, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, len(items), batch_size):
        seqs, starts = [], []
        for prompt, completion in items[i : i + batch_size]:
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
            c = tokenizer(completion, add_special_tokens=False)["input_ids"]
            p = p[-max(max_length - len(c), 1) :]  # cut long prompts from the left: keep the completion
            ids = (p + c)[-max_length:]
            seqs.append(ids)
            starts.append(max(len(ids) - len(c), 0))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):  # right padding: positions stay 0..n-1 for every row
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        keep = torch.zeros_like(logp, dtype=torch.bool)
        for j, (s, start) in enumerate(zip(seqs, starts)):
            keep[j, max(start - 1, 0) : len(s) - 1] = True
        out.append((logp * keep).sum(-1).cpu())
    return torch.cat(out)
