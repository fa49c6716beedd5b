"""Build the training files in ``vsteer/data/train`` from the shipped data. Deterministic; no randomness.

Run after ``scripts/vendor_data.py``: ``python scripts/make_training_data.py``. It rewrites every file in
``vsteer/data/train`` and the manifest ``vsteer/data/SHA256SUMS``.

* ``imdb_positive_sft`` / ``imdb_positive_sft_eval``: TRL prompt-completion records from the positive
  IMDB reviews (``<br />`` removed, whitespace collapsed). The prompt is a review's first 8 words, the
  completion a space plus the next 48 words (a review needs at least 8 + 40 words to be used). Reviews with
  id divisible by 5 go to the eval file, the others to the training file (``vsteer.data.imdb_held_out``).
* ``caa_<behaviour>_dpo``: TRL conversational preference records from each CAA behaviour's ``generate``
  split; ``chosen`` is the answer matching the behaviour, ``rejected`` the other. The ``test`` split stays
  held out: a generate item whose question also appears in the test split would be dropped (none do).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vendor_data import DATA, write_data, write_manifest  # noqa: E402

from vsteer.data import caa_ab, caa_behaviours, imdb  # noqa: E402

PROMPT_WORDS = 8
COMPLETION_WORDS = 48
MIN_COMPLETION_WORDS = 40


def sft_record(text: str) -> dict | None:
    words = text.split()
    completion = words[PROMPT_WORDS : PROMPT_WORDS + COMPLETION_WORDS]
    if len(completion) < MIN_COMPLETION_WORDS:
        return None
    return {"prompt": " ".join(words[:PROMPT_WORDS]), "completion": " " + " ".join(completion)}


def dpo_record(item) -> dict:
    return {
        "prompt": [{"role": "user", "content": item.question}],
        "chosen": [{"role": "assistant", "content": item.matching}],
        "rejected": [{"role": "assistant", "content": item.not_matching}],
    }


def write_jsonl(name: str, records: list[dict]) -> None:
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path = write_data(DATA / "train" / f"{name}.jsonl", raw)
    print(f"{path.relative_to(DATA)}: {len(records)} records")


def main() -> None:
    train_dir = DATA / "train"
    for old in train_dir.glob("*.jsonl*"):
        old.unlink()
    for split, name in (("train", "imdb_positive_sft"), ("eval", "imdb_positive_sft_eval")):
        records = [r for text, _ in imdb(label=1, split=split) if (r := sft_record(text))]
        write_jsonl(name, records)
    for behaviour in caa_behaviours():
        held_out = {item.question for item in caa_ab(behaviour, "test")}
        items = [item for item in caa_ab(behaviour, "generate") if item.question not in held_out]
        dropped = len(caa_ab(behaviour, "generate")) - len(items)
        if dropped:
            print(f"{behaviour}: dropped {dropped} generate items that are also in the test split")
        write_jsonl(f"caa_{behaviour}_dpo", [dpo_record(item) for item in items])
    write_manifest()


if __name__ == "__main__":
    main()
