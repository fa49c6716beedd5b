"""The result object every experiment returns: records, Markdown, a plot, and verdicts.

Experiments never print. The CLI and the report render these objects.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vsteer.evaluate import Finding
from vsteer.files import atomic_write


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def records_to_markdown(
    records: list[dict], columns: list[str] | None = None, max_rows: int | None = None
) -> str:
    """A Markdown table of plain records (dicts with the same keys)."""
    if not records:
        return "_no records_"
    columns = columns or list(records[0])
    rows = records if max_rows is None else records[:max_rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    if max_rows is not None and len(records) > max_rows:
        lines.append(f"\n_{len(records) - max_rows} more rows in results.json_")
    return "\n".join(lines)


@dataclass
class ExperimentResult:
    """Records (plain dicts), verdicts, metadata and an optional plotting function.

    ``plotter(records, path)`` draws the experiment's figure into ``path`` (PNG).
    ``columns`` picks and orders the columns of the Markdown table.
    """

    name: str
    title: str
    records: list[dict]
    findings: list[Finding] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    columns: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    plotter: Callable[[list[dict], Path], None] | None = field(default=None, repr=False)

    @property
    def verdicts(self) -> list:
        """The findings judged by the shipped rules (computed, never stored; see vsteer.verdicts)."""
        from vsteer.verdicts import judge

        return [judge(f) for f in self.findings]

    def verdict(self):
        """The headline verdict (the first one)."""
        return self.verdicts[0] if self.findings else None

    def to_markdown(self, max_rows: int | None = 40, verdicts: list | None = None) -> str:
        """``verdicts``: the judged findings to show (default: judged by the shipped rules)."""
        parts = [f"### {self.title}", ""]
        verdicts = self.verdicts if verdicts is None else verdicts
        for v in verdicts:
            parts.append(f"- **{v.claim}**: {v.verdict} ({v.measured} = {v.effect}; rule: {v.rule})")
        if verdicts:
            parts.append("")
        parts.extend(self.notes)
        if self.notes:
            parts.append("")
        parts.append(records_to_markdown(self.records, self.columns, max_rows))
        return "\n".join(parts)

    def plot(self, path: str | os.PathLike) -> Path | None:
        """Draw the figure into ``path`` (PNG, written atomically); None if the experiment has none."""
        if self.plotter is None:
            return None
        import matplotlib

        matplotlib.use("Agg")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.png")
        self.plotter(self.records, tmp)
        os.replace(tmp, path)
        return path

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "records": self.records,
            "findings": [f.to_dict() for f in self.findings],
            "meta": self.meta,
            "notes": self.notes,
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        """The measurements and, for reading, the verdicts the shipped rules give them."""
        data = {**self.to_dict(), "verdicts": [v.to_dict() for v in self.verdicts]}
        return atomic_write(path, json.dumps(data, indent=2, default=str))
