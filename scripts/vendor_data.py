"""Copy the real datasets vsteer ships from the shared snapshot into ``vsteer/data/``.

Run once at development time (never at run time): ``python scripts/vendor_data.py [SHARED_DATA_DIR]``.
It copies every file listed in ``COPIES`` byte for byte. Data files larger than 16 KiB are stored
gzip-compressed with mtime 0 (so the bytes are reproducible); licence and README files stay plain.
``vsteer/data/SHA256SUMS`` records the SHA-256 of every shipped file's *content* (decompressed for
``.gz``; for a vendored copy this equals the SHA-256 of the upstream file); ``tests/test_data.py`` checks
the package against it. The facts tables under ``facts/`` and ``wikitext-2-raw/LICENSE`` are written by
hand and the ``train/`` files by ``scripts/make_training_data.py`` (see SOURCES.md); this script only
lists them in the manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "vsteer" / "data"
GZIP_ABOVE = 16 * 1024

from vsteer.data.readers import CAA_BEHAVIOURS, PERSONA_TRAITS  # noqa: E402  (one list of names)

# (path under the shared data folder, path under vsteer/data); licence/README files are never compressed
COPIES: list[tuple[str, str]] = [
    *((f"sst2/stsa.binary.{s}", f"sst2/stsa.binary.{s}") for s in ("train", "dev", "test")),
    ("sst2/LICENSE", "sst2/LICENSE"),
    ("imdb-aclImdb/aclImdb_test_id_lt_1000.jsonl", "imdb/aclImdb_test_id_lt_1000.jsonl"),
    ("imdb-aclImdb/README", "imdb/README"),
    *(
        (f"caa/datasets/generate/{b}/generate_dataset.json", f"caa/generate/{b}/generate_dataset.json")
        for b in CAA_BEHAVIOURS
    ),
    *(
        (f"caa/datasets/test/{b}/test_dataset_ab.json", f"caa/test/{b}/test_dataset_ab.json")
        for b in CAA_BEHAVIOURS
    ),
    ("caa/datasets/test/mmlu/mmlu.json", "caa/test/mmlu/mmlu.json"),
    ("caa/LICENSE", "caa/LICENSE"),
    *((f"anthropic-evals/persona/{t}.jsonl", f"anthropic-evals/persona/{t}.jsonl") for t in PERSONA_TRAITS),
    ("anthropic-evals/persona/README.md", "anthropic-evals/persona/README.md"),
    ("anthropic-evals/LICENSE", "anthropic-evals/LICENSE"),
    ("repeng/notebooks/data/all_truncated_outputs.json", "repeng/all_truncated_outputs.json"),
    ("repeng/LICENSE", "repeng/LICENSE"),
    ("wikitext-2-raw/wiki.test.raw", "wikitext-2-raw/wiki.test.raw"),
    ("wikitext-2-raw/README.md", "wikitext-2-raw/README.md"),
]

PLAIN_NAMES = {"LICENSE", "README", "README.md"}


def write_data(dst: Path, raw: bytes) -> Path:
    """Write ``raw`` to ``dst``, or gzip-compressed to ``dst.gz`` when it is a data file over GZIP_ABOVE."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.name not in PLAIN_NAMES and len(raw) > GZIP_ABOVE:
        dst = dst.with_name(dst.name + ".gz")
        raw = gzip.compress(raw, compresslevel=9, mtime=0)
    dst.write_bytes(raw)
    return dst


def content_sha256(path: Path) -> str:
    raw = path.read_bytes()
    return hashlib.sha256(gzip.decompress(raw) if path.suffix == ".gz" else raw).hexdigest()


def write_manifest() -> None:
    """Record the content SHA-256 of every data, licence and README file under vsteer/data."""
    skip = {"SHA256SUMS", "SOURCES.md"}
    files = [
        f
        for f in sorted(DATA.rglob("*"))
        if f.is_file()
        and f.suffix not in {".py", ".pyc"}
        and "__pycache__" not in f.parts
        and f.name not in skip
    ]
    lines = [f"{content_sha256(f)}  {f.relative_to(DATA).as_posix()}\n" for f in files]
    (DATA / "SHA256SUMS").write_text("".join(lines))


def main(shared: Path) -> None:
    for src_rel, dst_rel in COPIES:
        write_data(DATA / dst_rel, (shared / src_rel).read_bytes())
    write_manifest()
    print(f"vendored {len(COPIES)} files into {DATA}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data")
