"""A cache of finished pieces of a run (adapters, vectors, experiment results), keyed by inputs.

A piece's key is the SHA-256 of its inputs (JSON). A piece is written into a temporary
directory next to its final place and renamed when complete, so a run killed halfway leaves
either a finished piece or nothing that is ever picked up; the rerun redoes only what is
missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

DONE = "piece.json"


def piece_key(kind: str, inputs: dict) -> str:
    blob = json.dumps({"kind": kind, "inputs": inputs}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


class PieceCache:
    """Finished pieces under ``root/<kind>-<hash>/`` with a ``piece.json`` written last."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits: list[str] = []
        self.misses: list[str] = []

    def path(self, kind: str, inputs: dict) -> Path:
        return self.root / piece_key(kind, inputs)

    def get(self, kind: str, inputs: dict) -> dict | None:
        done = self.path(kind, inputs) / DONE
        if not done.is_file():
            return None
        try:
            return json.loads(done.read_text())
        except json.JSONDecodeError:
            return None

    def run(self, kind: str, inputs: dict, compute: Callable[[Path], dict]) -> tuple[dict, Path]:
        """Return the finished piece for these inputs, computing it (into a temp dir) if missing.

        ``compute(workdir)`` writes any files into ``workdir`` and returns a JSON-able dict.
        """
        final = self.path(kind, inputs)
        found = self.get(kind, inputs)
        if found is not None:
            self.hits.append(final.name)
            return found, final
        self.misses.append(final.name)
        work = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{final.name}."))
        try:
            result = compute(work)
            (work / DONE).write_text(json.dumps({"inputs": inputs, "result": result}, default=str))
            if final.exists():  # an incomplete leftover without piece.json
                shutil.rmtree(final)
            os.replace(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return {"inputs": inputs, "result": result}, final

    def clean_partial(self) -> int:
        """Remove temporary directories left by killed runs."""
        n = 0
        for p in self.root.glob(".*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n
