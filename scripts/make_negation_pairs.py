"""Build ``vsteer/data/condaqa/negation_pairs.jsonl.gz`` from a CondaQA snapshot (deterministic).

CondaQA (Ravichander, Gardner & Marasović, EMNLP 2022; Apache-2.0) gives each Wikipedia passage with
a negation cue together with crowdworkers' edits of its negated sentence; ``PassageEditID`` 3 is the
*affirmative* edit (the negation undone). A pair is kept when the original passage (edit 0) and its
affirmative edit split into the same number of sentences (on ``.``, ``!``, ``?`` followed by white
space), exactly one sentence differs, and that original sentence contains the passage's negation cue
(case-insensitive): ``{"passage_id", "cue", "negated", "affirmative"}``, sorted by passage id. The
published splits read are the dev file and the five few-shot test files (together the dev and test
passages; the snapshot read, commit bd4857f, lacks the train file's contents).

    python scripts/make_negation_pairs.py CONDAQA_DIR   # a checkout of AbhilashaRavichander/CondaQA
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

FILES = ["data/condaqa_dev.json"] + [
    f"data/few-shot/test_splits/conda_fewshot_test_{i}.json" for i in range(1, 6)
]
OUT = Path(__file__).resolve().parents[1] / "vsteer" / "data" / "condaqa"


def sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+", text.strip())


def pairs(root: Path) -> list[dict]:
    by: dict[int, dict[int, dict]] = collections.defaultdict(dict)
    for name in FILES:
        for line in (root / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                by[row["PassageID"]].setdefault(row["PassageEditID"], row)
    out = []
    for pid in sorted(by):
        edits = by[pid]
        if 0 not in edits or 3 not in edits:
            continue
        a, b = sentences(edits[0]["sentence1"]), sentences(edits[3]["sentence1"])
        if len(a) != len(b):
            continue
        diff = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
        cue = edits[0]["original cue"]
        if len(diff) == 1 and cue.lower() in diff[0][0].lower():
            out.append({"passage_id": pid, "cue": cue, "negated": diff[0][0], "affirmative": diff[0][1]})
    return out


def main() -> None:
    root = Path(sys.argv[1])
    for name in FILES:
        print(hashlib.sha256((root / name).read_bytes()).hexdigest(), name)
    rows = pairs(root)
    OUT.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")
    with (
        open(OUT / "negation_pairs.jsonl.gz", "wb") as f,
        gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0, filename="") as gz,
    ):
        gz.write(body)
    shutil.copyfile(root / "LICENSE", OUT / "LICENSE")
    print(f"{len(rows)} pairs; sha256 {hashlib.sha256(body).hexdigest()}")


if __name__ == "__main__":
    main()
