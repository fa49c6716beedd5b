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
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from vsteer.errors import DataError, RecipeError, VsteerError
from vsteer.files import atomic_write
from vsteer.recipes import Recipe, RecipeData, load_recipe, load_recipe_data, read_jsonl  # noqa: F401

ADAPTER_META = "vsteer.json"
_log = logging.getLogger("vsteer.train")
_BEFORE = "vsteer_before.json"
_RECIPE = "vsteer_recipe.json"  # the recipe a partial run's checkpoints come from
# recipe keys a resumed run may change: where it writes, how often it logs or saves, how far it goes
_RESUMABLE = {"output_dir", "training.logging_steps", "training.save_steps", "training.max_steps"}


def _resumable_view(recipe) -> dict:
    return {k: v for k, v in recipe.values.items() if k not in _RESUMABLE}


def _check_resume(recipe, partial: Path) -> None:
    """Refuse to resume checkpoints written under another recipe: the Trainer would restore the
    old optimizer and schedule (a changed learning rate silently unused) or fail on a changed rank,
    while ``vsteer.json`` recorded the new recipe."""
    path = partial / _RECIPE
    if not path.is_file():
        return  # checkpoints from before this check: nothing to compare with
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(_resumable_view(recipe), default=str))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise VsteerError(
            f"cannot resume {str(partial)!r}: its checkpoints come from another recipe ({shown}{more}); "
            "resume with the same recipe, or start over without resume"
        )


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
def _run_metrics(out, trainer, runtime: float, threads, recipe, before: dict, after: dict) -> dict:
    """What a training run records in ``metrics.json``: loss, steps, time, processes, precision,
    and the evaluation before and after."""
    return {
        "train_loss": float(out.training_loss),
        "steps": int(trainer.state.global_step),
        "train_runtime": round(runtime, 3),
        "processes": _world_size(),
        "threads": threads,
        "precision": recipe["training.precision"],
        "mixed_precision": trainer.accelerator.mixed_precision,
        **{f"{k}_before": v for k, v in before.items()},
        **{f"{k}_after": v for k, v in after.items()},
    }


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _on_cpu(recipe: Recipe) -> bool:
    """Recipe key ``device``: ``auto`` trains on CUDA when available; which GPU is the launcher's choice."""
    from vsteer.models import resolve_device

    return resolve_device(recipe["device"]).type == "cpu"


# training.precision -> accelerate's mixed_precision
_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def training_arguments(
    recipe, output_dir, eval_only: bool = False, verbose: bool = False, log_precision: bool = True
):
    """The ``trl.SFTConfig``/``trl.DPOConfig`` a recipe trains with (TRL validates every value).

    The recipe's ``training`` keys map onto TRL's fields (``batch_size`` is the global batch:
    ``per_device_train_batch_size = batch_size / (processes x grad_accum)``); keys that are TRL
    fields themselves pass through unchanged. ``training.precision`` decides mixed precision on
    every launcher: a launcher's ``mixed_precision`` (``ACCELERATE_MIXED_PRECISION``) that differs
    is overridden, with a log line. ``verbose``: TRL's own progress bar and per-step log lines.
    """
    from vsteer.recipes import SCHEMA, trl_config_class

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    t = recipe.section("training")
    world = _world_size()
    per_device, rest = divmod(t["batch_size"], world * t["grad_accum"])
    if rest or per_device == 0:
        raise RecipeError(
            f"training.batch_size={t['batch_size']} (global) must be a multiple of processes x grad_accum "
            f"= {world} x {t['grad_accum']}"
        )
    precision, on_cpu = t["precision"], _on_cpu(recipe)
    if precision == "fp16" and on_cpu:
        raise RecipeError(
            "training.precision=fp16 needs a GPU (accelerate does not autocast to fp16 on the CPU); "
            "use bf16 or fp32 there"
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
        # on the CPU bf16 means torch.autocast("cpu", bfloat16) around forward (accelerate native amp)
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        optim=t["optim"],
        gradient_checkpointing=t["gradient_checkpointing"],
        # non-reentrant: the frozen base gives the checkpointed blocks no input that needs a grad
        gradient_checkpointing_kwargs={"use_reentrant": False} if t["gradient_checkpointing"] else None,
        report_to="none",
        disable_tqdm=not verbose,
        log_level="passive",  # train_from_recipe sets the library log levels (and restores them)
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        ddp_find_unused_parameters=False,
        # without it, processes started by torchrun on a machine with no GPU never join one DDP
        # group (accelerate only builds its MULTI_CPU/gloo state when told it is on the CPU)
        use_cpu=on_cpu,
    )
    if recipe.method == "dpo":
        common["beta"] = t["beta"]
    common.update({k: v for k, v in t.items() if f"training.{k}" not in SCHEMA})  # TRL's own fields
    cls = trl_config_class(recipe.method)
    try:
        args = cls(**common)
    except (ValueError, TypeError, KeyError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(f"recipe training section rejected by trl.{cls.__name__}: {text}") from None
    wanted = _MIXED_PRECISION[precision]
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if log_precision and launcher is not None and launcher != wanted:
        level = logging.WARNING if launcher != "no" else logging.INFO
        _log.log(
            level,
            "training.precision=%s: using mixed_precision=%r, not the launcher's %r",
            precision,
            wanted,
            launcher,
        )
    args.mixed_precision = wanted  # what the Trainer hands to Accelerator(mixed_precision=...)
    return args


def _trainer_config(recipe: Recipe, output_dir: Path, eval_only: bool = False, verbose: bool = False):
    return training_arguments(recipe, output_dir, eval_only, verbose, log_precision=False)


def _refuse_zero3(recipe: Recipe) -> None:
    """DeepSpeed ZeRO-3 partitions every parameter: the fused V-slice rows cannot be checked."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if stage is None and config_file and os.path.isfile(config_file):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stage = str(json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage"))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and stage == "3":
        raise VsteerError(
            "DeepSpeed ZeRO-3 is not supported: it partitions lora_B, so vsteer cannot keep or check the "
            "V-slice rows of fused projections; use ZeRO-2, DDP or FSDP2 (accelerate_configs/)"
        )


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


def progress_callback(desc: str = "train"):
    """A ``TrainerCallback`` drawing one tqdm bar over the optimizer steps (main process only)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StepBar(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=desc, unit="step")

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return StepBar()


def _make_trainer(
    recipe: Recipe,
    model,
    tokenizer,
    data: RecipeData,
    output_dir: Path,
    eval_only=False,
    callbacks=(),
    verbose: bool = False,
    progress: bool = False,
):
    from datasets import Dataset
    from transformers import PrinterCallback

    args = _trainer_config(recipe, output_dir, eval_only, verbose)
    train_ds = Dataset.from_list(data.train)
    eval_ds = Dataset.from_list(data.eval) if data.eval else None
    callbacks = [] if eval_only else [masked_rows_callback(), *callbacks]
    if progress and not verbose and not eval_only:
        callbacks.append(progress_callback(f"train {recipe.name}"))
    from vsteer.lm_head import cpu_lm_head

    head = recipe.section("training")["lm_head"]
    swap = cpu_lm_head(model) if head == "auto" else contextlib.nullcontext(False)
    with swap:
        trainer = _trl_trainer(recipe, model, tokenizer, args, train_ds, eval_ds, callbacks)
    if not verbose:  # with disable_tqdm the Trainer prints every log dict instead
        trainer.remove_callback(PrinterCallback)
    return trainer


def _trl_trainer(recipe, model, tokenizer, args, train_ds, eval_ds, callbacks):
    if recipe.method == "sft":
        from trl import SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    else:
        from trl import DPOTrainer

        given = train_ds.num_rows > 0 and set(REF_COLUMNS) <= set(train_ds.column_names)
        if given and args.precompute_ref_log_probs:
            raise RecipeError(
                "the training rows carry ref_chosen_logps/ref_rejected_logps; "
                "drop training.precompute_ref_log_probs (or the columns)"
            )
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        if given:
            # reference log-probs computed once for several runs over the same rows (see
            # reference_logps): TRL's collator passes the columns on, and with this flag its loss
            # reads them instead of running the reference forward
            trainer.precompute_ref_logps = True
    return trainer


REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def reference_logps(recipe, model, tokenizer, overrides=()) -> list[dict]:
    """The DPO reference log-probabilities of a recipe's training rows under ``model`` (the plain
    base model), computed by TRL's own precompute (``precompute_ref_log_probs``): one
    ``{"ref_chosen_logps": ..., "ref_rejected_logps": ...}`` per row, in row order. Rows that
    carry them train without a reference forward, so several runs over the same rows (the arms,
    rates and seeds of :mod:`vsteer.compare`) compute them once. ``model`` gets TRL's LM-head
    patch: pass a copy you do not score with."""
    recipe = load_recipe(recipe, overrides)
    if recipe.method != "dpo":
        raise RecipeError(f"reference_logps needs a dpo recipe, got method={recipe.method!r}")
    recipe = load_recipe(recipe, {"training.precompute_ref_log_probs": True})
    data = load_recipe_data(recipe)
    quiet = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # TRL's precompute bar reads only this
    try:
        return _reference_logps(recipe, model, tokenizer, data)
    finally:
        if quiet is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = quiet


def _reference_logps(recipe, model, tokenizer, data) -> list[dict]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, quiet_libraries():
        trainer = _make_trainer(recipe, model, tokenizer, data, Path(tmp), eval_only=True)
        ds = trainer.train_dataset
        return [{k: float(ds[k][i]) for k in REF_COLUMNS} for i in range(ds.num_rows)]


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False):
    """Silence transformers/TRL/datasets logs, warnings and ``datasets`` progress bars inside the
    block unless ``verbose``; restores the previous settings afterwards."""
    if verbose:
        yield
        return
    import datasets
    import transformers

    tf_level = transformers.logging.get_verbosity()
    ds_level = datasets.logging.get_verbosity()
    ds_bars = datasets.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            for module in ("transformers", "trl", "peft", "accelerate", "datasets", "torch"):
                warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")
            yield
    finally:
        transformers.logging.set_verbosity(tf_level)
        datasets.logging.set_verbosity(ds_level)
        if ds_bars:
            datasets.enable_progress_bars()


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
    verbose: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Train the adapter a recipe describes and write it to ``<output_dir>/<name>/``.

    ``overrides``: ``["training.max_steps=10", "adapter.targets=o"]`` or a dict of dotted keys.
    ``output_dir`` overrides the recipe's ``output_dir``. An existing adapter directory is an
    error unless ``overwrite`` (the old one stays until the new one is complete). ``resume``
    continues from the last checkpoint in ``<output_dir>/.<name>.partial/``; without it, the
    checkpoints of an interrupted run are an error unless ``overwrite`` (which starts over). ``model`` and
    ``tokenizer``: an already loaded base model (plain, no adapter) instead of ``recipe.model``.
    ``callbacks``: extra ``transformers.TrainerCallback`` objects. Quiet by default: no TRL log
    lines, ``datasets`` bars or library warnings; ``progress`` draws one bar over the steps,
    ``verbose`` shows the libraries' own logs and bars instead.

    The adapter's ``vsteer.json`` records what was used (``training_run``: precision, mixed
    precision, optimizer, gradient checkpointing, device, processes) and the resolved versions of
    the packages that change numbers (``versions``).
    """
    recipe = load_recipe(recipe, overrides)
    _refuse_zero3(recipe)
    root = Path(output_dir if output_dir is not None else recipe["output_dir"])
    final, partial = root / recipe.name, root / f".{recipe.name}.partial"
    if final.exists() and not overwrite:
        raise VsteerError(
            f"adapter directory {str(final)!r} exists; pass overwrite=True (--overwrite) to replace it"
        )
    last = _last_checkpoint(partial)
    checkpoint = last if resume else None
    if resume and checkpoint is None:
        raise VsteerError(f"nothing to resume: no checkpoint in {str(partial)!r}")
    if last is not None and not resume and not overwrite:
        # a fresh run starts by clearing the partial directory: never do that to an interrupted
        # run's checkpoints unless asked
        raise VsteerError(
            f"{str(partial)!r} holds checkpoints of an interrupted run (last: {last.name}); "
            "pass resume=True (--resume) to continue it, or overwrite=True (--overwrite) to start over"
        )
    if checkpoint is not None:
        _check_resume(recipe, partial)
    data = load_recipe_data(recipe)
    previous_threads = torch.get_num_threads()
    try:
        with quiet_libraries(verbose):
            # bad training keys fail before the model loads; a launcher mismatch is logged here, once
            training_arguments(recipe, partial, verbose=verbose)
            return _train(
                recipe, data, root, final, partial, checkpoint, model, tokenizer, callbacks, verbose, progress
            )
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    recipe, data, root, final, partial, checkpoint, model, tokenizer, callbacks, verbose=False, progress=False
) -> TrainResult:
    from vsteer.lora import add_adapter, check_masked_rows, count_parameters

    threads = _set_threads(recipe)
    if _is_main() and checkpoint is None and partial.exists():
        shutil.rmtree(partial)

    from transformers import set_seed

    set_seed(recipe["seed"])
    if model is None:
        from vsteer.models import load_model

        # on the CPU: the Trainer moves it to the device that recipe key ``device`` chooses
        model, tokenizer = load_model(recipe["model"], dtype=recipe["dtype"], device="cpu")
    elif tokenizer is None:
        raise VsteerError("pass the tokenizer together with the model")
    a = recipe.section("adapter")
    if a["kind"] == "intervention":
        return _train_intervention(
            recipe, data, root, final, partial, model, tokenizer, callbacks, verbose, progress, threads
        )
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
    trainer = _make_trainer(
        recipe, peft_model, tokenizer, data, partial, callbacks=callbacks, verbose=verbose, progress=progress
    )

    before = _load_json(partial / _BEFORE) if checkpoint is not None else None
    if before is None:
        before = (
            _evaluate(trainer, recipe, peft_model, tokenizer, data) if recipe["training.eval_before"] else {}
        )
        if _is_main():
            partial.mkdir(parents=True, exist_ok=True)
            (partial / _BEFORE).write_text(json.dumps(before))
            (partial / _RECIPE).write_text(json.dumps(_resumable_view(recipe), default=str))
    with training_numerics(peft_model, recipe) as numerics:
        start = time.perf_counter()
        out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        runtime = time.perf_counter() - start
    after = _evaluate(trainer, recipe, peft_model, tokenizer, data)
    check_masked_rows(peft_model)

    metrics = _run_metrics(out, trainer, runtime, threads, recipe, before, after)
    adapter = {
        **plan.to_dict(),
        "trainable_params_measured": counts["trainable"],
        "effective_params_measured": counts["effective"],
    }
    meta = _metadata(recipe, peft_model, adapter, data, metrics)
    meta["training_run"] = {**_training_run(trainer, recipe, peft_model), **numerics}
    trainer.accelerator.wait_for_everyone()
    if _is_main():
        trained = trainer.accelerator.unwrap_model(trainer.model)
        _publish(lambda d: trained.save_pretrained(str(d), selected_adapters=["default"]), meta, final, root)
        shutil.rmtree(partial, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(recipe.name, final, metrics, adapter, meta)


def _train_intervention(
    recipe, data, root, final, partial, model, tokenizer, callbacks, verbose, progress, threads
) -> TrainResult:
    """``adapter.kind: intervention``: a :class:`vsteer.interventions.Intervention` is the only
    trainable module (the base is frozen), trained by the same TRL trainer with its hooks on;
    written to ``<name>/intervention.safetensors`` beside ``vsteer.json``. No checkpoints (no resume)."""
    from transformers.trainer_utils import SaveStrategy

    from vsteer.interventions import FILE_NAME, Intervention, apply_intervention, plan_intervention

    if recipe.method == "dpo":
        # TRL reloads a non-PEFT reference from its hub id; precomputed (in the trainer's __init__, before
        # the hooks exist) it is the frozen base itself, which is what an intervention's reference is by
        # definition: reference columns on the rows (vsteer compare passes the base's, computed once
        # for its LoRA arms) are dropped, and TRL's precompute (one forward over the rows) replaces them.
        def strip(rows):
            return [{k: v for k, v in r.items() if k not in REF_COLUMNS} for r in rows]

        data = replace(data, train=strip(data.train), eval=strip(data.eval))
        recipe = load_recipe(recipe, {"training.precompute_ref_log_probs": True})
    a = recipe.section("adapter")
    layers, rank = a["layers"] or "all", a["rank"]
    if a["budget"] is not None:
        plan = plan_intervention(model, a["intervention"], a["site"], a["budget"], layers=layers)
        if plan.trainable > a["budget"] * 1.02:  # LoRA budgets hold within 2%, so do these
            smallest = "its fixed size" if a["intervention"] == "bias" else "rank 1"
            raise RecipeError(
                f"adapter.budget {a['budget']:,} is below what a {a['intervention']} intervention at "
                f"{a['site']} on these layers needs at {smallest} ({plan.trainable:,} parameters)"
            )
        rank = plan.rank
    iv = Intervention.for_model(
        model, a["intervention"], a["site"], layers, rank, a["positions"], recipe["seed"]
    )
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    # a submodule while training, so the Trainer's optimizer (trainable parameters only) and device
    # placement see it; the trainer is built before the hooks exist (DPO's reference pass runs in it)
    model.vsteer_intervention = iv.to(next(model.parameters()).device)
    quiet = os.environ.get("TQDM_DISABLE")
    try:
        if not verbose:
            os.environ["TQDM_DISABLE"] = "1"  # TRL's reference precompute bar reads only this
        try:
            kw = dict(callbacks=callbacks, verbose=verbose, progress=progress)
            trainer = _make_trainer(recipe, model, tokenizer, data, partial, **kw)
        finally:
            if quiet is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = quiet
        trainer.args.save_strategy = SaveStrategy.NO
        with apply_intervention(model, iv):
            evaluate = recipe["training.eval_before"]
            before = _evaluate(trainer, recipe, model, tokenizer, data) if evaluate else {}
            with training_numerics(model, recipe) as numerics:
                start = time.perf_counter()
                out = trainer.train()
                runtime = time.perf_counter() - start
            after = _evaluate(trainer, recipe, model, tokenizer, data)
    finally:
        del model.vsteer_intervention
        for name, p in model.named_parameters():
            p.requires_grad_(frozen.get(name, p.requires_grad))
    iv = iv.cpu()
    metrics = _run_metrics(out, trainer, runtime, threads, recipe, before, after)
    adapter = {
        "kind": "intervention",
        "intervention": iv.kind,
        **{k: getattr(iv, k) for k in ("site", "layers", "positions", "rank", "width", "d_in")},
        "trainable_params_measured": iv.num_parameters(),
        "effective_params_measured": iv.num_parameters(),  # nothing frozen inside an intervention
    }
    iv.extra.update({"recipe": recipe.name, "method": recipe.method, "steps": metrics["steps"]})
    meta = _metadata(recipe, model, adapter, data, metrics)
    meta["training_run"] = {**_training_run(trainer, recipe, model), **numerics}
    trainer.accelerator.wait_for_everyone()
    if _is_main():
        _publish(lambda d: iv.save(Path(d) / FILE_NAME), meta, final, root)
        shutil.rmtree(partial, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(recipe.name, final, metrics, adapter, meta)


def _training_run(trainer, recipe: Recipe, peft_model) -> dict:
    """How the run actually trained (read from the Trainer and its Accelerator, not the recipe)."""
    args, acc = trainer.args, trainer.accelerator
    optim = getattr(args.optim, "value", args.optim)
    return {
        "precision": recipe["training.precision"],
        "mixed_precision": acc.mixed_precision,
        "autocast": bool(acc.native_amp),
        "launcher_mixed_precision": os.environ.get("ACCELERATE_MIXED_PRECISION"),
        "optim": str(optim),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "weights_dtype": str(next(_base(peft_model).parameters()).dtype).replace("torch.", ""),
        "device": str(acc.device),
        "distributed_type": str(getattr(acc.distributed_type, "value", acc.distributed_type)),
        "processes": int(acc.num_processes),
    }


def _metadata(recipe: Recipe, peft_model, adapter: dict, data: RecipeData, metrics: dict) -> dict:
    import vsteer
    from vsteer.pieces import package_versions

    base = _base(peft_model)
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
        # resolved versions of the packages that change numbers (torch, transformers, peft, trl, accelerate, ...)
        "versions": {"vsteer": vsteer.__version__, **package_versions()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# training.attention: auto picks eager attention on the CPU up to this training.max_length.
# benchmarks/train_step.py --pack (SmolLM2 bf16 LoRA step, one thread, 2026-12-03): eager vs SDPA
# steps per CPU-s 1.37 at <= 48 tokens, 1.10 at 128, 0.98 at 256 (its cost grows with length^2)
EAGER_MAX_LENGTH = 128


def _sharded() -> bool:
    """FSDP or DeepSpeed: they own the parameters' storage (and flatten them by dtype)."""
    return any(
        os.environ.get(k, "false").lower() == "true"
        for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    )


@contextlib.contextmanager
def training_numerics(model, recipe: Recipe):
    """While training only: the recipe's ``training.attention`` and ``training.frozen_weights``
    (see ``vsteer.recipes.SCHEMA``); yields what was applied (``{"attention": ..., "frozen_weights":
    ...}``, recorded in ``training_run``) and puts the loaded attention and weights back after, so
    evaluation before and after training and whatever the caller does next see the model as loaded.

    ``frozen_weights: auto`` under bf16/fp16 autocast in one unsharded process: every frozen
    ``nn.Linear`` weight in fp32 is replaced by its copy in the autocast dtype (autocast caches the
    casts only of weights that require grad, so it re-casts the frozen ones at every forward: 13%
    of a SmolLM2 step on the CPU). The matmuls get the same values, so the losses and the trained
    adapter are bit-identical (``tests/test_train_numerics.py``). The input and output embeddings
    keep their weights (a lookup is not autocast; TRL's head may upcast the output one)."""
    t = recipe.section("training")
    base = _base(model)
    applied = {"attention": None, "frozen_weights": None}
    restore_attn = None
    want = t["attention"]
    if want == "auto":
        on_cpu = next(model.parameters()).device.type == "cpu" and _on_cpu(recipe)
        want = "eager" if on_cpu and t["max_length"] <= EAGER_MAX_LENGTH else "model"
    current = getattr(base.config, "_attn_implementation", None)
    if want != "model" and current is not None and want != current:
        try:
            base.set_attn_implementation(want)
        except (ValueError, ImportError) as err:
            raise RecipeError(f"training.attention={want}: {str(err).splitlines()[0]}") from None
        restore_attn = current
    applied["attention"] = getattr(base.config, "_attn_implementation", None)
    originals: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
    dtype = _AUTOCAST_DTYPES.get(t["precision"])
    if t["frozen_weights"] == "auto" and dtype is not None and _world_size() == 1 and not _sharded():
        keep = {id(m) for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m is not None}
        kept = {
            id(m.weight) for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m is not None
        }
        for module in model.modules():
            w = getattr(module, "weight", None)
            if (
                type(module) is torch.nn.Linear
                and id(module) not in keep
                and isinstance(w, torch.nn.Parameter)
                and not w.requires_grad
                and w.dtype == torch.float32
                and id(w) not in kept
            ):
                originals.append((module, w))
                module.weight = torch.nn.Parameter(w.detach().to(dtype), requires_grad=False)
        if originals:
            applied["frozen_weights"] = str(dtype).replace("torch.", "")
    try:
        yield applied
    finally:
        for module, w in originals:
            module.weight = w
        if restore_attn is not None:
            base.set_attn_implementation(restore_attn)


def _base(model):
    """The base model under a PEFT wrapper (a plain model, for interventions, is its own base)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _publish(save, meta: dict, final: Path, root: Path) -> None:
    """Write the adapter (``save(directory)``) + ``vsteer.json`` into a temp dir beside ``final``,
    then swap it in."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save(tmp)
        atomic_write(tmp / ADAPTER_META, json.dumps(meta, indent=2, default=str))
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
        with quiet_libraries():
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
    from vsteer.encoding import pad_batch, pad_token_id
    from vsteer.models import model_device

    device, pad = model_device(model), pad_token_id(tokenizer)
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
        batch = pad_batch(seqs, pad, padding_side="right", device=device)  # completions start at `starts`
        ids = batch["input_ids"]
        logits = model(**batch).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = torch.zeros_like(logp, dtype=torch.bool)

        for j, (s, start) in enumerate(zip(seqs, starts)):
            keep[j, max(start - 1, 0) : len(s) - 1] = True
        out.append((logp * keep).sum(-1).cpu())
    return torch.cat(out)
