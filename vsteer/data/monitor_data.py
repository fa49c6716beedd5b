"""Data for monitors and conditional steering: harmful and harmless requests, paired replies.

Files under ``vsteer/data/monitor/`` (sources, licences and the selection rules in
``vsteer/data/SOURCES.md``), derived from the shared snapshot by :func:`build` (run once at
development time: ``python -m vsteer.data.monitor_data build SHARED_DATA_DIR``):

- :func:`advbench_goals`: the 520 AdvBench harmful requests (Zou et al. 2023, MIT)
- :func:`jbb_goals`: the 100 JailbreakBench JBB-Behaviors harmful requests, with categories (MIT)
- :func:`helpful_requests`: 400 distinct opening human turns of HH-RLHF helpful-base test (MIT)
- :func:`harmless_pairs`: 400 single-turn HH-RLHF harmless-base test conversations with their
  chosen (less harmful) and rejected (more harmful) assistant replies, truncated (MIT)

Content warning: the harmful requests and the rejected replies are harmful by design.

:func:`split` splits any of these by item, with a seed, before anything is fitted.
"""

from __future__ import annotations

import csv
import gzip
import json
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from vsteer.errors import DataError
from vsteer.files import jsonl_rows

FILES = {
    "advbench": "monitor/advbench/goals.jsonl",
    "jbb": "monitor/jbb-behaviors/goals.jsonl",
    "helpful": "monitor/hh-rlhf/helpful_base_test_first_turns.jsonl",
    "harmless_pairs": "monitor/hh-rlhf/harmless_base_test_single_turn_pairs.jsonl",
}
N_HELPFUL, N_PAIRS, REPLY_CHARS = 400, 400, 400


@dataclass(frozen=True)
class ReplyPair:
    """One conversation: the human turn and two assistant replies; ``rejected`` is the more harmful."""

    prompt: str
    chosen: str
    rejected: str


@cache
def _rows(name: str) -> list[dict]:
    from vsteer.data.readers import data_path

    return [row for _, row in jsonl_rows(data_path(FILES[name]))]


def advbench_goals() -> list[str]:
    """The 520 AdvBench harmful requests, in file order."""
    return [r["goal"] for r in _rows("advbench")]


def jbb_goals() -> list[dict]:
    """The 100 JBB-Behaviors harmful requests: ``{"goal", "behavior", "category"}``."""
    return [dict(r) for r in _rows("jbb")]


def helpful_requests() -> list[str]:
    """400 distinct harmless requests (opening human turns of HH-RLHF helpful-base test)."""
    return [r["prompt"] for r in _rows("helpful")]


def harmless_pairs() -> list[ReplyPair]:
    """400 single-turn HH-RLHF harmless-base conversations with chosen and rejected replies."""
    return [ReplyPair(r["prompt"], r["chosen"], r["rejected"]) for r in _rows("harmless_pairs")]


def sources(*names: str) -> list[dict]:
    """``[{"path", "sha256"}]`` of the files behind ``names`` (keys of :data:`FILES`)."""
    from vsteer.data.readers import file_sha256

    return [{"path": FILES[n], "sha256": file_sha256(FILES[n])} for n in names]


def split(items, fractions=(0.5, 0.5), seed: int = 0) -> list[list]:
    """Split ``items`` by item into parts of the given fractions (a seeded permutation; each part
    keeps file order). The last part takes the remainder."""
    items = list(items)
    if not items:
        raise DataError("cannot split an empty list of items")
    if any(f <= 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise DataError(f"fractions must be positive and sum to at most 1, got {list(fractions)}")
    perm = np.random.default_rng(seed).permutation(len(items))
    out, start = [], 0
    for i, f in enumerate(fractions):
        stop = (
            len(items)
            if i == len(fractions) - 1 and abs(sum(fractions) - 1) < 1e-9
            else start + int(round(f * len(items)))
        )
        out.append([items[j] for j in sorted(perm[start:stop])])
        start = stop
    return out


# ----------------------------------------------------------------------------------------------
# development time: derive the shipped files from the shared snapshot
# ----------------------------------------------------------------------------------------------
def _turns(transcript: str) -> list[tuple[str, str]]:
    """``[(role, text)]`` of an HH-RLHF transcript (``\\n\\nHuman: ...\\n\\nAssistant: ...``)."""
    out = []
    for chunk in transcript.split("\n\n"):
        for role in ("Human", "Assistant"):
            if chunk.startswith(role + ":"):
                out.append((role, chunk[len(role) + 1 :].strip()))
                break
        else:
            if out:  # a paragraph break inside a turn
                out[-1] = (out[-1][0], out[-1][1] + "\n\n" + chunk)
    return out


def _truncate(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    cut = text[:n].rsplit(" ", 1)[0]
    return cut if cut else text[:n]


def build(shared: str | Path) -> list[Path]:
    """Write the files of :data:`FILES` (and the licences) from the shared snapshot ``shared``."""
    from vsteer.data.readers import data_path

    shared = Path(shared)
    root = data_path("SOURCES.md").parent
    written = []

    def put(rel: str, rows: list[dict]) -> None:
        raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if len(raw) > 16 * 1024:  # the package's storage rule (SOURCES.md)
            dst = dst.with_name(dst.name + ".gz")
            raw = gzip.compress(raw, compresslevel=9, mtime=0)
        dst.write_bytes(raw)
        written.append(dst)

    with open(shared / "advbench/harmful_behaviors.csv", newline="", encoding="utf-8") as f:
        put(FILES["advbench"], [{"goal": r["goal"]} for r in csv.DictReader(f)])
    with open(shared / "jbb-behaviors/behaviors.csv", newline="", encoding="utf-8") as f:
        put(
            FILES["jbb"],
            [
                {"goal": r["Goal"], "behavior": r["Behavior"], "category": r["Category"]}
                for r in csv.DictReader(f)
            ],
        )

    seen, helpful = set(), []
    for _, r in jsonl_rows(shared / "hh-rlhf/helpful-base/test.jsonl.gz"):
        turns = _turns(r["chosen"])
        if turns and turns[0][0] == "Human" and turns[0][1] and turns[0][1] not in seen:
            seen.add(turns[0][1])
            helpful.append({"prompt": turns[0][1]})
        if len(helpful) == N_HELPFUL:
            break
    put(FILES["helpful"], helpful)

    pairs = []
    for _, r in jsonl_rows(shared / "hh-rlhf/harmless-base/test.jsonl.gz"):
        c, j = _turns(r["chosen"]), _turns(r["rejected"])
        if len(c) != 2 or len(j) != 2 or [t[0] for t in c + j] != ["Human", "Assistant"] * 2:
            continue  # single-turn conversations only: one human turn, one reply
        if c[0][1] != j[0][1] or not c[1][1] or not j[1][1] or c[1][1] == j[1][1]:
            continue
        pairs.append(
            {
                "prompt": c[0][1],
                "chosen": _truncate(c[1][1], REPLY_CHARS),
                "rejected": _truncate(j[1][1], REPLY_CHARS),
            }
        )
        if len(pairs) == N_PAIRS:
            break
    put(FILES["harmless_pairs"], pairs)

    for src, dst in (
        ("advbench/LICENSE", "monitor/advbench/LICENSE"),
        ("jbb-behaviors/LICENSE", "monitor/jbb-behaviors/LICENSE"),
        ("hh-rlhf/LICENSE", "monitor/hh-rlhf/LICENSE"),
    ):
        (root / dst).write_bytes((shared / src).read_bytes())
        written.append(root / dst)
    return written


if __name__ == "__main__":  # python -m vsteer.data.monitor_data build SHARED_DATA_DIR
    if len(sys.argv) != 3 or sys.argv[1] != "build":
        sys.exit("usage: python -m vsteer.data.monitor_data build SHARED_DATA_DIR")
    for path in build(sys.argv[2]):
        print(path)
