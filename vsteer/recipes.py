"""Training recipes: YAML in, a validated :class:`Recipe` out, before any model loads.

A recipe has four parts (every key optional except ``name`` and ``data.train``)::

    name: smollm2-v-imdb-sft         # adapters/<name>/
    model: smollm2-135m-instruct      # embedded name, HF id, directory or .gguf
    method: sft                       # sft | dpo
    seed: 0
    data:    {train: ..., eval: ..., n_train: 256, n_eval: 64, eval_size: 64}
    adapter: {targets: v, r: 8, alpha_per_rank: 2.0, dropout: 0.0, layers: null, budget: null, match: null}
    # or a trainable intervention (vsteer.interventions) instead of LoRA:
    # adapter: {kind: intervention, intervention: loreft, site: v, rank: 4, layers: null, positions: all}
    training: {max_steps: 40, batch_size: 8, learning_rate: 1.0e-3, max_length: 128, precision: fp32, ...}

``training`` also takes any field of TRL's ``SFTConfig``/``DPOConfig`` (``adam_beta2``,
``lr_scheduler_kwargs``, ``loss_type``, ...): passed through to it and validated by it, except the
fields vsteer sets itself (:data:`TRL_RESERVED`). ``training.precision`` (``fp32``, ``bf16``,
``fp16``) is the mixed precision the trainer autocasts to, whatever the launcher says.

Overrides are ``section.key=value`` strings (``training.max_steps=10``), or just ``key=value``
when the key name is unique; values are parsed as YAML (``adapter.layers=[0,1]``).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from vsteer.errors import DataError, RecipeError
from vsteer.files import resolve_recipe

REQUIRED = object()
METHODS = ("sft", "dpo")


# key -> (allowed types, default). ``None`` in the types means the key may be null.
SCHEMA: dict[str, tuple[tuple, object]] = {
    "name": ((str,), REQUIRED),
    "description": ((str,), ""),
    "model": ((str,), "smollm2-135m-instruct"),
    "method": ((str,), "sft"),
    "seed": ((int,), 0),
    "output_dir": ((str,), "adapters"),
    "device": ((str,), "auto"),  # auto (CUDA when available), cpu or cuda; launchers pick the GPU
    "dtype": ((str,), "float32"),  # the dtype the weights load in
    "data.train": ((str,), REQUIRED),
    "data.eval": ((str, None), None),
    "data.n_train": ((int, None), None),
    "data.n_eval": ((int, None), None),
    "data.eval_size": ((int,), 64),
    "adapter.targets": ((str, list), "v"),
    "adapter.r": ((int,), 8),
    "adapter.alpha_per_rank": ((float,), 2.0),
    "adapter.dropout": ((float,), 0.0),
    "adapter.layers": ((list, None), None),
    "adapter.budget": ((int, None), None),
    "adapter.match": ((str, list, None), None),
    # kind: intervention trains a vsteer.interventions module instead of LoRA (base frozen)
    "adapter.kind": ((str,), "lora"),  # lora | intervention
    "adapter.intervention": ((str,), "loreft"),  # loreft | bias | dynamic
    "adapter.site": ((str,), "v"),  # v | resid | z
    "adapter.rank": ((int,), 4),  # with adapter.budget: the largest rank within it
    "adapter.positions": ((str,), "all"),
    "training.max_steps": ((int,), 40),
    "training.batch_size": ((int,), 8),
    "training.grad_accum": ((int,), 1),
    "training.learning_rate": ((float,), 1e-3),
    "training.weight_decay": ((float,), 0.0),
    "training.lr_scheduler": ((str,), "linear"),
    "training.warmup_steps": ((int,), 0),
    "training.max_grad_norm": ((float,), 1.0),
    "training.max_length": ((int,), 128),
    "training.eval_batch_size": ((int,), 16),
    "training.logging_steps": ((int,), 5),
    "training.save_steps": ((int,), 20),
    "training.eval_before": ((bool,), True),
    "training.beta": ((float,), 0.1),
    "training.num_threads": ((int, None), None),
    "training.precision": ((str,), "fp32"),  # fp32 | bf16 | fp16: autocast, on any launcher
    "training.optim": ((str,), "adamw_torch_fused"),  # a transformers OptimizerNames value (its default)
    "training.gradient_checkpointing": ((bool,), False),
    # auto: on the CPU the model's own logits stand in for TRL's tiled LM head (vsteer/lm_head.py);
    # fused: TRL's head everywhere
    "training.lm_head": ((str,), "auto"),
    # auto: on the CPU with training.max_length <= 128, eager attention while training (PyTorch's
    # CPU flash-attention backward was 27% of a short SmolLM2 step; vsteer.train.EAGER_MAX_LENGTH);
    # model: as loaded; or a transformers attn_implementation name. Put back after training:
    # evaluation uses the loaded one.
    "training.attention": ((str,), "auto"),
    # auto: under bf16/fp16 autocast in one process, the frozen nn.Linear weights are stored in the
    # autocast dtype while training (the very values autocast would cast them to at every forward:
    # bit-identical); keep: as loaded. The originals are put back after training.
    "training.frozen_weights": ((str,), "auto"),
}
PRECISIONS = ("fp32", "bf16", "fp16")
# training.attention: auto, model (as loaded), or one of transformers' attention implementations
ATTENTION_CHOICES = (
    "auto",
    "model",
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flex_attention",
)
# TRL/transformers fields vsteer sets from its own keys or its own policy: not accepted in recipes
TRL_RESERVED = {
    "per_device_train_batch_size": "training.batch_size (global)",
    "per_device_eval_batch_size": "training.eval_batch_size",
    "gradient_accumulation_steps": "training.grad_accum",
    "lr_scheduler_type": "training.lr_scheduler",
    "bf16": "training.precision",
    "fp16": "training.precision",
    "output_dir": "output_dir",
    "seed": "seed",
    "data_seed": "seed",
    "use_cpu": "device",
    "save_strategy": "training.save_steps",
    "save_total_limit": None,
    "eval_strategy": None,
    "eval_steps": "training.eval_before (vsteer evaluates before and after training, not during it)",
    "report_to": None,
    "disable_tqdm": "the verbose flag of train_from_recipe",
    "log_level": "the verbose flag of train_from_recipe",
    "logging_strategy": "training.logging_steps",
    "num_train_epochs": "training.max_steps",
    "deepspeed": "an accelerate config (ZeRO-3 is refused)",
}
SECTIONS = ("data", "adapter", "training")
_POSITIVE = {
    "data.n_train",
    "data.n_eval",
    "adapter.r",
    "adapter.rank",
    "adapter.budget",
    "adapter.alpha_per_rank",
    "training.max_steps",
    "training.batch_size",
    "training.grad_accum",
    "training.learning_rate",
    "training.max_length",
    "training.eval_batch_size",
    "training.logging_steps",
    "training.save_steps",
    "training.beta",
    "training.num_threads",
}
_NON_NEGATIVE = {
    "seed",
    "data.eval_size",
    "adapter.dropout",
    "training.weight_decay",
    "training.warmup_steps",
    "training.max_grad_norm",
}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: ``values`` maps dotted keys (``"training.max_steps"``) to values.

    ``source``: the YAML file it came from (``None`` for a dict); relative data paths are
    looked up next to it first.
    """

    values: Mapping[str, object]
    source: Path | None = None

    def __getitem__(self, key: str):
        return self.values[key]

    @property
    def name(self) -> str:
        return self.values["name"]

    @property
    def method(self) -> str:
        return self.values["method"]

    def section(self, name: str) -> dict:
        prefix = f"{name}."
        return {k[len(prefix) :]: v for k, v in self.values.items() if k.startswith(prefix)}

    def to_dict(self) -> dict:
        """Nested plain dict (the YAML shape), with every default filled in."""
        out: dict = {}
        for key, value in self.values.items():
            head, _, tail = key.partition(".")
            if tail:
                out.setdefault(head, {})[tail] = copy.deepcopy(value)
            else:
                out[key] = copy.deepcopy(value)
        return out

    def data_path(self, key: str) -> Path | None:
        """Resolve ``data.train``/``data.eval``: absolute, next to the recipe, the working
        directory, then the files shipped in :mod:`vsteer.data`."""
        value = self.values[key]
        return None if value is None else resolve_data_file(value, self.source, key)


def resolve_data_file(value: str, source: Path | None, key: str = "data.train") -> Path:
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else []
    if not path.is_absolute():
        if source is not None:
            candidates.append(source.parent / path)
        candidates.append(Path.cwd() / path)
        try:
            from vsteer.data import data_path

            candidates.append(Path(data_path(value)))
        except Exception:  # noqa: BLE001 - a missing or failing shipped-data lookup means: not there
            pass
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise DataError(
        f"{key}: data file {value!r} not found (looked in: {', '.join(str(c) for c in candidates)}); "
        f"expected a JSONL file"
    )


# --------------------------------------------------------------------------------------------
# loading and validation
# --------------------------------------------------------------------------------------------
def load_recipe(
    recipe: str | os.PathLike | Mapping | Recipe, overrides: Iterable[str] | Mapping = ()
) -> Recipe:
    """Read and validate a recipe (a YAML path, a nested dict, or a :class:`Recipe`)."""
    source = None
    if isinstance(recipe, Recipe):
        raw, source = recipe.to_dict(), recipe.source
    elif isinstance(recipe, Mapping):
        raw = copy.deepcopy(dict(recipe))
    else:
        source = resolve_recipe(recipe)  # a file, or a recipe shipped in vsteer/recipes
        try:
            raw = yaml.safe_load(source.read_text())
        except yaml.YAMLError as err:
            raise RecipeError(f"{source}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, Mapping):
            raise RecipeError(f"{source}: a recipe is a YAML mapping, got {type(raw).__name__}")
    flat = _flatten(raw)
    for key, value in _parse_overrides(overrides).items():
        flat[key] = value
    return Recipe(_validate(flat), source)


def _flatten(raw: Mapping) -> dict:
    flat = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise RecipeError(f"recipe section {key!r} must be a mapping, got {value!r}")
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[str(key)] = value
    return flat


def _parse_overrides(overrides: Iterable[str] | Mapping) -> dict:
    items = overrides.items() if isinstance(overrides, Mapping) else (_split(o) for o in overrides)
    out = {}
    for key, value in items:
        out[_full_key(key)] = value
    return out


def _split(text: str) -> tuple[str, object]:
    if not isinstance(text, str) or "=" not in text:
        raise RecipeError(f"override {text!r} must look like key=value (e.g. training.max_steps=10)")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _full_key(key: str) -> str:
    if key in SCHEMA:
        return key
    matches = [k for k in SCHEMA if k.rpartition(".")[2] == key]
    if len(matches) == 1:
        return matches[0]
    return key  # unknown: reported by _validate with a suggestion


def _validate(flat: dict) -> dict:
    passthrough = {}
    for key in flat:
        if key not in SCHEMA:
            if key.startswith("training."):
                passthrough[key] = _check_trl_key(key, flat.get("method", SCHEMA["method"][1]))
                continue
            close = difflib.get_close_matches(key, list(SCHEMA), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"unknown recipe key {key!r}{hint}")
    values = {}
    for key, (types, default) in SCHEMA.items():
        if key not in flat:
            if default is REQUIRED:
                raise RecipeError(f"recipe key {key!r} is required")
            values[key] = copy.deepcopy(default)
            continue
        values[key] = _check_type(key, flat[key], types)
    _check_values(values)
    _check_kind_keys(flat, values)
    values.update({k: copy.deepcopy(flat[k]) for k in passthrough})
    return values


# keys only one adapter kind reads (a LoRA recipe reused with adapter.kind=intervention keeps its
# LoRA keys, as docs/interventions.md does; they are ignored there and recorded as given)
_INTERVENTION_ONLY = {"adapter.intervention", "adapter.site", "adapter.rank", "adapter.positions"}


def _check_kind_keys(flat: dict, values: dict) -> None:
    """A key the recipe's adapter kind or method never reads, set to anything but its default
    (``Recipe.to_dict`` writes every default back, so a default is no sign of a mistake), is a
    mistake that would otherwise train something else than the recipe says: one line."""

    def changed(key: str) -> bool:
        return key in flat and values[key] != SCHEMA[key][1]

    if values["adapter.kind"] == "lora":
        given = sorted(k for k in _INTERVENTION_ONLY if changed(k))
        if given:
            hint = "; a LoRA adapter's rank is adapter.r" if "adapter.rank" in given else ""
            raise RecipeError(
                f"recipe key(s) {', '.join(given)} apply to adapter.kind=intervention, not lora{hint}"
            )
    if values["method"] != "dpo" and changed("training.beta"):
        raise RecipeError("recipe key 'training.beta' applies to method: dpo, not sft")


def trl_config_class(method: str):
    """``trl.SFTConfig`` or ``trl.DPOConfig``: what a recipe's ``training`` section becomes."""
    if method == "dpo":
        from trl import DPOConfig

        return DPOConfig
    from trl import SFTConfig

    return SFTConfig


def _check_trl_key(key: str, method) -> str:
    """A ``training.`` key that is not vsteer's must be a field of the method's TRL config
    (imported only here, so recipes without such keys validate without TRL)."""
    import dataclasses

    name = key.partition(".")[2]
    cls = trl_config_class(method if method in METHODS else "sft")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    ours = sorted(k.partition(".")[2] for k in SCHEMA if k.startswith("training."))
    if name in TRL_RESERVED:
        use = TRL_RESERVED[name]
        raise RecipeError(f"recipe key {key!r} is set by vsteer" + (f"; use {use} instead" if use else ""))
    if name not in fields:
        close = difflib.get_close_matches(name, ours + sorted(fields - set(TRL_RESERVED)), n=1)
        hint = f" (did you mean 'training.{close[0]}'?)" if close else ""
        raise RecipeError(
            f"unknown recipe key {key!r}{hint}; valid training keys: {', '.join(ours)}, "
            f"or a field of trl.{cls.__name__}"
        )
    return name


def _check_type(key: str, value, types: tuple):
    if value is None:
        if None in types:
            return None
        raise RecipeError(f"recipe key {key!r} must not be null")
    for t in types:
        if t is None:
            continue
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # PyYAML reads 5e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
        if t is bool and isinstance(value, bool):
            return value
        if t in (str, list) and isinstance(value, t):
            return value
    names = " or ".join("null" if t is None else t.__name__ for t in types)
    raise RecipeError(f"recipe key {key!r} must be {names}, got {value!r} ({type(value).__name__})")


def _check_values(values: dict) -> None:
    from vsteer.lora import parse_targets

    for key in _POSITIVE:
        v = values[key]
        if v is not None and v <= 0:
            raise RecipeError(f"recipe key {key!r} must be > 0, got {v!r}")
    for key in _NON_NEGATIVE:
        if values[key] < 0:
            raise RecipeError(f"recipe key {key!r} must be >= 0, got {values[key]!r}")
    if values["method"] not in METHODS:
        raise RecipeError(f"recipe key 'method' must be one of {METHODS}, got {values['method']!r}")
    name = values["name"]
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise RecipeError(f"recipe key 'name' must be a plain directory name, got {name!r}")
    if values["adapter.dropout"] >= 1:
        raise RecipeError(f"recipe key 'adapter.dropout' must be < 1, got {values['adapter.dropout']!r}")
    parse_targets(values["adapter.targets"])
    _check_intervention_keys(values)
    if values["adapter.match"] is not None:
        parse_targets(values["adapter.match"])
        if values["adapter.budget"] is not None:
            raise RecipeError("recipe keys 'adapter.budget' and 'adapter.match' are exclusive; give one")
    layers = values["adapter.layers"]
    if layers is not None and (
        not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    ):
        raise RecipeError(
            f"recipe key 'adapter.layers' must be a non-empty list of ints or null, got {layers!r}"
        )
    _check_device_keys(values)
    if values["training.precision"] not in PRECISIONS:
        raise RecipeError(
            f"recipe key 'training.precision' must be one of {', '.join(PRECISIONS)}, "
            f"got {values['training.precision']!r}"
        )
    for key, allowed in (
        ("training.lm_head", ("auto", "fused")),
        ("training.attention", ATTENTION_CHOICES),
        ("training.frozen_weights", ("auto", "keep")),
    ):
        if values[key] not in allowed:
            raise RecipeError(f"recipe key {key!r} must be one of {', '.join(allowed)}, got {values[key]!r}")
    if values["training.lr_scheduler"] not in ("linear", "cosine", "constant", "constant_with_warmup"):
        raise RecipeError(
            f"recipe key 'training.lr_scheduler' must be linear, cosine, constant or constant_with_warmup, "
            f"got {values['training.lr_scheduler']!r}"
        )


def _check_intervention_keys(values: dict) -> None:
    kind = values["adapter.kind"]
    if kind not in ("lora", "intervention"):
        raise RecipeError(f"recipe key 'adapter.kind' must be lora or intervention, got {kind!r}")
    if kind == "lora":
        return
    from vsteer.interventions import KINDS, SITES

    for key, allowed in (("adapter.intervention", KINDS), ("adapter.site", SITES)):
        if values[key] not in allowed:
            raise RecipeError(f"recipe key {key!r} must be one of {', '.join(allowed)}, got {values[key]!r}")
    if values["adapter.positions"] != "all":
        # one forward over prompt + completion: the hook layer cannot tell them apart in training
        raise RecipeError(
            f"recipe key 'adapter.positions' must be all for training, got {values['adapter.positions']!r}"
        )
    if values["adapter.match"] is not None:
        raise RecipeError(
            "recipe key 'adapter.match' applies to LoRA adapters, not adapter.kind=intervention"
        )


def _check_device_keys(values: dict) -> None:
    """``device``/``dtype`` are checked by name only: a GPU recipe validates on a CPU machine."""
    from vsteer.errors import ModelError
    from vsteer.models import resolve_device, resolve_dtype

    for key, check in (
        ("device", lambda v: resolve_device(v, check_available=False)),
        ("dtype", resolve_dtype),
    ):
        try:
            check(values[key])
        except ModelError as err:
            raise RecipeError(f"recipe key {key!r}: {err}") from None


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

_FIELDS = {"sft": (("prompt", "completion"), ("messages",), ("text",)), "dpo": (("chosen", "rejected"),)}


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file (``.jsonl`` or ``.jsonl.gz``)."""
    from vsteer.files import jsonl_rows

    return [row for _, row in jsonl_rows(path)]


def _check_rows(rows: list[dict], method: str, path: Path) -> list[dict]:
    options = _FIELDS[method]
    for fields in options:
        if all(f in rows[0] for f in fields):
            break
    else:
        raise DataError(
            f"{path}: rows for {method} need the fields "
            + " or ".join("+".join(f) for f in options)
            + f"; the first row has {sorted(rows[0])}"
        )
    keep = set(fields) | ({"prompt"} if method == "dpo" else set())
    # DPO rows may carry precomputed reference log-probs (vsteer.train.reference_logps): on every
    # row or on none, as numbers
    refs = {"ref_chosen_logps", "ref_rejected_logps"} if method == "dpo" else set()
    with_refs = bool(refs) and refs <= set(rows[0])
    out = []
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise DataError(f"{path}: row {i} lacks {missing}")
        if with_refs and not all(isinstance(row.get(k), (int, float)) for k in refs):
            raise DataError(
                f"{path}: row {i}: ref_chosen_logps and ref_rejected_logps must be numbers on every row"
            )
        out.append({k: v for k, v in row.items() if k in keep or (with_refs and k in refs)})
    return out


@dataclass
class RecipeData:
    train: list[dict]
    eval: list[dict]
    files: dict[str, dict]


def load_recipe_data(recipe: Recipe) -> RecipeData:
    """Train/eval rows for a recipe; eval is ``data.eval`` or the last ``data.eval_size`` rows of
    ``data.train`` (held out from training). ``n_train``/``n_eval`` take the first rows."""
    d = recipe.section("data")
    train_path = recipe.data_path("data.train")
    rows = _check_rows(read_jsonl(train_path), recipe.method, train_path)
    files = {"train": _file_record(train_path, rows)}
    eval_path = recipe.data_path("data.eval")
    if eval_path is not None:
        eval_rows = _check_rows(read_jsonl(eval_path), recipe.method, eval_path)
        files["eval"] = _file_record(eval_path, eval_rows)
    else:
        n = d["eval_size"]
        if n >= len(rows):
            raise DataError(f"data.eval_size={n} leaves no training rows in {train_path} ({len(rows)} rows)")
        rows, eval_rows = (rows[:-n], rows[-n:]) if n else (rows, [])
    train = rows[: d["n_train"]] if d["n_train"] else rows
    eval_rows = eval_rows[: d["n_eval"]] if d["n_eval"] else eval_rows
    files["train"]["rows_used"] = len(train)
    if "eval" in files:
        files["eval"]["rows_used"] = len(eval_rows)
    else:
        files["train"]["eval_rows_held_out"] = len(eval_rows)
    return RecipeData(train, eval_rows, files)


def _file_record(path: Path, rows: list[dict]) -> dict:
    return {"path": _display_path(path), "sha256": _sha256(path), "rows": len(rows)}


def _display_path(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path(__file__).parent))
    return str(path)


def _sha256(path: Path) -> str:
    try:
        from vsteer.data import file_sha256

        return file_sha256(path)
    except ImportError:
        import hashlib

        return hashlib.sha256(path.read_bytes()).hexdigest()
