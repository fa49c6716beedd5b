"""The result object every experiment returns: records, Markdown, a plot, and verdicts.

Experiments never print. The CLI and the report render these objects.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vsteer.evaluate import Verdict


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


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a file so that readers see the old content or the new, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@dataclass
class ExperimentResult:
    """Records (plain dicts), verdicts, metadata and an optional plotting function.

    ``plotter(records, path)`` draws the experiment's figure into ``path`` (PNG).
    ``columns`` picks and orders the columns of the Markdown table.
    """

    name: str
    title: str
    records: list[dict]
    verdicts: list[Verdict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    columns: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    plotter: Callable[[list[dict], Path], None] | None = field(default=None, repr=False)

    def verdict(self) -> Verdict | None:
        """The headline verdict (the first one)."""
        return self.verdicts[0] if self.verdicts else None

    def to_markdown(self, max_rows: int | None = 40) -> str:
        parts = [f"### {self.title}", ""]
        for v in self.verdicts:
            parts.append(f"- **{v.claim}**: {v.verdict} ({v.measured} = {v.effect}; rule: {v.rule})")
        if self.verdicts:
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
            "verdicts": [v.to_dict() for v in self.verdicts],
            "meta": self.meta,
            "notes": self.notes,
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        return atomic_write(path, json.dumps(self.to_dict(), indent=2, default=str))
