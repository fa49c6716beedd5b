"""Build ``vsteer/data/formality/pavlick_formality.csv.gz`` from a tanikina/text-formality snapshot.

The sentences are Pavlick & Tetreault's online formality corpus (TACL 2016: sentences from news,
blogs, emails and Yahoo Answers, each rated by five crowdworkers from -3, very informal, to +3, very
formal; released under CC BY 3.0 as its Hugging Face dataset card ``osyvokon/pavlick-formality-scores``
states). The repository tanikina/text-formality (its report "Towards Text Formality Annotation with
LLMs and Traditional Approaches") drew 1,000 of its sentences with seed 42 and mapped the mean rating linearly to
0..1 (``(mean + 3) / 6``, two decimals) in ``data/pavlick_formality/{train,validation,test}.csv``. Those
rows are copied unchanged, in file order (train, validation, test), with their file as ``split``:
``split,score,text``. Nothing is filtered here; the formal/informal rule lives in
``vsteer.data.contrasts.formality_pairs``.

    python scripts/make_formality_data.py TEXT_FORMALITY_DIR   # a checkout of tanikina/text-formality
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import sys
from pathlib import Path

SPLITS = ("train", "validation", "test")
OUT = Path(__file__).resolve().parents[1] / "vsteer" / "data" / "formality"


def rows(root: Path) -> list[tuple[str, str, str]]:
    out = []
    for split in SPLITS:
        path = root / "data" / "pavlick_formality" / f"{split}.csv"
        print(f"{path.relative_to(root)}: sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}")
        for i, row in enumerate(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))):
            score, text = row.get("label"), (row.get("text") or "").strip()
            if not text or score is None or not 0.0 <= float(score) <= 1.0:
                sys.exit(f"{path} row {i + 2} is not 'label,text' with a label in 0..1: {row!r:.80}")
            out.append((split, score, text))
    return out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/make_formality_data.py TEXT_FORMALITY_DIR")
    data = rows(Path(sys.argv[1]))
    if len({t for _, _, t in data}) != len(data):
        sys.exit("duplicate sentences in the source files")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["split", "score", "text"])
    writer.writerows(data)
    OUT.mkdir(parents=True, exist_ok=True)
    target = OUT / "pavlick_formality.csv.gz"
    target.write_bytes(gzip.compress(buf.getvalue().encode("utf-8"), mtime=0))
    content = hashlib.sha256(gzip.decompress(target.read_bytes())).hexdigest()
    print(f"{target}: {len(data)} rows, content sha256 {content} (SHA256SUMS)")


if __name__ == "__main__":
    main()
