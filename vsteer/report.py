"""The Markdown report of a run: verdict table first, then one section per experiment with its plot.

Every number in ``report.md`` is rendered from the result objects that are also written to
``results.json``; nothing is typed in by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from vsteer.evaluate import Verdict
from vsteer.experiments.result import ExperimentResult, atomic_write

LIMITS = (
    "- One small model (135M parameters, 30 layers, 3 key/value heads) run in float32 on CPU; "
    "effects at this size need not hold for larger models, and the reverse.\n"
    "- Small samples sized for a 15-minute CPU run: intervals are wide, so *inconclusive* means "
    "the data cannot decide at this size, not that there is no effect.\n"
    "- Adapter arms are trained for few steps with few seeds; an arm that wins here may lose "
    "with longer training.\n"
    "- Scorers (VADER for sentiment, held-out A/B answer probabilities) are proxies for style "
    "and alignment, chosen to be independent of the model under test."
)


def verdict_table(rows: list[tuple[str, Verdict]]) -> str:
    lines = [
        "| claim | measured | effect [95% CI] | verdict | reproduce |",
        "|---|---|---|---|---|",
    ]
    for _section, v in rows:
        cmd = f"`{v.command}`" if v.command else ""
        lines.append(f"| {v.claim} | {v.measured} | {v.effect} | **{v.verdict}** | {cmd} |")
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    results: list[ExperimentResult],
    meta: dict,
    intro: str = "",
    plots: dict[str, Path] | None = None,
) -> Path:
    """Write ``report.md``, ``results.json`` and one PNG per experiment into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [(r.name, v) for r in results for v in r.verdicts]
    sections = []
    for r in results:
        plot = plots.get(r.name) if plots is not None else r.plot(out / f"{r.name}.png")
        body = r.to_markdown()
        if plot is not None:
            body += f"\n\n![{r.title}]({plot.name})"
        sections.append(body)
    counts = {}
    for _, v in rows:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
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
    text = "\n".join(
        header
        + [
            "## Verdicts",
            "",
            f"Verdicts: {summary}. Each verdict follows the rule written beside it in its section.",
            "",
            verdict_table(rows),
            "",
            "## Limits",
            "",
            LIMITS,
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
