"""The Markdown report of a run: verdict table first, then one section per experiment with its plot.

Every number and every statement about the run in ``report.md`` is rendered from the result
objects and the run's metadata that are also written to ``results.json``; nothing is typed in
by hand. Verdicts are judged here, from the experiments' findings and the verdict rules
(:mod:`vsteer.verdicts`), with Holm's correction over all verdicts of the report.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from vsteer.experiments.result import ExperimentResult
from vsteer.files import atomic_write
from vsteer.verdicts import ALPHA, SUPPORTED, Rule, Verdict, judge_all


def verdict_table(rows: list[tuple[str, Verdict]]) -> str:
    lines = [
        "| claim | measured | effect [95% CI] | verdict | after Holm (claim) | after Holm (report) | reproduce |",
        "|---|---|---|---|---|---|---|",
    ]
    for _section, v in rows:
        cmd = f"`{v.command}`" if v.command else ""
        holm = v.holm_verdict if v.holm_verdict is not None else ""
        claim = v.claim_verdict if v.claim_verdict is not None else ""
        cells = [_cell(v.claim), _cell(v.measured), str(v.effect), f"**{v.verdict}**", claim, holm, cmd]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Table-safe text: a bare ``|`` (as in ``p(a | b)``) would end the cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _multiplicity(rows: list[tuple[str, Verdict]]) -> str:
    from vsteer.verdicts import family

    m = len(rows)
    raw = sum(v.verdict == SUPPORTED for _, v in rows)
    kept = sum(v.holm_verdict == SUPPORTED for _, v in rows)
    per_claim = sum(v.claim_verdict == SUPPORTED for _, v in rows)
    families = len({family(v.rule_id) for _, v in rows})
    return (
        f"This report draws {m} verdicts about {families} claims. Each raw verdict reads one 95% "
        f"interval, so among {m} claims with no real effect about {m * ALPHA:.2g} would be called "
        f"*supported* by chance. Two corrections follow (Holm's step-down; a *supported* verdict "
        f"stays supported only if its adjusted one-sided p-value, a normal approximation from its "
        f"interval, is at most {ALPHA:g}, else it becomes *inconclusive*): *after Holm (claim)* "
        f"corrects within each claim's verdicts (the rule id's first part), keeping the chance of "
        f"any false *supported* about one claim at {ALPHA:g}; *after Holm (report)* corrects over "
        f"all {m}, keeping it at {ALPHA:g} for the whole report. Supported: {raw} raw, "
        f"{per_claim} after Holm per claim, {kept} after Holm over the report."
    )


def _side_by_side(meta: dict) -> str:
    n = meta.get("section_workers", 1)
    return f", summed over sections, some computed side by side in {n} processes" if n > 1 else ""


def _fmt_params(n: int | None) -> str:
    if not n:
        return "? parameters"
    return f"{n / 1e9:.3g}B parameters" if n >= 1e9 else f"{n / 1e6:.3g}M parameters"


def limits(meta: Mapping, rows: list[tuple[str, Verdict]]) -> str:
    """The Limits paragraph, every fact taken from the run's metadata and verdicts."""
    f = meta.get("model_facts", {})
    lines = [
        f"- One model (`{meta.get('model')}`: {_fmt_params(f.get('n_params'))}, {f.get('n_layers', '?')} layers, "
        f"{f.get('n_heads', '?')} query heads, {f.get('n_kv_heads', '?')} key/value heads) run in "
        f"{f.get('dtype', '?')} on {f.get('device', '?')}; effects at this size need not hold for other "
        "models, and the reverse."
    ]
    ns = sorted({v.effect.n for _, v in rows})
    size = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]} to {ns[-1]}" if ns else "no"
    lines.append(
        f"- Sample sizes from profile `{meta.get('profile')}`: each verdict's interval rests on {size} items "
        f"(per verdict in results.json); this run took {meta.get('runtime_s', 0):.0f} s "
        f"({meta.get('compute_s', 0):.0f} s of computing in the pieces it used{_side_by_side(meta)}). "
        "With wide intervals "
        "*inconclusive* means the data cannot decide at this size, not that there is no effect."
    )
    adapters = meta.get("config", {}).get("adapters")
    if adapters:
        parts = []
        for task in adapters.get("tasks", ("sft", "dpo")):
            sizes = adapters.get(task) or {}
            steps = sizes.get("steps")
            steps = f"{steps} step{'s' * (steps != 1)}" if steps is not None else "the recipe's steps"
            seeds = sizes.get("seeds")
            seeds = (
                f"seed{'s' * (len(seeds) != 1)} {', '.join(map(str, seeds))}"
                if seeds
                else "the recipe's seeds"
            )
            parts.append(f"{task.upper()} for {steps} with {seeds}")
        lines.append(
            f"- Adapter arms are trained briefly ({'; '.join(parts)}); an arm that wins here may lose "
            "with longer training."
        )
    sections = set(meta.get("config", {}))
    if sections & {"adapters", "steering"}:
        lines.append(
            "- Scorers (VADER for sentiment, held-out A/B answer probabilities) are proxies for style "
            "and alignment, chosen to be independent of the model under test."
        )
    return "\n".join(lines)


def configuration(meta: Mapping) -> str:
    """The one statement of the run's configuration: every setting of every section."""
    config = meta.get("config") or {}
    if not config:
        return ""
    lines = [
        f"Profile `{meta.get('profile')}` with the recipe's options; these are the only sizes behind "
        "the verdicts above.",
        "",
        "| section | settings |",
        "|---|---|",
    ]
    for section, settings in config.items():
        text = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in settings.items())
        lines.append(f"| {section} | {text.replace('|', '/')} |")
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    results: list[ExperimentResult],
    meta: dict,
    intro: str = "",
    plots: dict[str, Path] | None = None,
    rules: Mapping[str, Rule] | None = None,
) -> Path:
    """Write ``report.md``, ``results.json`` and one PNG per experiment into ``out_dir``.

    ``rules``: verdict rules by id (default: the shipped ``vsteer/recipes/verdicts.yaml``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    judged = judge_all([f for r in results for f in r.findings], rules)
    rows, per_result, i = [], [], 0
    for r in results:
        vs = judged[i : i + len(r.findings)]
        i += len(r.findings)
        per_result.append(vs)
        rows += [(r.name, v) for v in vs]
    sections = []
    for r, vs in zip(results, per_result, strict=True):
        plot = plots.get(r.name) if plots is not None else r.plot(out / f"{r.name}.png")
        body = r.to_markdown(verdicts=vs)
        if plot is not None:
            body += f"\n\n![{r.title}]({plot.name})"
        sections.append(body)
    counts = {}
    for _, v in rows:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"
    header = [
        f"# vsteer report: {meta.get('name', 'run')}",
        "",
        f"Model `{meta.get('model')}`, profile `{meta.get('profile')}`, seed {meta.get('seed')}, "
        f"run time {meta.get('runtime_s', 0):.0f} s on {meta.get('machine', 'this machine')}, "
        f"vsteer {meta.get('version')}, {meta.get('created')}.",
        "",
        f"Reproduce: `{meta.get('command')}`",
        "",
    ]
    if intro:
        header += [intro, ""]
    timings = meta.get("timings")
    if timings:
        header += [
            "Time per section (s, when computed; later runs reuse finished pieces): "
            + ", ".join(f"{k} {v['seconds']:.0f}" for k, v in timings.items()),
            "",
        ]
    config = configuration(meta)
    text = "\n".join(
        header
        + [
            "## Verdicts",
            "",
            f"Verdicts: {summary}. Each verdict follows the rule written beside it in its section "
            f"(rules: {meta.get('rules', 'vsteer/recipes/verdicts.yaml')}).",
            "",
            _multiplicity(rows),
            "",
            verdict_table(rows),
            "",
            *(["## Configuration", "", config, ""] if config else []),
            "## Limits",
            "",
            limits(meta, rows),
            "",
            *[s + "\n" for s in sections],
        ]
    )
    payload = {
        "meta": meta,
        "verdicts": [dict(section=s, **v.to_dict()) for s, v in rows],
        "experiments": [r.to_dict() for r in results],
    }
    atomic_write(out / "results.json", json.dumps(payload, indent=2, default=str))
    return atomic_write(out / "report.md", text)
