"""The main job's adapter section: value-only vs query/key-only LoRA, decided by :mod:`vsteer.compare`.

Two comparisons, each a shipped ``vsteer compare`` recipe with the profile's sizes on top:

* **style** (``compare_style_sft.yaml``): SFT on positive SST-2 sentences, scored by the
  likelihood shift of held-out positive over negative sentences relative to the base model;
* **alignment** (``compare_sentiment_dpo.yaml``): DPO toward positive IMDB review openings (the
  controlled-sentiment setting of the DPO paper), scored by the same shift on held-out pairs.

Arms ``v``, ``qk`` and the positive control ``all`` (every attention and MLP projection) train at
one effective parameter budget, each with the same learning-rate grid (chosen per arm on a val
split), then with every seed; the untrained base is the negative control. Findings use the rules
``adapters.<style|alignment>.*`` of ``vsteer/recipes/verdicts.yaml``; when a positive control does
not move its metric the section says the comparison is underpowered and draws no verdict from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from vsteer.errors import RecipeError

TASKS = ("sft", "dpo")
_LABEL = {"sft": "style", "dpo": "alignment"}


@dataclass
class AdapterComparisonConfig:
    """Which comparisons run and the recipe keys the profile overrides in each (``sft``/``dpo``:
    ``{key: value}`` with the keys of :class:`vsteer.compare.CompareSpec`)."""

    tasks: tuple[str, ...] = TASKS
    sft_recipe: str = "compare_style_sft.yaml"
    dpo_recipe: str = "compare_sentiment_dpo.yaml"
    sft: dict = field(default_factory=dict)
    dpo: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def shipped_recipe(name: str) -> Path:
    """A recipe path as given, else the file of that name shipped in ``vsteer/recipes``."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = Path(__file__).resolve().parent.parent / "recipes" / name
    if shipped.is_file():
        return shipped
    raise RecipeError(f"comparison recipe {name!r} not found (neither a file nor shipped in vsteer/recipes)")


def _overrides(values: dict) -> list[str]:
    import json

    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += [f"{key}.{k}={json.dumps(v)}" for k, v in value.items()]
        else:
            out.append(f"{key}={json.dumps(value)}")
    return out


def specs(
    config: AdapterComparisonConfig, model_name: str, device: str = "auto", dtype: str = "float32"
) -> dict:
    """``{task: CompareSpec}`` of the section (validated, before anything runs)."""
    from vsteer.compare import load_compare_recipe

    out = {}
    for task in config.tasks:
        if task not in TASKS:
            raise RecipeError(f"adapters.tasks: unknown task {task!r}; expected some of {', '.join(TASKS)}")
        recipe = shipped_recipe(config.sft_recipe if task == "sft" else config.dpo_recipe)
        extra = dict(config.sft if task == "sft" else config.dpo)
        out[task] = load_compare_recipe(
            recipe, [*_overrides(extra), f"model={model_name}", f"device={device}", f"dtype={dtype}"]
        )
    return out


def run_concurrently(by_task: dict, cache=None, progress: bool = True) -> dict:
    """``{task: CompareResult}``: the comparisons side by side in one pool of worker processes
    (the largest ``workers`` of the specs), so the jobs of one fill the other's idle tail."""
    from concurrent.futures import ThreadPoolExecutor

    from vsteer.compare import make_executor, run_compare
    from vsteer.pieces import PieceCache

    workers = max(s.workers for s in by_task.values())
    if workers <= 1 or len(by_task) == 1:
        return {task: run_compare(spec, cache=cache, progress=progress) for task, spec in by_task.items()}
    threads = max(s.threads for s in by_task.values())
    if isinstance(cache, (str, Path)):
        cache = PieceCache(cache)
    pool = make_executor(workers, threads)
    try:
        with ThreadPoolExecutor(len(by_task)) as drivers:
            futures = {
                task: drivers.submit(run_compare, spec, cache, progress, None, pool)
                for task, spec in by_task.items()
            }
            return {task: fut.result() for task, fut in futures.items()}
    finally:
        pool.shutdown(cancel_futures=True)


def run_adapter_comparison(
    model_name: str,
    config: AdapterComparisonConfig | None = None,
    seed: int = 0,
    cache=None,
    progress: bool = True,
    device: str = "auto",
    dtype: str = "float32",
):
    """Run the section's comparisons (finished runs reused from ``cache``); one ExperimentResult."""
    from vsteer.compare_result import plot_frontier
    from vsteer.experiments.result import ExperimentResult

    config = config or AdapterComparisonConfig()
    results = run_concurrently(specs(config, model_name, device, dtype), cache=cache, progress=progress)
    records, findings, notes, meta = [], [], [], {"config": config.to_dict(), "model": model_name}
    for task, res in results.items():
        label = _LABEL[task]
        for row in res.arm_records():
            records.append({"task": label, **row})
        recipe = config.sft_recipe if task == "sft" else config.dpo_recipe
        findings += res.findings(f"adapters.{label}", f"vsteer compare {Path(recipe).stem}")
        notes += [f"**{label}** ({task.upper()}, {res.seconds:.0f} s):", "", *res.notes()]
        meta[label] = res.to_dict()
    pairs = [(_LABEL[t], r) for t, r in results.items()]
    columns = [
        "task",
        "arm",
        "lr",
        "params",
        "shift",
        "ci_low",
        "ci_high",
        "seed_sd",
        "seeds_ci_low",
        "seeds_ci_high",
        "seeds",
        "kl",
        "wikitext_ppl",
        "mmlu_acc",
        "vader",
        "pref_acc",
        "train_s",
    ]
    return ExperimentResult(
        name="adapters",
        title="Adapter comparison at one parameter budget (v / qk / all projections), style SFT and alignment DPO",
        records=records,
        findings=findings,
        meta=meta,
        columns=columns,
        notes=notes,
        plotter=lambda recs, path: plot_frontier(pairs, path),
    )
