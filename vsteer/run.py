"""The main job: every claim experiment on one model, one report.

``vsteer run claims [--set profile=smoke] [--only adapters,probes]`` runs the sections below,
caches each finished piece (a section's measurements and plots, each trained adapter) under
``<output_dir>/<name>/cache/`` keyed by the content of what it is computed from (see
:mod:`vsteer.pieces`), and writes ``report.md``, ``results.json`` and the plots. Verdicts are
computed afresh from the cached findings and the verdict rules on every run
(:mod:`vsteer.verdicts`), so editing a rule recomputes nothing. A run killed halfway resumes
from the finished pieces; a piece is never half-written.

Sizes are data: a profile is ``vsteer/recipes/profiles/<name>.yaml`` (or a path to such a file),
mapping sections to the fields of their config dataclasses; ``options.<section>.<key>`` in the
recipe overrides one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from vsteer.errors import RecipeError
from vsteer.experiments.result import ExperimentResult
from vsteer.files import atomic_write, resolve_recipe

# section -> (module that computes it, its config dataclass, its run function). The module's
# code (and what it imports) is part of the section's cache key. A plain section's run function
# is called as fn(model, tokenizer, config=..., seed=..., progress_bar=...) and returns one
# ExperimentResult; "adapters" and "steering" have their own calls in _run_section.
SECTION_TABLE = {
    "adapters": ("vsteer.experiments.adapters", "AdapterComparisonConfig", "run_adapter_comparison"),
    "steering": ("vsteer.experiments.steering", "SteeringOptions", "run_steering"),
    "monitor": ("vsteer.experiments.monitoring", "MonitorOptions", "run_monitoring"),
    "swaps": ("vsteer.experiments.swaps", "SwapConfig", "run_swaps"),
    "probes": ("vsteer.experiments.probing", "ProbeConfig", "run_probes"),
    "patching": ("vsteer.experiments.patching", "PatchConfig", "run_patching"),
    "basis": ("vsteer.experiments.basis", "BasisConfig", "run_basis"),
    "persona": ("vsteer.experiments.persona", "PersonaConfig", "run_persona"),
    "entities": ("vsteer.experiments.entity_gen", "EntityGenConfig", "run_entity_gen"),
}
SECTIONS = tuple(SECTION_TABLE)
SECTION_MODULES = {name: row[0] for name, row in SECTION_TABLE.items()}

PROFILE_DIR = Path(__file__).resolve().parent / "recipes" / "profiles"

TOP_KEYS = {
    "name": str,
    "description": str,
    "model": str,
    "seed": int,
    "profile": str,
    "sections": list,
    "output_dir": str,
    "options": dict,
    "device": str,
    "dtype": str,
    "rules": str,
    "workers": int,
}


@dataclasses.dataclass
class RunSpec:
    """A run recipe. ``profile``: a shipped profile name or a profile YAML file; ``rules``: a
    verdict rules file ("" = the shipped ``vsteer/recipes/verdicts.yaml``); ``workers``: on the
    CPU, compute the sections after ``adapters`` (which trains in a pool of its own) side by side
    in this many spawned processes, the torch threads split between them (1: one after another
    in this process, as on a GPU)."""

    name: str = "claims"
    description: str = ""
    model: str = "smollm2-135m-instruct"
    seed: int = 0
    profile: str = "cpu"
    sections: list = dataclasses.field(default_factory=lambda: list(SECTIONS))
    output_dir: str = "reports"
    options: dict = dataclasses.field(default_factory=dict)
    device: str = "auto"
    dtype: str = "float32"
    rules: str = ""
    workers: int = 1


def profile_names() -> list[str]:
    """The shipped profiles (``vsteer/recipes/profiles/*.yaml``)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _profile_path(profile: str) -> Path:
    if profile in profile_names():
        return PROFILE_DIR / f"{profile}.yaml"
    path = Path(profile)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    raise RecipeError(
        f"unknown profile {profile!r}; expected one of {', '.join(profile_names())} or a profile .yaml file"
    )


def load_profile(profile: str) -> dict[str, dict]:
    """A profile's sizes ``{section: {option: value}}``, every key checked against the sections'
    config dataclasses (one clear :class:`RecipeError` line for an unknown one)."""
    path = _profile_path(profile)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"profile {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"profile {str(path)!r} must map sections to options")
    for section, opts in raw.items():
        if section not in SECTIONS:
            raise RecipeError(
                f"unknown section {section!r} in profile {path.name}; expected some of {', '.join(SECTIONS)}"
            )
        if not isinstance(opts, dict):
            raise RecipeError(f"profile {path.name}: {section} must map option names to values")
        _check_option_keys(section, opts, f"profile {path.name}")
    return raw


def load_run_spec(source: str | os.PathLike | Mapping, overrides: Iterable[str] = ()) -> RunSpec:
    """Read and validate a run recipe (before any model loads); ``overrides`` are ``key=value``."""
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = resolve_recipe(source)  # a file, or a recipe shipped in vsteer/recipes
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
    if spec.workers < 1:
        raise RecipeError(f"key 'workers' must be at least 1, got {spec.workers}")
    load_profile(spec.profile)  # validates the profile
    for s in spec.sections:
        if s not in SECTIONS:
            raise RecipeError(f"unknown section {s!r}; expected some of {', '.join(SECTIONS)}")
    for s, opts in spec.options.items():
        if s not in SECTIONS or not isinstance(opts, dict):
            raise RecipeError(
                f"options.{s} must name a section ({', '.join(SECTIONS)}) and map keys to values"
            )
        section_options(spec, s)  # validates the keys
    if spec.rules:
        from vsteer.verdicts import load_rules

        load_rules(spec.rules)
    return spec


def _set(raw: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(f"cannot set {dotted!r}: {p!r} is not a mapping")
    node[parts[-1]] = value


def _section_attr(section: str, index: int):
    import importlib

    module, *names = SECTION_TABLE[section]
    return getattr(importlib.import_module(module), names[index])


def _config_classes():
    return {section: _section_attr(section, 0) for section in SECTION_TABLE}


_STEERING_EXTRA = ("behaviours", "personas", "sentiment")
# fields of SteeringOptions that are run plumbing, not sizes
_NOT_OPTIONS = {"steering": {"seed", "progress", "log"}}


def _allowed(section: str) -> set[str]:
    cls = _config_classes()[section]
    names = {f.name for f in dataclasses.fields(cls)} - _NOT_OPTIONS.get(section, set())
    return names | (set(_STEERING_EXTRA) if section == "steering" else set())


def _check_option_keys(section: str, opts: Mapping, where: str) -> None:
    allowed = _allowed(section)
    for key in opts:
        if key not in allowed:
            raise RecipeError(
                f"unknown option {section}.{key} in {where}; expected one of {', '.join(sorted(allowed))}"
            )


def _merged(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, mappings merged key by key (a recipe's
    ``options.adapters.sft.seeds`` replaces the profile's seeds, not the whole ``sft`` mapping)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def section_options(spec: RunSpec, section: str) -> dict:
    """Profile sizes merged with the recipe's ``options.<section>`` (nested mappings key by key),
    keys checked against the section's config dataclass."""
    opts = _merged(load_profile(spec.profile).get(section, {}), spec.options.get(section, {}))
    _check_option_keys(section, spec.options.get(section, {}), "the recipe")
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


def _config_record(section: str, opts: dict) -> dict:
    """Every setting a section runs with (profile, recipe and dataclass defaults), JSON-able."""
    config = dataclasses.asdict(_make_config(section, opts))
    for k in _NOT_OPTIONS.get(section, ()):
        config.pop(k, None)
    config.update({k: opts[k] for k in _STEERING_EXTRA if k in opts and section == "steering"})
    return config


def _run_section(section: str, model, tokenizer, spec: RunSpec, opts: dict, cache, progress: bool):
    config = _make_config(section, opts)
    seed = spec.seed
    if section == "adapters":
        from vsteer.experiments.adapters import run_adapter_comparison

        kw = dict(seed=seed, cache=cache, progress=progress, device=spec.device, dtype=spec.dtype)
        return [run_adapter_comparison(spec.model, config, **kw)]
    if section == "steering":
        from vsteer.experiments.steering import run_steering

        config.seed = seed
        config.progress = progress
        extra = {k: opts[k] for k in _STEERING_EXTRA if k in opts}
        return run_steering(model, tokenizer, opts=config, **extra)
    return [_section_attr(section, 1)(model, tokenizer, config=config, seed=seed, progress_bar=progress)]


def result_from_dict(d: dict) -> ExperimentResult:
    from vsteer.evaluate import Finding

    return ExperimentResult(
        name=d["name"],
        title=d["title"],
        records=d["records"],
        findings=[Finding.from_dict(f) for f in d.get("findings", [])],
        meta=d.get("meta", {}),
        columns=d.get("columns"),
        notes=d.get("notes", []),
    )


def model_facts(model) -> dict:
    """What the report states about the model: size, layout, dtype, device."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    param = next(model.parameters())
    heads = getattr(text, "num_attention_heads", None)
    return {
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "n_layers": getattr(text, "num_hidden_layers", None),
        "n_heads": heads,
        "n_kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "d_model": getattr(text, "hidden_size", None),
        "family": getattr(text, "model_type", None),
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
    }


def section_inputs(section: str, spec: RunSpec, opts: dict, model_key: dict) -> dict:
    """Everything a section's piece is computed from, as content (its cache key)."""
    from vsteer.pieces import code_fingerprint, content_key, package_versions

    return {
        "section": section,
        "config": content_key(_config_record(section, opts)),
        "seed": spec.seed,
        "model": model_key,
        "versions": package_versions(),
        # vsteer.run too: it decides each section's seed and config (_run_section, _make_config)
        "code": code_fingerprint([SECTION_MODULES[section], "vsteer.run"]),
    }


def run(spec: RunSpec, only: Iterable[str] | None = None, progress: bool = True, command: str = "") -> Path:
    """Run the sections of ``spec`` and write the report; returns the path of ``report.md``."""
    from tqdm.auto import tqdm

    import vsteer
    from vsteer import models
    from vsteer.pieces import PieceCache, package_versions
    from vsteer.report import write_report
    from vsteer.verdicts import load_rules

    start = time.perf_counter()
    rules = load_rules(spec.rules or None)
    sections = [s for s in spec.sections if only is None or s in set(only)]
    out = Path(spec.output_dir) / spec.name
    cache = PieceCache(out / "cache")
    cache.clean_partial()
    model, tokenizer = models.load_model(spec.model, dtype=spec.dtype, device=spec.device)
    facts = model_facts(model)
    model_key = {
        "name": spec.model,
        **models.model_key(model, tokenizer),
        "dtype": facts["dtype"],
        "device": facts["device"].split(":")[0],
    }
    per_section: dict[str, list[dict]] = {}
    plots: dict[str, Path] = {}
    timings, configs, jobs = {}, {}, {}
    for section in sections:
        opts = section_options(spec, section)
        configs[section] = _config_record(section, opts)
        jobs[section] = (opts, section_inputs(section, spec, opts, model_key))
    workers, threads = _section_workers(spec, model_key["device"])
    # on the CPU the sections after adapters (which trains in a pool of its own) run side by side
    pooled = [
        s
        for s in sections
        if workers > 1 and s != "adapters" and cache.get(f"section-{s}", jobs[s][1]) is None
    ]
    if len(pooled) < 2:
        pooled = []
    bar = tqdm(total=len(sections), desc="claims report", disable=not progress)

    def record(section, piece, where, t0):
        timings[section] = {
            "seconds": round(piece["result"]["seconds"], 1),
            "this_run_s": round(time.perf_counter() - t0, 1),
        }
        per_section[section] = piece["result"]["results"]
        for d in piece["result"]["results"]:
            png = where / f"{d['name']}.png"
            if png.is_file():
                plots[d["name"]] = png
        bar.update(1)

    for section in [s for s in sections if s not in pooled]:
        opts, inputs = jobs[section]
        t0 = time.perf_counter()

        def compute(work, section=section, opts=opts):
            return _compute_section(section, model, tokenizer, spec, opts, cache, progress, work)

        piece, where = cache.run(f"section-{section}", inputs, compute)
        record(section, piece, where, t0)
    if pooled:
        _run_pooled(pooled, jobs, spec, cache, workers, threads, record, bar)
    bar.close()
    results = [result_from_dict(d) for s in sections for d in per_section[s]]
    meta = {
        "name": spec.name,
        "model": spec.model,
        "model_facts": facts,
        "weights_fingerprint": model_key["weights"],
        "fingerprint": model_key["config"],
        "profile": spec.profile,
        "config": configs,
        "seed": spec.seed,
        "sections": sections,
        "timings": timings,
        "runtime_s": time.perf_counter() - start,
        "compute_s": sum(t["seconds"] for t in timings.values()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {_threads()}"
        + (
            f"; {len(pooled)} sections side by side in {workers} processes of {threads} thread(s)"
            if pooled
            else ""
        ),
        "section_workers": workers if pooled else 1,
        "version": vsteer.__version__,
        "packages": package_versions(),
        "rules": str(spec.rules) if spec.rules else "vsteer/recipes/verdicts.yaml (shipped)",
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or f"vsteer run <recipe> --set profile={spec.profile}",
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
    }
    report_dir = out
    for name, png in plots.items():
        atomic_write(report_dir / f"{name}.png", Path(png).read_bytes())
    return write_report(
        report_dir, results, meta, plots={n: report_dir / f"{n}.png" for n in plots}, rules=rules
    )


def _compute_section(section, model, tokenizer, spec: RunSpec, opts: dict, cache, progress, work: Path):
    """One section's piece: its results (with columns) and plots written into ``work``."""
    s0 = time.perf_counter()
    rs = _run_section(section, model, tokenizer, spec, opts, cache, progress)
    for r in rs:
        r.plot(work / f"{r.name}.png")
    return {
        "results": [dict(r.to_dict(), columns=r.columns) for r in rs],
        "seconds": time.perf_counter() - s0,
    }


def _section_workers(spec: RunSpec, device: str) -> tuple[int, int]:
    """(processes, torch threads each) for the sections computed side by side: on the CPU
    ``spec.workers`` (at most one per torch thread), elsewhere 1 (one accelerator)."""
    total = _threads()
    if device != "cpu" or spec.workers <= 1 or total < 2:
        return 1, total
    workers = min(spec.workers, total)
    return workers, max(1, total // workers)


def section_job(spec_dict: dict, section: str, opts: dict, workdir: str) -> dict:
    """A section computed in a worker process (:mod:`vsteer.pool`): the model loaded there, the
    plots written into ``workdir``; returns the piece's result and the tracked files it read."""
    from vsteer import models
    from vsteer.pieces import track_reads

    spec = RunSpec(**spec_dict)
    model, tokenizer = models.load_model(spec.model, dtype=spec.dtype, device=spec.device)
    with track_reads() as reads:
        result = _compute_section(section, model, tokenizer, spec, opts, None, False, Path(workdir))
    return {"result": result, "reads": dict(reads)}


def _run_pooled(pooled, jobs, spec: RunSpec, cache, workers: int, threads: int, record, bar) -> None:
    """Compute ``pooled`` sections in a pool of ``workers`` processes; each finished one becomes
    its cached piece (with the reads its worker recorded) as soon as it is back."""
    import tempfile
    from concurrent.futures import FIRST_COMPLETED, wait

    from vsteer import pieces
    from vsteer.pool import make_executor

    pool = make_executor(workers, threads)
    pending = {}
    try:
        for section in pooled:
            opts, _ = jobs[section]
            work = tempfile.mkdtemp(dir=cache.root, prefix=f".job{pieces.temp_infix()}")
            fut = pool.submit(section_job, dataclasses.asdict(spec), section, opts, work)
            pending[fut] = (section, work, time.perf_counter())
        while pending:
            running = [s for f, (s, _, _) in pending.items() if f.running()]
            bar.set_postfix_str(f"running {', '.join(running)}; {len(pending) - len(running)} queued")
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                section, work, t0 = pending.pop(fut)
                value = fut.result()
                kind, inputs = f"section-{section}", jobs[section][1]
                piece, where = cache.adopt(kind, inputs, value["result"], work, value["reads"])
                record(section, piece, where, t0)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _threads() -> int:
    import torch

    return torch.get_num_threads()
