"""The main job: every claim experiment on one model, one report.

``vsteer run recipes/claims.yaml [--set profile=full] [--only adapters,probes]`` runs the
sections below, caches each finished piece (a section's results and plots, each trained
adapter) under ``<output_dir>/<name>/cache/`` keyed by its inputs, and writes
``report.md``, ``results.json`` and the plots. A run killed halfway resumes from the finished
pieces; a piece is never half-written.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import os
import platform
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from vsteer.errors import RecipeError
from vsteer.experiments.result import ExperimentResult

SECTIONS = ("adapters", "steering", "swaps", "probes", "patching", "basis")

# Sizes per profile. "cpu" finishes in about 15 minutes on 2 CPU cores; "full" is for a GPU.
PROFILES: dict[str, dict[str, dict]] = {
    "cpu": {
        "adapters": {
            "seeds": [0, 1],
            "seed_arms": ["v", "qk"],
            "dpo_seeds": [0],
            "dpo_arms": ["v", "qk"],
            "sft_steps": 6,
            "dpo_steps": 6,
            "checkpoints": [3],
            "n_prompts": 24,
            "max_new_tokens": 20,
            "n_mmlu": 32,
            "n_wiki_windows": 4,
            "wiki_window": 96,
            "sft_overrides": ["data.n_eval=8", "training.learning_rate=5e-3", "training.max_length=64"],
            "dpo_overrides": ["data.n_eval=8", "training.batch_size=4"],
        },
        "steering": {
            "behaviours": ["myopic-reward", "refusal"],
            "personas": [],
            "scales": [-2.0, 0.0, 2.0],
            "n_extract": 40,
            "n_select": 12,
            "n_test": 50,
            "n_prompts": 24,
            "max_new_tokens": 20,
            "sentiment_pairs": 150,
        },
        "swaps": {"n_pairs": 8},
        "probes": {"n_train": 400, "n_test": 300},
        "patching": {},
        "basis": {"n_items": 300},
    },
    "full": {
        "adapters": {
            "seeds": [0, 1, 2],
            "sft_steps": 60,
            "dpo_steps": 60,
            "checkpoints": [10, 20, 40],
            "n_prompts": 128,
            "n_mmlu": 570,
            "n_wiki_windows": 32,
        },
        "steering": {
            "behaviours": [
                "sycophancy",
                "myopic-reward",
                "corrigible-neutral-HHH",
                "survival-instinct",
                "coordinate-other-ais",
                "refusal",
                "hallucination",
            ],
            "personas": ["agreeableness", "extraversion", "neuroticism", "openness", "conscientiousness"],
            "n_extract": 300,
            "n_select": 32,
            "n_test": 50,
            "n_prompts": 100,
        },
        "swaps": {"n_pairs": None, "n_windows": 16},
        "probes": {"n_train": 3000, "n_test": 1821, "layers": "all"},
        "patching": {"layers": None, "n_sweep": 30},
        "basis": {"n_items": 2000},
    },
}

TOP_KEYS = {
    "name": str,
    "description": str,
    "model": str,
    "seed": int,
    "profile": str,
    "sections": list,
    "output_dir": str,
    "options": dict,
}


@dataclasses.dataclass
class RunSpec:
    name: str = "claims"
    description: str = ""
    model: str = "smollm2-135m-instruct"
    seed: int = 0
    profile: str = "cpu"
    sections: list = dataclasses.field(default_factory=lambda: list(SECTIONS))
    output_dir: str = "reports"
    options: dict = dataclasses.field(default_factory=dict)


def load_run_spec(source: str | os.PathLike | Mapping, overrides: Iterable[str] = ()) -> RunSpec:
    """Read and validate a run recipe (before any model loads); ``overrides`` are ``key=value``."""
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise RecipeError("a run recipe is a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"override {item!r} is not key=value")
        _set(raw, key.strip(), yaml.safe_load(value))
    for key, value in raw.items():
        if key not in TOP_KEYS:
            raise RecipeError(f"unknown key {key!r} in run recipe; expected one of {', '.join(TOP_KEYS)}")
        if not isinstance(value, TOP_KEYS[key]) or isinstance(value, bool) and TOP_KEYS[key] is int:
            raise RecipeError(f"key {key!r} must be {TOP_KEYS[key].__name__}, got {value!r}")
    spec = RunSpec(**raw)
    if spec.profile not in PROFILES:
        raise RecipeError(f"unknown profile {spec.profile!r}; expected one of {', '.join(PROFILES)}")
    for s in spec.sections:
        if s not in SECTIONS:
            raise RecipeError(f"unknown section {s!r}; expected some of {', '.join(SECTIONS)}")
    for s, opts in spec.options.items():
        if s not in SECTIONS or not isinstance(opts, dict):
            raise RecipeError(
                f"options.{s} must name a section ({', '.join(SECTIONS)}) and map keys to values"
            )
        section_options(spec, s)  # validates the keys
    return spec


def _set(raw: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"cannot set {dotted!r}: {p!r} is not a mapping")
    node[parts[-1]] = value


def _config_classes():
    from vsteer.experiments.adapters import AdapterComparisonConfig
    from vsteer.experiments.basis import BasisConfig
    from vsteer.experiments.patching import PatchConfig
    from vsteer.experiments.probing import ProbeConfig
    from vsteer.experiments.steering import SteeringOptions
    from vsteer.experiments.swaps import SwapConfig

    return {
        "adapters": AdapterComparisonConfig,
        "steering": SteeringOptions,
        "swaps": SwapConfig,
        "probes": ProbeConfig,
        "patching": PatchConfig,
        "basis": BasisConfig,
    }


_STEERING_EXTRA = ("behaviours", "personas", "sentiment")


def section_options(spec: RunSpec, section: str) -> dict:
    """Profile sizes merged with the recipe's ``options.<section>``, keys checked against the
    section's config dataclass."""
    opts = {**PROFILES[spec.profile].get(section, {}), **spec.options.get(section, {})}
    cls = _config_classes()[section]
    allowed = {f.name for f in dataclasses.fields(cls)} | (
        set(_STEERING_EXTRA) if section == "steering" else set()
    )
    for key in opts:
        if key not in allowed:
            raise RecipeError(f"unknown option {section}.{key}; expected one of {', '.join(sorted(allowed))}")
    return opts


def _make_config(section: str, opts: dict):
    cls = _config_classes()[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in opts.items():
        if k not in fields:
            continue
        default = fields[k].default
        kwargs[k] = tuple(v) if isinstance(v, list) and isinstance(default, tuple) else v
    return cls(**kwargs)


def _data_hash() -> str:
    from vsteer.data import data_path

    sums = data_path("SHA256SUMS")
    return hashlib.sha256(sums.read_bytes()).hexdigest()[:16]


def _run_section(section: str, model, tokenizer, spec: RunSpec, opts: dict, cache, progress: bool):
    config = _make_config(section, opts)
    seed = spec.seed
    if section == "adapters":
        from vsteer.experiments.adapters import run_adapter_comparison

        return [run_adapter_comparison(spec.model, config, seed=seed, cache=cache, progress=progress)]
    if section == "steering":
        from vsteer.experiments.steering import run_steering

        config.seed = seed
        config.progress = progress
        extra = {k: opts[k] for k in _STEERING_EXTRA if k in opts}
        return run_steering(model, tokenizer, opts=config, **extra)
    kw = dict(config=config, seed=seed, progress_bar=progress)
    if section == "swaps":
        from vsteer.experiments.swaps import run_swaps

        return [run_swaps(model, tokenizer, **kw)]
    if section == "probes":
        from vsteer.experiments.probing import run_probes

        return [run_probes(model, tokenizer, **kw)]
    if section == "patching":
        from vsteer.experiments.patching import run_patching

        return [run_patching(model, tokenizer, **kw)]
    from vsteer.experiments.basis import run_basis

    return [run_basis(model, tokenizer, **kw)]


def result_from_dict(d: dict) -> ExperimentResult:
    from vsteer.evaluate import Estimate, Verdict

    verdicts = [Verdict(**{**v, "effect": Estimate(**v["effect"])}) for v in d.get("verdicts", [])]
    return ExperimentResult(
        name=d["name"],
        title=d["title"],
        records=d["records"],
        verdicts=verdicts,
        meta=d.get("meta", {}),
        columns=d.get("columns"),
        notes=d.get("notes", []),
    )


def run(spec: RunSpec, only: Iterable[str] | None = None, progress: bool = True, command: str = "") -> Path:
    """Run the sections of ``spec`` and write the report; returns the path of ``report.md``."""
    from tqdm.auto import tqdm

    import vsteer
    from vsteer.models import config_fingerprint, load_model
    from vsteer.pieces import PieceCache
    from vsteer.report import write_report

    start = time.perf_counter()
    sections = [s for s in spec.sections if only is None or s in set(only)]
    out = Path(spec.output_dir) / spec.name
    cache = PieceCache(out / "cache")
    cache.clean_partial()
    model, tokenizer = load_model(spec.model)
    fingerprint = config_fingerprint(model.config)
    data_hash = _data_hash()
    results: list[ExperimentResult] = []
    plots: dict[str, Path] = {}
    timings = {}
    for section in tqdm(sections, desc="claims report", disable=not progress):
        opts = section_options(spec, section)
        inputs = {
            "section": section,
            "model": spec.model,
            "fingerprint": fingerprint,
            "options": opts,
            "seed": spec.seed,
            "version": vsteer.__version__,
            "data": data_hash,
        }
        t0 = time.perf_counter()

        def compute(work, section=section, opts=opts):
            s0 = time.perf_counter()
            rs = _run_section(section, model, tokenizer, spec, opts, cache, progress)
            for r in rs:
                r.plot(work / f"{r.name}.png")
            return {
                "results": [dict(r.to_dict(), columns=r.columns) for r in rs],
                "seconds": time.perf_counter() - s0,
            }

        piece, where = cache.run(f"section-{section}", inputs, compute)
        timings[section] = {
            "seconds": round(piece["result"]["seconds"], 1),
            "this_run_s": round(time.perf_counter() - t0, 1),
        }
        for d in piece["result"]["results"]:
            results.append(result_from_dict(d))
            png = where / f"{d['name']}.png"
            if png.is_file():
                plots[d["name"]] = png
    meta = {
        "name": spec.name,
        "model": spec.model,
        "fingerprint": fingerprint,
        "profile": spec.profile,
        "seed": spec.seed,
        "sections": sections,
        "timings": timings,
        "runtime_s": time.perf_counter() - start,
        "compute_s": sum(t["seconds"] for t in timings.values()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {_threads()}",
        "version": vsteer.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or f"vsteer run <recipe> --set profile={spec.profile}",
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
    }
    report_dir = out
    for name, png in plots.items():
        shutil.copyfile(png, report_dir / f".{name}.png.tmp")
        os.replace(report_dir / f".{name}.png.tmp", report_dir / f"{name}.png")
    return write_report(report_dir, results, meta, plots={n: report_dir / f"{n}.png" for n in plots})


def _threads() -> int:
    import torch

    return torch.get_num_threads()
