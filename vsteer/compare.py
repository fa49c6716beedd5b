"""Fair adapter comparisons: arms at an equal parameter budget, one learning-rate grid, seeds.

``vsteer compare RECIPE.yaml`` and the main job's ``adapters`` section run this. A comparison
trains every *arm* (a role-named LoRA target: ``v``, ``qk``, ``o``, ``qkvo``, ``all`` = every
attention and MLP projection, the positive control) on one task, at one effective trainable
parameter budget (by default the smallest budget every arm can meet, and at least the ``v`` arm
at rank ``rank``), then:

1. **selection**: every arm trains with each learning rate of ``learning_rates`` on the first
   seed; the rate with the largest primary metric on the **val** split is chosen per arm. The
   test split is not built into any evaluation until the choice is made (:func:`select_lr`
   sees val numbers only);
2. **seeds**: the other seeds train at the chosen rate; every run is scored once on the **test**
   split, and its per-item shifts are averaged over seeds before bootstrapping over items;
3. **extras** on the first seed: a frontier (primary metric on val vs per-token KL to the base
   on WikiText-2, over checkpoints), cost (WikiText-2 perplexity, MMLU A/B accuracy), VADER
   sentiment of sampled continuations (SFT), and on the positive control the **projection
   ablation**: the share of the test shift lost when the update of ``q``, ``k``, ``v``, ``o`` or
   the MLP is dropped, with relative update norms.

The primary metric is the likelihood shift of :func:`vsteer.compare_eval.shift_effect` (nats
per token, relative to the untrained base, the negative control). Runs go to worker processes
(``workers``, one thread each by default; on 2 cores two arms train side by side), and each
finished run is a cached piece keyed by the content it was computed from.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from vsteer.errors import DataError, RecipeError, VsteerError
from vsteer.pieces import CODE_EXCLUDED, temp_infix
from vsteer.pool import InlineExecutor, make_executor

ARMS = ("v", "qk", "o", "qkvo", "all")
# value-site interventions (vsteer.interventions) as arms: trained at the budget's largest rank, scored
# merged into W_V (exact at every position); v-bias has a fixed size (width x layers), below most budgets
INTERVENTION_ARMS = {"v-reft": "loreft", "v-bias": "bias"}
CONTROL = "all"


@dataclass
class CompareSpec:
    """One comparison. ``data.source``: a shipped task (``sst2-sentiment``, ``imdb-openings``) or
    ``user`` with ``train`` and ``eval`` (or ``val`` + ``test``) JSONL paths."""

    name: str = "compare"
    model: str = "smollm2-135m-instruct"
    device: str = "auto"  # auto: CUDA when available, else CPU
    dtype: str = "float32"  # the weights' dtype; training autocasts to ``precision``
    task: str = "sft"
    data: dict = field(default_factory=lambda: {"source": "sst2-sentiment"})
    arms: list = field(default_factory=lambda: ["v", "qk", "all"])
    budget: int | None = None  # effective params; None: the smallest every arm can meet (>= v at rank)
    rank: int = 8
    learning_rates: list = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    steps: int = 24
    batch_size: int = 8
    max_length: int = 64
    warmup_steps: int = 0
    beta: float = 0.1
    precision: str = "bf16"  # training autocast
    # while training (vsteer.train.training_numerics): auto = eager attention on the CPU, and under
    # autocast the frozen weights stored in its dtype (bit-identical); scoring loads the model afresh
    attention: str = "auto"
    frozen_weights: str = "auto"
    eval_precision: str = "fp32"  # scoring: bf16 rounding moves single items by up to ~0.1 nats/token
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    checkpoints: list = field(default_factory=lambda: [8, 16])
    rope: list = field(default_factory=lambda: [-0.01, 0.01])
    # shared: every seed's runs are scored on the same test items (per-item shifts averaged over
    # seeds); per-seed: seed j's runs on their own disjoint block of the test items
    # (data.n_test per label, or pairs, per block), so the same scoring buys len(seeds) times the
    # items: the power to use when items vary far more than seeds do
    test_items: str = "shared"
    ablation: bool = True
    # the ablation's five extra scorings on a fixed subset of the test split: this many items
    # per label (pairs, for paired data); null: the whole split
    ablation_items: int | None = None
    # which seeds' positive controls are ablated: first (one run) or all (each seed's run on its own
    # scored items, pooled: with test_items per-seed, len(seeds) times the items, and the seed-to-seed
    # spread of where the gain lands inside the interval)
    ablation_seeds: str = "first"
    metrics: list = field(default_factory=lambda: ["kl", "mmlu", "vader"])
    n_kl_windows: int = 8
    kl_window: int = 64
    n_mmlu: int = 32
    n_prompts: int = 24
    max_new_tokens: int = 20
    eval_batch_size: int = 32
    # DPO: the reference log-probs of the training rows computed once (TRL's precompute) and
    # given to every run, instead of a reference forward in every step of every run
    shared_reference: bool = True
    # SFT batches of similar token length (in a seeded random order): on SST-2 a random batch of 8
    # pads to 41 tokens for a mean of 24, so ~40% of the compute was padding
    length_buckets: bool = True
    workers: int = 2
    threads: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


_METRICS = ("kl", "mmlu", "vader")
_TASKS = ("sft", "dpo")
_PRECISIONS = ("fp32", "bf16", "fp16")
_TEST_ITEMS = ("shared", "per-seed")
_ABLATION_SEEDS = ("first", "all")
_SOURCE_KEYS = {"imdb-openings": ("completion_tokens",), "caa-behaviour": ("behaviour",)}


def load_compare_recipe(source: str | os.PathLike | Mapping, overrides: Iterable[str] = ()) -> CompareSpec:
    """Read and validate a comparison recipe before any model loads: a YAML path, the name of a
    shipped recipe (``compare_style_sft``), or a dict; ``overrides`` are ``key=value`` (dotted keys
    reach into ``data``)."""
    base_dir = None
    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        shipped = Path(__file__).resolve().parent / "recipes"
        for candidate in (path, shipped / path.name, shipped / f"{path.name}.yaml"):
            if candidate.is_file():  # a file, else a recipe shipped in vsteer/recipes (by name)
                path = candidate
                break
        else:
            raise RecipeError(
                f"recipe {str(path)!r} does not exist (neither a file nor shipped in vsteer/recipes)"
            )
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        base_dir = path.parent
    if not isinstance(raw, dict):
        raise RecipeError("a comparison recipe is a YAML mapping")
    raw.pop("description", None)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"override {item!r} is not key=value")
        node, parts = raw, key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    fields = CompareSpec.__dataclass_fields__
    for key in raw:
        if key not in fields:
            raise RecipeError(f"unknown comparison recipe key {key!r}; expected one of {', '.join(fields)}")
    spec = CompareSpec(**raw)
    _validate(spec, base_dir)
    return spec


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _validate(spec: CompareSpec, base_dir: Path | None) -> None:
    from vsteer.data.compare_data import SHIPPED_TASKS
    from vsteer.lora import parse_targets

    if spec.task not in _TASKS:
        raise RecipeError(f"task must be one of {', '.join(_TASKS)}, got {spec.task!r}")
    if not spec.arms or not isinstance(spec.arms, list):
        raise RecipeError(f"arms must be a non-empty list such as [v, qk, all], got {spec.arms!r}")
    for arm in spec.arms:
        if arm not in INTERVENTION_ARMS:
            parse_targets(arm)
    if len(set(spec.arms)) != len(spec.arms):
        raise RecipeError(f"arms repeat an entry: {spec.arms}")
    for key in ("precision", "eval_precision"):
        if getattr(spec, key) not in _PRECISIONS:
            raise RecipeError(f"{key} must be one of {', '.join(_PRECISIONS)}, got {getattr(spec, key)!r}")
    from vsteer.recipes import ATTENTION_CHOICES

    for key, allowed in (("attention", ATTENTION_CHOICES), ("frozen_weights", ("auto", "keep"))):
        if getattr(spec, key) not in allowed:
            raise RecipeError(f"{key} must be one of {', '.join(allowed)}, got {getattr(spec, key)!r}")
    for key in ("learning_rates", "seeds", "checkpoints", "rope", "metrics"):
        if not isinstance(getattr(spec, key), list):
            raise RecipeError(f"{key} must be a list, got {getattr(spec, key)!r}")
    if not spec.learning_rates or any(
        not _number(x) or not math.isfinite(x) or x <= 0 for x in spec.learning_rates
    ):
        raise RecipeError(
            f"learning_rates must be a non-empty list of positive numbers, got {spec.learning_rates!r}"
        )
    spec.learning_rates = [float(x) for x in spec.learning_rates]
    if not spec.seeds or any(not _integer(s) or s < 0 for s in spec.seeds):
        raise RecipeError(f"seeds must be a non-empty list of ints >= 0, got {spec.seeds!r}")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise RecipeError(f"seeds repeat an entry: {spec.seeds} (each seed is one run per arm)")
    for key in ("steps", "batch_size", "max_length", "rank", "workers", "threads", "eval_batch_size"):
        v = getattr(spec, key)
        if not _integer(v) or v < 1:
            raise RecipeError(f"{key} must be a positive int, got {v!r}")
    for key in ("warmup_steps", "n_kl_windows", "kl_window", "n_mmlu", "n_prompts", "max_new_tokens"):
        v = getattr(spec, key)
        if not _integer(v) or v < (0 if key == "warmup_steps" else 1):
            raise RecipeError(f"{key} must be an int >= {0 if key == 'warmup_steps' else 1}, got {v!r}")
    if not _number(spec.beta) or not math.isfinite(spec.beta) or spec.beta <= 0:
        raise RecipeError(f"beta must be a positive number, got {spec.beta!r}")
    if spec.test_items not in _TEST_ITEMS:
        raise RecipeError(f"test_items must be one of {', '.join(_TEST_ITEMS)}, got {spec.test_items!r}")
    if spec.ablation_seeds not in _ABLATION_SEEDS:
        raise RecipeError(
            f"ablation_seeds must be one of {', '.join(_ABLATION_SEEDS)}, got {spec.ablation_seeds!r}"
        )
    for key in ("length_buckets", "shared_reference", "ablation"):
        if not isinstance(getattr(spec, key), bool):
            raise RecipeError(f"{key} must be true or false, got {getattr(spec, key)!r}")
    if spec.ablation_items is not None and (not _integer(spec.ablation_items) or spec.ablation_items < 1):
        raise RecipeError(f"ablation_items must be a positive int or null, got {spec.ablation_items!r}")
    if spec.budget is not None and (not _integer(spec.budget) or spec.budget < 1):
        raise RecipeError(f"budget must be a positive int of parameters or null, got {spec.budget!r}")
    if any(not _integer(c) or not 0 < c < spec.steps for c in spec.checkpoints):
        raise RecipeError(
            f"checkpoints must be steps between 0 and steps={spec.steps}, got {spec.checkpoints!r}"
        )
    if not (len(spec.rope) == 2 and all(_number(x) for x in spec.rope) and spec.rope[0] <= 0 <= spec.rope[1]):
        raise RecipeError(f"rope must be [low, high] around 0 (nats per token), got {spec.rope!r}")
    for m in spec.metrics:
        if m not in _METRICS:
            raise RecipeError(f"unknown metric {m!r}; expected some of {', '.join(_METRICS)}")
    if "vader" in spec.metrics and spec.task != "sft":
        raise RecipeError(
            "metric 'vader' scores sampled continuations for the style task; it needs task: sft"
        )
    d = spec.data
    if not isinstance(d, dict) or "source" not in d:
        raise RecipeError(
            "data must be a mapping with a 'source' (sst2-sentiment, imdb-openings, caa-behaviour or user)"
        )
    source = d["source"]
    if not isinstance(source, str):
        raise RecipeError(f"data.source must be a name such as sst2-sentiment or user, got {source!r}")
    for key in ("n_train", "n_val", "n_test"):
        if key in d and (not _integer(d[key]) or d[key] < 1):
            raise RecipeError(f"data.{key} must be a positive int, got {d[key]!r}")
    if "val_fraction" in d and not (_number(d["val_fraction"]) and 0 < d["val_fraction"] < 1):
        raise RecipeError(f"data.val_fraction must be a number between 0 and 1, got {d['val_fraction']!r}")
    if source in SHIPPED_TASKS:
        if SHIPPED_TASKS[source] != spec.task:
            raise RecipeError(
                f"data source {source!r} is a {SHIPPED_TASKS[source]} task, but task is {spec.task!r}"
            )
        allowed = {"source", "n_train", "n_val", "n_test", *_SOURCE_KEYS.get(source, ())}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise RecipeError(
                f"data has unknown keys {unknown} for source {source!r}; expected some of {', '.join(sorted(allowed))}"
            )
        if source == "caa-behaviour":
            from vsteer.data.compare_data import CAA_DEFAULT_BEHAVIOUR
            from vsteer.data.readers import CAA_BEHAVIOURS

            behaviour = d.get("behaviour", CAA_DEFAULT_BEHAVIOUR)
            if behaviour not in CAA_BEHAVIOURS:
                raise RecipeError(
                    f"data.behaviour {behaviour!r} is not a CAA behaviour; expected one of {', '.join(CAA_BEHAVIOURS)}"
                )
    elif source == "user":
        if "train" not in d:
            raise DataError("data.train is required for data.source: user (a JSONL file of training rows)")
        if "eval" not in d and not ("val" in d and "test" in d):
            raise DataError(
                "a metric without data: give data.eval (split into val/test) or both data.val and data.test"
            )
        for key in ("train", "eval", "val", "test"):
            if (
                key in d
                and base_dir is not None
                and not Path(d[key]).is_absolute()
                and (base_dir / d[key]).is_file()
            ):
                d[key] = str(base_dir / d[key])
    else:
        raise RecipeError(f"unknown data source {source!r}; expected {', '.join(SHIPPED_TASKS)} or user")


# ---- data and budgets ----------------------------------------------------------------------


def build_data(spec: CompareSpec, tokenizer, seed: int = 0):
    """The task's :class:`~vsteer.data.compare_data.CompareData` (train rows, val and test items)."""
    from vsteer.data import compare_data as cd

    d = spec.data
    n_train = d.get("n_train", spec.steps * spec.batch_size)
    # per-seed: data.n_test items (per label, or pairs) for each seed's own block
    blocks = len(spec.seeds) if spec.test_items == "per-seed" else 1
    if d["source"] == "sst2-sentiment":
        return cd.sst2_sentiment(n_train, d.get("n_val", 64), d.get("n_test", 200) * blocks, seed)
    if d["source"] == "caa-behaviour":
        return cd.caa_behaviour(
            tokenizer,
            d.get("behaviour", cd.CAA_DEFAULT_BEHAVIOUR),
            n_train,
            d.get("n_val", 30),
            d.get("n_test", 100) * blocks,
            seed,
        )
    if d["source"] == "imdb-openings":
        return cd.imdb_openings(
            tokenizer,
            n_train,
            d.get("n_val", 40),
            d.get("n_test", 150) * blocks,
            d.get("completion_tokens", 24),
            seed,
        )
    data = cd.user_data(
        d["train"], spec.task, d.get("eval"), d.get("val"), d.get("test"), d.get("val_fraction", 0.3), seed
    )
    if "n_train" in d:
        data.train = data.train[: d["n_train"]]
    if blocks > 1 and len(data.test) < 2 * blocks:
        raise DataError(
            f"test_items: per-seed needs at least {2 * blocks} test items for {blocks} seeds, "
            f"the test split has {len(data.test)}"
        )
    return data


def scored_index(spec: CompareSpec, items, seed: int) -> list[int] | None:
    """The test items a run of ``seed`` is scored on: None (all of them) for
    ``test_items: shared``, else that seed's block (:func:`vsteer.compare_eval.item_blocks`)."""
    if spec.test_items != "per-seed":
        return None
    from vsteer.compare_eval import item_blocks

    return item_blocks(items, len(spec.seeds))[spec.seeds.index(seed)]


def plan_budgets(model, spec: CompareSpec) -> tuple[int, dict]:
    """(budget, {arm: AdapterPlan}): every arm at one effective parameter count (within 2%)."""
    from vsteer.interventions import plan_intervention
    from vsteer.lora import plan_adapter, resolve_targets

    minimum = {}
    for arm in spec.arms:
        if arm in INTERVENTION_ARMS:
            minimum[arm] = plan_intervention(model, INTERVENTION_ARMS[arm], "v", rank=1).trainable
            continue
        try:
            modules = resolve_targets(model, arm)
        except (VsteerError, AttributeError) as err:
            raise RecipeError(
                f"arm {arm!r} does not exist on this model ({type(model).__name__}): {err}"
            ) from None
        if not modules:
            raise RecipeError(f"arm {arm!r} matches no module of {type(model).__name__}")
        minimum[arm] = sum(m.effective(1) for m in modules)
    budget = spec.budget
    if budget is None:
        budget = max(sum(m.effective(spec.rank) for m in resolve_targets(model, "v")), *minimum.values())
    too_big = [a for a, n in minimum.items() if n > budget * 1.02]
    if too_big:
        raise RecipeError(
            f"budget {budget:,} is below what arm(s) {', '.join(too_big)} need at rank 1 "
            f"({', '.join(f'{a}: {minimum[a]:,}' for a in too_big)}); raise budget or drop the arm"
        )
    plans = {}
    for arm in spec.arms:
        if arm in INTERVENTION_ARMS:
            plans[arm] = plan_intervention(model, INTERVENTION_ARMS[arm], "v", budget, arm=arm)
            continue
        try:
            plans[arm] = plan_adapter(model, arm, budget=budget)
        except VsteerError as err:
            raise RecipeError(f"arm {arm!r} cannot meet the budget {budget:,}: {err}") from None
    return budget, plans


def select_lr(val_effects: Mapping[float, float]) -> float:
    """The learning rate with the largest val-split primary metric (ties: the smaller rate); a run
    whose metric is not finite (it diverged) is never chosen."""
    finite = {lr: v for lr, v in val_effects.items() if math.isfinite(v)}
    if not finite:
        which = "no validation results" if not val_effects else "every validation result is NaN or infinite"
        raise VsteerError(f"{which}: no learning rate to select (rates {sorted(val_effects)})")
    return max(sorted(finite), key=lambda lr: (finite[lr], -lr))


# ---- worker side ---------------------------------------------------------------------------

_WORKER: dict = {}


def _context(spec_dict: dict):
    """Per process and comparison: the spec, tokenizer and data (built once), WikiText windows.
    Kept per comparison, so a worker shared by two comparisons does not rebuild them by turns."""
    key = json.dumps(spec_dict, sort_keys=True, default=str)
    if key not in _WORKER:
        from vsteer.models import load_model

        spec = CompareSpec(**spec_dict)
        model, tok = load_model(spec.model, dtype=spec.dtype, device=spec.device)
        _WORKER[key] = dict(spec=spec, tokenizer=tok, data=build_data(spec, tok))
    return _WORKER[key]


def length_buckets(rows: list[dict], tokenizer, batch_size: int, seed: int) -> list[dict]:
    """``rows`` reordered so that consecutive runs of ``batch_size`` have similar token lengths,
    the runs in a seeded random order (train with a sequential sampler). Rows of equal length
    are ordered at random too, so every seed sees different batches."""
    rng = np.random.default_rng(seed)

    def text(row: dict) -> str:
        if "messages" in row:
            return " ".join(str(m.get("content", "")) for m in row["messages"] if isinstance(m, dict))
        return " ".join(str(v) for v in row.values() if isinstance(v, str))

    lengths = [len(tokenizer(text(r), add_special_tokens=False)["input_ids"]) for r in rows]
    order = sorted(rng.permutation(len(rows)).tolist(), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [rows[i] for b in rng.permutation(len(batches)) for i in batches[b]]


def _fresh_model(ctx):
    from vsteer.models import load_model

    spec = ctx["spec"]
    return load_model(spec.model, dtype=spec.dtype, device=spec.device)[0]


def _windows(ctx):
    if "windows" not in ctx:
        from vsteer import data
        from vsteer.experiments.swaps import wikitext_windows

        spec = ctx["spec"]
        text = "\n".join(data.wikitext2_raw())
        ctx["windows"] = wikitext_windows(ctx["tokenizer"], text, spec.n_kl_windows, spec.kl_window)
    return ctx["windows"]


def _base_kl_logp(ctx):
    if "base_logp" not in ctx:
        from vsteer.compare_eval import kl_and_ppl

        ctx["base_logp"], _ = kl_and_ppl(_fresh_model(ctx), _windows(ctx), None, ctx["spec"].eval_precision)
    return ctx["base_logp"]


def _scores(model, ctx, split: str, index: list[int] | None = None):
    """Per-item scores of ``split`` (only the items at ``index`` when given)."""
    from vsteer.compare_eval import item_logps

    spec = ctx["spec"]
    items = ctx["data"].val if split == "val" else ctx["data"].test
    if index is not None:
        items = [items[i] for i in index]
    return item_logps(
        model, ctx["tokenizer"], items, spec.max_length + 8, spec.eval_batch_size, spec.eval_precision
    )


def _index(ctx, split: str, seed: int) -> list[int] | None:
    """The items of ``split`` a run of ``seed`` is scored on (None: all)."""
    return scored_index(ctx["spec"], ctx["data"].test, seed) if split == "test" else None


def base_job(spec_dict: dict) -> dict:
    """The untrained base model's scores (negative control): val, test, cost metrics."""
    cpu0 = time.process_time()
    ctx = _context(spec_dict)
    model = _fresh_model(ctx)
    out = {"val": _scores(model, ctx, "val").tolist(), "test": _scores(model, ctx, "test").tolist()}
    out.update(_cost(model, ctx, base=True))
    out["cpu_s"] = time.process_time() - cpu0
    return out


def _cost(model, ctx, base: bool = False) -> dict:
    from vsteer.compare_eval import kl_and_ppl, vader_of_samples

    spec = ctx["spec"]
    out = {}
    kl, ppl = kl_and_ppl(model, _windows(ctx), _base_kl_logp(ctx), spec.eval_precision)
    out.update(kl=0.0 if base else kl, wikitext_ppl=ppl)
    if "mmlu" in spec.metrics:
        from vsteer import data
        from vsteer.experiments.steering import p_matching

        p = p_matching(model, ctx["tokenizer"], data.mmlu_ab()[: spec.n_mmlu], batch_size=16)
        out["mmlu_acc"] = float((p > 0.5).mean())
    if "vader" in spec.metrics:
        from vsteer import data

        prompts = data.neutral_prompts(spec.n_prompts)
        out["vader"] = vader_of_samples(model, ctx["tokenizer"], prompts, spec.max_new_tokens, 0).tolist()
    return out


def _train_recipe(spec: CompareSpec, arm: str, lr: float, seed: int, budget: int, train_file, **training):
    """The vsteer training recipe of one run."""
    return {
        "name": "adapter",
        "model": spec.model,
        "method": spec.task,
        "seed": seed,
        "data": {"train": str(train_file), "eval": None, "eval_size": 0},
        "adapter": (
            {"kind": "intervention", "intervention": INTERVENTION_ARMS[arm], "site": "v", "budget": budget}
            if arm in INTERVENTION_ARMS
            else {"targets": arm, "budget": budget, "r": spec.rank}
        ),
        "training": {
            "max_steps": spec.steps,
            "batch_size": spec.batch_size,
            "learning_rate": lr,
            "lr_scheduler": "linear",
            "warmup_steps": spec.warmup_steps,
            "max_length": spec.max_length,
            "beta": spec.beta,
            "precision": spec.precision,
            "attention": spec.attention,
            "frozen_weights": spec.frozen_weights,
            "eval_before": False,
            "save_steps": 10**6,
            "logging_steps": 10**6,
            "num_threads": spec.threads,
            **training,
        },
    }


def reference_job(spec_dict: dict, budget: int) -> dict:
    """DPO: the base model's reference log-probs of the training rows, once per comparison
    (TRL's own precompute, :func:`vsteer.train.reference_logps`); every run then trains without
    a reference forward (a quarter of a DPO step's compute)."""
    from vsteer.train import reference_logps

    cpu0 = time.process_time()
    ctx = _context(spec_dict)
    spec = ctx["spec"]
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in ctx["data"].train))
        recipe = _train_recipe(spec, spec.arms[0], spec.learning_rates[0], spec.seeds[0], budget, train_file)
        rows = reference_logps(recipe, _fresh_model(ctx), ctx["tokenizer"])
    return {"rows": rows, "cpu_s": time.process_time() - cpu0}


def train_job(
    spec_dict: dict,
    arm: str,
    lr: float,
    seed: int,
    budget: int,
    split: str,
    refs: list | None,
    workdir: str,
) -> dict:
    """Train one arm at one learning rate and seed into ``workdir``; score it on ``split``: val
    for the learning-rate search, test for the later seeds (their rate is already chosen, and
    scoring here spares a second process loading the model)."""
    import torch
    from transformers import TrainerCallback

    from vsteer.train import train_from_recipe

    cpu0 = time.process_time()
    ctx = _context(spec_dict)
    spec = ctx["spec"]
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / "train.jsonl"
    rows, sampling = ctx["data"].train, {}
    if refs is not None:  # the comparison's reference log-probs, one pair per training row
        rows = [{**r, **ref} for r, ref in zip(rows, refs, strict=True)]
    if spec.task == "sft" and spec.length_buckets:
        rows = length_buckets(rows, ctx["tokenizer"], spec.batch_size, seed)
        sampling = {"train_sampling_strategy": "sequential"}  # keep the bucketed order
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    snaps = work / "snapshots"
    snaps.mkdir(exist_ok=True)

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in spec.checkpoints and model is not None:
                sd = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                torch.save(sd, snaps / f"step-{state.global_step}.pt")

    recipe = _train_recipe(spec, arm, lr, seed, budget, train_file, **sampling)
    result = train_from_recipe(
        recipe, output_dir=work, model=_fresh_model(ctx), tokenizer=ctx["tokenizer"], callbacks=[Snapshots()]
    )
    train_file.unlink()
    model = _load_adapter(ctx, work / "adapter")
    return {
        "arm": arm,
        "lr": lr,
        "seed": seed,
        "train_loss": result.metrics.get("train_loss"),
        "train_s": result.metrics.get("train_runtime"),
        "threads": result.metrics.get("threads"),
        "precision": spec.precision,
        "effective_params": result.adapter.get("effective_params_measured"),
        "trainable_params": result.adapter.get("trainable_params_measured"),
        split: _scores(model, ctx, split, _index(ctx, split, seed)).tolist(),
        "cpu_s": time.process_time() - cpu0,  # this process's CPU time: the quiet-machine cost at 1 thread
    }


def _load_adapter(ctx, adapter_dir: Path, state: dict | None = None):
    from peft import PeftModel

    from vsteer.interventions import FILE_NAME, Intervention, merge

    model = _fresh_model(ctx)
    if (adapter_dir / FILE_NAME).is_file():  # an intervention arm, merged into W_V: exact at every position
        iv = Intervention.load(adapter_dir, model, site="v")
        if state is not None:  # a training snapshot (parameter names of the trainer's model)
            state = {k.removeprefix("vsteer_intervention.edits."): v for k, v in state.items()}
            iv.edits.load_state_dict(state)
        return merge(model, iv).eval()
    return PeftModel.from_pretrained(model, str(adapter_dir)).to(next(model.parameters()).device).eval()


def eval_job(
    spec_dict: dict, run_dir: str, extras: bool, ablation: bool, seed: int | None = None, test: bool = True
) -> dict:
    """Score a trained run of ``seed`` (default: the first) on its test items; with ``extras``
    also frontier and cost, with ``ablation`` the projection ablation and update norms; ``test``
    False skips the plain test scoring (a later seed's, done in its training process)."""
    import torch

    from vsteer.compare_eval import PROJECTION_TYPES, ablate, kl_and_ppl, update_norms

    cpu0 = time.process_time()
    ctx = _context(spec_dict)
    spec = ctx["spec"]
    run = Path(run_dir)
    model = _load_adapter(ctx, run / "adapter")
    first = spec.seeds[0] if seed is None else seed
    block = _index(ctx, "test", first)
    out = {"test": _scores(model, ctx, "test", block).tolist()} if test else {}
    if extras:
        out.update(_cost(model, ctx))
        from vsteer.interventions import FILE_NAME

        arm_is_intervention = (run / "adapter" / FILE_NAME).is_file()
        final = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        params = dict(model.named_parameters())
        frontier = []
        for step in spec.checkpoints:
            path = run / "snapshots" / f"step-{step}.pt"
            if not path.is_file():
                continue
            state = torch.load(path, weights_only=True)
            if arm_is_intervention:
                snap = _load_adapter(ctx, run / "adapter", state)
                kl, _ = kl_and_ppl(snap, _windows(ctx), _base_kl_logp(ctx), spec.eval_precision)
                frontier.append({"step": step, "kl": kl, "val": _scores(snap, ctx, "val").tolist()})
                continue
            with torch.no_grad():
                for name, tensor in state.items():
                    target = (
                        name if name in params else name.replace("base_model.model.", "base_model.model.", 1)
                    )
                    if target in params:
                        params[target].copy_(tensor)
            kl, _ = kl_and_ppl(model, _windows(ctx), _base_kl_logp(ctx), spec.eval_precision)
            frontier.append({"step": step, "kl": kl, "val": _scores(model, ctx, "val").tolist()})
        with torch.no_grad():
            for name, tensor in final.items():
                params[name].copy_(tensor)
        out["frontier"] = frontier
    if ablation:
        from vsteer.compare_eval import item_subset

        # a fixed subset of the items this seed was scored on (indices into the test split)
        block = block if block is not None else list(range(len(ctx["data"].test)))
        sub = item_subset([ctx["data"].test[i] for i in block], spec.ablation_items, seed=first)
        index = [block[i] for i in sub]
        out["ablation"], out["ablation_index"] = {}, index
        for proj in PROJECTION_TYPES:
            with ablate(model, proj) as n:
                if n:
                    out["ablation"][proj] = _scores(model, ctx, "test", index).tolist()
        out["update_norms"] = update_norms(model)
    out["cpu_s"] = time.process_time() - cpu0
    return out


# ---- orchestration -------------------------------------------------------------------------


def _common_inputs(model_key: dict, data_key: str) -> dict:
    """What every piece of one comparison is computed from besides its own options: the model,
    the data, the package versions and the code (fingerprinted once per comparison)."""
    from vsteer.pieces import code_fingerprint, package_versions

    return {
        "model": model_key,
        "data": data_key,
        "eval_data": _eval_data_key(),
        "versions": package_versions(),
        "code": code_fingerprint(
            ["vsteer.compare", "vsteer.compare_eval", "vsteer.train"], PIECE_CODE_EXCLUDED
        ),
    }


def _eval_data_key() -> str:
    """Content hash of the shipped data the evaluation reads besides the comparison's own splits
    (WikiText-2 for KL and perplexity, CAA's MMLU A/B items, the neutral review openings): the
    jobs read them in worker processes, where no read is tracked."""
    from vsteer import data

    blob = json.dumps(
        [
            data.wikitext2_raw(),
            [asdict(i) for i in data.mmlu_ab()],
            data.imdb(1, "eval"),
            data.imdb(0, "eval"),
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# the statistics and tables are computed afresh from the pieces' per-item scores on every run:
# their code is not an input of a piece (a change there retrains nothing)
PIECE_CODE_EXCLUDED = (*CODE_EXCLUDED, "vsteer.compare_result", "vsteer.compare_stats")


def _inputs(spec: CompareSpec, common: dict, **extra) -> dict:
    # fields that change which pieces run, not what a piece computes, stay out of its key (the
    # ablation's own fields go into the keys of the pieces that ablate: evaluate, ablate_later)
    skip = ("name", "workers", "arms", "seeds", "ablation", "ablation_items", "ablation_seeds")
    relevant = {k: v for k, v in spec.to_dict().items() if k not in skip}
    return {"spec": relevant, **common, **extra}


def _test_block(spec: CompareSpec, seed: int) -> dict:
    """Which test items a run of ``seed`` is scored on, for the keys of the pieces that score test
    items: ``seeds`` stays out of every key, but under ``test_items: per-seed`` a seed's block is
    fixed by its place in ``seeds`` and by how many seeds there are (:func:`scored_index`)."""
    if spec.test_items != "per-seed":
        return {}
    return {"test_block": [spec.seeds.index(seed), len(spec.seeds)]}


def run_compare(spec: CompareSpec, cache=None, progress: bool = True, log=None, executor=None):
    """Run a comparison (reusing finished runs from ``cache``: a :class:`vsteer.pieces.PieceCache`
    or a directory for one); returns a :class:`CompareResult`. The recipe, model, budgets and data
    are all checked before anything is written. ``executor``: a pool (from :func:`make_executor`)
    shared with other comparisons running in other threads, so one's idle tail is the other's
    work; by default the comparison makes and closes its own."""
    import hashlib

    from tqdm.auto import tqdm

    from vsteer.models import load_model
    from vsteer.models import model_key as model_key_of
    from vsteer.pieces import PieceCache

    t_start = time.perf_counter()
    model, tokenizer = load_model(spec.model, dtype=spec.dtype, device=spec.device)
    budget, plans = plan_budgets(model, spec)
    data = build_data(spec, tokenizer)
    if not data.train:
        raise DataError("the training set is empty")
    blob = json.dumps(
        {"train": data.train, "val": [asdict(i) for i in data.val], "test": [asdict(i) for i in data.test]},
        sort_keys=True,
    )
    data_key = hashlib.sha256(blob.encode()).hexdigest()
    model_key = model_key_of(model, tokenizer)
    common = _common_inputs(model_key, data_key)
    del model
    tmp_root = None
    if isinstance(cache, (str, os.PathLike)):  # made only now: bad input above leaves no trace
        cache = PieceCache(cache)
    if cache is None:
        tmp_root = tempfile.mkdtemp(prefix="vsteer-compare-")
        cache = PieceCache(tmp_root)
    spec_dict = spec.to_dict()
    own_executor = executor is None
    executor = make_executor(spec.workers, spec.threads) if own_executor else executor
    pending: dict[Future, tuple] = {}
    results: dict[tuple, dict] = {}
    dirs: dict[tuple, Path] = {}
    bar = tqdm(desc=f"compare {spec.name}", disable=not progress, total=0)

    def submit(key: tuple, kind: str, inputs: dict, fn, *args, workdir: Path | None = None):
        found = cache.get(kind, inputs)
        bar.total += 1
        if found is not None:
            cache.hits.append(cache.path(kind, inputs).name)
            results[key], dirs[key] = found["result"], cache.path(kind, inputs)
            bar.update(1)
            return None
        fut = executor.submit(fn, *args) if workdir is None else executor.submit(fn, *args, str(workdir))
        pending[fut] = (key, kind, inputs, workdir)
        return fut

    def finish(fut: Future):
        key, kind, inputs, workdir = pending.pop(fut)
        piece, where = cache.adopt(kind, inputs, fut.result(), workdir)
        results[key], dirs[key] = piece["result"], where
        bar.update(1)

    first = spec.seeds[0]

    shared = spec.task == "dpo" and spec.shared_reference

    def train(arm, lr, seed):
        # the first seed's runs search the learning rate (scored on val); later seeds run at the
        # chosen rate and are scored on test in the same process
        split = "val" if seed == first else "test"
        key = ("train", arm, lr, seed)
        block = _test_block(spec, seed) if split == "test" else {}
        inputs = _inputs(spec, common, arm=arm, lr=lr, seed=seed, budget=budget, split=split, **block)
        refs = results[("reference",)]["rows"] if shared else None
        work = Path(tempfile.mkdtemp(dir=cache.root, prefix=f".job{temp_infix()}"))
        args = (spec_dict, arm, lr, seed, budget, split, refs)
        submit(key, "compare-train", inputs, train_job, *args, workdir=work)

    def evaluate(arm, lr):
        key = ("train", arm, lr, first)
        abl = spec.ablation and arm == CONTROL
        extra = {"ablation_items": spec.ablation_items} if abl else {}
        extra.update(_test_block(spec, first))
        inputs = _inputs(
            spec, common, arm=arm, lr=lr, seed=first, budget=budget, extras=True, ablation=abl, **extra
        )
        submit(("eval", arm, first), "compare-eval", inputs, eval_job, spec_dict, str(dirs[key]), True, abl)

    def ablate_later(arm, lr, seed):
        # a later seed's positive control, ablated on its own scored items (ablation_seeds: all)
        key = ("train", arm, lr, seed)
        inputs = _inputs(
            spec,
            common,
            arm=arm,
            lr=lr,
            seed=seed,
            budget=budget,
            ablation=True,
            ablation_items=spec.ablation_items,
            **_test_block(spec, seed),
        )
        args = (spec_dict, str(dirs[key]), False, True, seed, False)
        submit(("ablate", arm, seed), "compare-ablate", inputs, eval_job, *args)

    try:
        if shared:  # first: the training runs wait for it
            submit(
                ("reference",),
                "compare-reference",
                _inputs(spec, common),
                reference_job,
                spec_dict,
                budget,
            )
        submit(("base",), "compare-base", _inputs(spec, common), base_job, spec_dict)
        chosen: dict[str, float] = {}
        started = False
        while True:
            if not started and (not shared or ("reference",) in results):
                started = True
                for arm in spec.arms:
                    for lr in spec.learning_rates:
                        train(arm, lr, first)
            # decide what can be decided with the results so far, then wait for the next job
            if ("base",) in results:
                base_val = np.array(results[("base",)]["val"])
                for arm in spec.arms:
                    if arm in chosen or not all(
                        ("train", arm, lr, first) in results for lr in spec.learning_rates
                    ):
                        continue
                    chosen[arm] = select_lr(
                        {
                            lr: val_effect(results[("train", arm, lr, first)]["val"], base_val, data.val)
                            for lr in spec.learning_rates
                        }
                    )
                    # the first seed's test scoring (with extras, and the control's long ablation)
                    # is queued before the later seeds' training: the longest job starts earliest
                    evaluate(arm, chosen[arm])
                    for seed in spec.seeds[1:]:
                        train(arm, chosen[arm], seed)
            for arm, lr in chosen.items():
                for seed in spec.seeds[1:]:
                    key = ("train", arm, lr, seed)
                    if key in results and ("eval", arm, seed) not in results:
                        results[("eval", arm, seed)] = {"test": results[key]["test"]}
                        if spec.ablation and spec.ablation_seeds == "all" and arm == CONTROL:
                            ablate_later(arm, lr, seed)
            if not pending:
                break
            done = next(iter(pending)) if isinstance(executor, InlineExecutor) else _wait_one(pending)
            finish(done)
    except BaseException:
        if own_executor:
            executor.shutdown(wait=False, cancel_futures=True)
        else:  # a shared pool: cancel only this comparison's queued jobs
            for fut in pending:
                fut.cancel()
        raise
    finally:
        bar.close()
    if own_executor:
        executor.shutdown()
    if tmp_root is not None:
        shutil.rmtree(tmp_root, ignore_errors=True)
    seconds = time.perf_counter() - t_start
    return CompareResult(
        spec, budget, {a: p.summary() for a, p in plans.items()}, data, results, chosen, seconds
    )


def _wait_one(pending) -> Future:
    from concurrent.futures import FIRST_COMPLETED, wait

    done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
    return next(iter(done))


def val_effect(val, base_val, items) -> float:
    d = np.asarray(val) - base_val
    labels = np.array([i.label for i in items])
    return float(d[labels == 1].mean() - d[labels == 0].mean())


from vsteer.compare_result import CompareResult  # noqa: E402  (the result object lives beside)
