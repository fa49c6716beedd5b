"""Your own data for the experiments: JSONL files, ``datasets.Dataset`` objects or lists of records.

Every loader takes a path to a JSONL file (one JSON object per line; ``.jsonl.gz`` too), a JSON file
holding a list of objects, a ``datasets.Dataset`` (or anything iterable of dicts) and checks each row
where it enters: a bad row raises :class:`vsteer.errors.DataError` with one line naming the file (or
dataset), the row and the field. The schemas (also in ``docs/experiments.md``):

=============  ==================================================================================
kind           fields of each row
=============  ==================================================================================
``ab``         ``question``, ``answer_matching_behavior``, ``answer_not_matching_behavior``
               (the Anthropic-evals / CAA field names; answers such as ``"(A)"`` or ``" Yes"``)
``labelled``   ``text`` (str), ``label`` (0 or 1)
``contrast``   ``positive``, ``negative`` (strings or chat-message lists)
``patching``   ``source``, ``donor``, ``source_entity``, ``donor_entity``, ``source_answer``,
               ``donor_answer``, optional ``relation``
=============  ==================================================================================
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from vsteer.data.readers import ABItem
from vsteer.errors import DataError
from vsteer.files import jsonl_rows

SCHEMAS: dict[str, tuple[str, ...]] = {
    "ab": ("question", "answer_matching_behavior", "answer_not_matching_behavior"),
    "labelled": ("text", "label"),
    "contrast": ("positive", "negative"),
    "patching": ("source", "donor", "source_entity", "donor_entity", "source_answer", "donor_answer"),
}
OPTIONAL = {"patching": ("relation",)}


def is_data_file(name) -> bool:
    """Whether ``name`` is a path to an existing file (a user's dataset rather than a shipped name)."""
    if not isinstance(name, str | Path):
        return False
    try:
        return Path(name).is_file()
    except OSError:
        return False


def _label(data) -> str:
    if isinstance(data, str | Path):
        return str(data)
    return f"{type(data).__name__}"


def read_rows(data) -> tuple[list[dict], str, str]:
    """``(rows, label, row_word)``: the records of ``data`` as dicts, a name for error messages and how
    rows are counted in them (``"line"`` for JSONL files, 1-based; ``"row"`` otherwise, 0-based)."""
    if isinstance(data, str | Path):
        path = Path(data)
        if not path.is_file():
            raise DataError(f"no data file {str(path)!r}; expected a JSONL file or a datasets.Dataset")
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
        if text.lstrip().startswith("["):  # a JSON list of objects
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
            return list(rows), str(path), "row"
        # keep the file's line numbers for the messages below
        return [{"__line__": n, **r} for n, r in jsonl_rows(path)], str(path), "line"
    if isinstance(data, dict):
        raise DataError("data is one dict; expected a JSONL path, a datasets.Dataset or a list of dicts")
    if not isinstance(data, Iterable):
        raise DataError(
            f"cannot read records from {type(data).__name__}; expected a JSONL path, a datasets.Dataset "
            f"or a list of dicts"
        )
    return list(data), _label(data), "row"


def _where(label: str, word: str, i: int, row) -> str:
    n = row.get("__line__", i) if isinstance(row, dict) else i
    return f"{label} {word} {n}"


def validate(data, kind: str) -> list[dict]:
    """The rows of ``data`` checked against schema ``kind`` (see :data:`SCHEMAS`): ``[{field: value}]``
    with the schema's fields (and optional ones present). Raises one :class:`DataError` line naming
    the file, the row and the field that is missing or has the wrong type."""
    if kind not in SCHEMAS:
        raise DataError(f"unknown data schema {kind!r}; expected one of: {', '.join(SCHEMAS)}")
    rows, label, word = read_rows(data)
    if not rows:
        raise DataError(f"{label} is empty; expected records with fields {', '.join(SCHEMAS[kind])}")
    out = []
    for i, row in enumerate(rows):
        where = _where(label, word, i, row)
        if not isinstance(row, dict):
            raise DataError(
                f"{where}: expected an object with {', '.join(SCHEMAS[kind])}, got {type(row).__name__}"
            )
        clean = {}
        for field in SCHEMAS[kind] + OPTIONAL.get(kind, ()):
            optional = field not in SCHEMAS[kind]
            if field not in row or (optional and row[field] in (None, "")):
                if not optional:
                    raise DataError(
                        f"{where}: missing field {field!r}; {kind} rows need {', '.join(SCHEMAS[kind])}"
                    )
                continue
            clean[field] = _check_field(where, kind, field, row[field])
        out.append(clean)
    return out


def _check_field(where: str, kind: str, field: str, value):
    if kind == "labelled" and field == "label":
        if isinstance(value, bool) or value not in (0, 1):
            raise DataError(f"{where}: field 'label' must be 0 or 1, got {value!r}")
        return int(value)
    if kind == "contrast" and isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return value  # chat messages
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {field!r} must be a non-empty string, got {value!r:.60}")
    return value


def ab_items(data) -> list[ABItem]:
    """Two-answer items from ``ab`` rows (answers stripped like the shipped readers'); a list of
    :class:`ABItem` passes through."""
    if isinstance(data, list | tuple) and data and all(isinstance(x, ABItem) for x in data):
        return list(data)
    return [
        ABItem(
            r["question"], r["answer_matching_behavior"].strip(), r["answer_not_matching_behavior"].strip()
        )
        for r in validate(data, "ab")
    ]


def labelled_texts(data) -> list[tuple[str, int]]:
    """``(text, label)`` from ``labelled`` rows; a list of ``(text, label)`` tuples passes through checked."""
    if isinstance(data, list | tuple) and data and all(isinstance(x, tuple | list) for x in data):
        data = [{"text": t, "label": y} for t, y in data]
    return [(r["text"], r["label"]) for r in validate(data, "labelled")]


def contrast_pairs(data) -> list[tuple]:
    """``(positive, negative)`` from ``contrast`` rows."""
    return [(r["positive"], r["negative"]) for r in validate(data, "contrast")]


def schema_of(data) -> str:
    """Which schema the first row of ``data`` follows (``"ab"``, ``"labelled"``, ``"contrast"``,
    ``"patching"``), judged by its fields."""
    rows, label, word = read_rows(data)
    if not rows or not isinstance(rows[0], dict):
        raise DataError(f"{label} has no rows of records")
    for kind, fields in SCHEMAS.items():
        if all(f in rows[0] for f in fields):
            return kind
    found = sorted(k for k in rows[0] if k != "__line__")
    raise DataError(
        f"{_where(label, word, 0, rows[0])}: fields {found} match no schema; expected one of "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in SCHEMAS.items())
    )


def data_source(data) -> dict:
    """Where data came from, for a vector's or a result's metadata: ``{"path", "sha256"}`` of a file, the
    ``datasets`` fingerprint of a ``Dataset``, or the SHA-256 of the records' JSON otherwise."""
    if isinstance(data, str | Path):
        from vsteer.data.readers import file_sha256

        return {"path": str(data), "sha256": file_sha256(Path(data))}
    fingerprint = getattr(data, "_fingerprint", None)
    if fingerprint:
        return {"dataset": _label(data), "fingerprint": str(fingerprint)}
    try:
        blob = json.dumps([getattr(r, "__dict__", r) for r in data], sort_keys=True, default=str)
    except TypeError:
        blob = repr(list(data))
    return {"dataset": _label(data), "sha256": hashlib.sha256(blob.encode()).hexdigest()}
