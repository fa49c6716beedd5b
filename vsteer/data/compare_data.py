"""Data for adapter comparisons (:mod:`vsteer.compare`): training rows plus held-out scored items.

A comparison trains on ``train`` rows (TRL format: SFT ``{"text"}`` or ``{"prompt", "completion"}``,
DPO ``{"prompt", "chosen", "rejected"}``) and scores *items*: ``(prompt, text, label, group)``
where ``label`` 1 marks the target behaviour (a positive review, a chosen answer) and 0 its
contrast, and ``group`` ties the two sides of a preference pair (``None`` for unpaired SFT texts).
Held-out items are split into ``val`` (learning-rate selection) and ``test`` (the reported
numbers), which share no row.

Shipped tasks (nothing invented, sources in ``SOURCES.md``):

* ``sst2-sentiment`` (SFT): train on positive SST-2 *train* sentences; val = SST-2 *dev*, test =
  SST-2 *test* sentences, balanced positive/negative.
* ``imdb-openings`` (DPO; the controlled-sentiment setting of Rafailov et al. 2023 §6.1): prompt
  ``"Here is a movie review:"``, chosen = the first ``completion_tokens`` tokens of a positive
  IMDB review, rejected = of a negative one; train and val pairs from the training reviews (val
  pairs from reviews the comparison does not train on), test pairs from the held-out reviews
  (:func:`vsteer.data.imdb_held_out`, 200 pairs).
* ``caa-behaviour`` (DPO; ``data.behaviour``, default ``corrigible-neutral-HHH``): a behavioural
  alignment set, the CAA A/B questions (:func:`caa_behaviour`): chosen = the answer that shows
  the behaviour; test = CAA's held-out test items, then generate items not trained on.

User data: JSONL files (``.jsonl`` or ``.jsonl.gz``). ``train`` as above; ``eval`` (split into
val/test) or ``val`` + ``test``: SFT rows ``{"text" | "completion", "label": 0|1, "prompt"?}``,
DPO rows ``{"prompt", "chosen", "rejected"}``. Every bad row is reported with file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vsteer.errors import DataError
from vsteer.files import jsonl_rows

IMDB_PROMPT = "Here is a movie review:"
SHIPPED_TASKS = {"sst2-sentiment": "sft", "imdb-openings": "dpo", "caa-behaviour": "dpo"}
CAA_DEFAULT_BEHAVIOUR = "corrigible-neutral-HHH"  # data.behaviour of caa-behaviour when not given


@dataclass(frozen=True)
class Item:
    """One scored text: ``label`` 1 = target behaviour, 0 = contrast; ``group``: pair id or None."""

    prompt: str
    text: str
    label: int
    group: int | None = None


@dataclass
class CompareData:
    """Training rows and the two held-out item sets of one comparison task."""

    task: str  # "sft" | "dpo"
    train: list[dict]
    val: list[Item]
    test: list[Item]
    source: dict

    def describe(self) -> str:
        return (
            f"{self.source.get('name', 'user data')}: {len(self.train)} train rows, "
            f"{len(self.val)} val items, {len(self.test)} test items"
        )


# ---- shipped tasks -------------------------------------------------------------------------


def _balanced(pairs: list[tuple[str, int]], n_per_label: int | None, seed: int) -> list[Item]:
    rng = np.random.default_rng(seed)
    out = []
    for label in (1, 0):
        texts = [t for t, y in pairs if y == label]
        if n_per_label is not None:
            if n_per_label > len(texts):
                raise DataError(f"asked for {n_per_label} items of label {label}, only {len(texts)} exist")
            idx = np.sort(rng.choice(len(texts), size=n_per_label, replace=False))
            texts = [texts[i] for i in idx]
        out.extend(Item("", t, label) for t in texts)
    return out


def sst2_sentiment(n_train: int, n_val: int, n_test: int, seed: int = 0) -> CompareData:
    """SFT toward positive sentiment: ``n_train`` positive train sentences, ``n_val``/``n_test``
    sentences *per label* from SST-2 dev/test."""
    from vsteer.data import sst2

    positives = [s for s, y in sst2("train") if y == 1]
    # a train sentence that is also a dev or test sentence (2 of SST-2's) is never trained on; it is
    # skipped in the shuffled order, so draws that miss it (every shipped size) are unchanged
    held = {s for s, _ in sst2("dev")} | {s for s, _ in sst2("test")}
    rng = np.random.default_rng(seed)
    order = [positives[i] for i in rng.permutation(len(positives)) if positives[i] not in held]
    if n_train > len(order):
        raise DataError(
            f"n_train={n_train} exceeds the {len(order)} positive SST-2 train sentences not in dev or test"
        )
    train = [{"text": t} for t in order[:n_train]]
    return CompareData(
        "sft",
        train,
        _balanced(sst2("dev"), n_val, seed),
        _balanced(sst2("test"), n_test, seed + 1),
        {
            "name": "sst2-sentiment",
            "train": "sst2/stsa.binary.train (label 1)",
            "val": "sst2 dev",
            "test": "sst2 test",
        },
    )


def _opening(tokenizer, text: str, n_tokens: int) -> str:
    ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def imdb_openings(
    tokenizer, n_train: int, n_val: int, n_test: int, completion_tokens: int = 24, seed: int = 0
) -> CompareData:
    """DPO toward positive review openings: ``n_train`` train pairs; ``n_val``/``n_test`` held-out
    *pairs* (each pair gives one chosen and one rejected item with the same group id)."""
    from vsteer.data import imdb

    def pairs(split: str) -> list[tuple[str, str]]:
        pos = [_opening(tokenizer, t, completion_tokens) for t, _ in imdb(1, split)]
        neg = [_opening(tokenizer, t, completion_tokens) for t, _ in imdb(0, split)]
        rng = np.random.default_rng(seed + (split == "eval"))
        return list(
            zip([pos[i] for i in rng.permutation(len(pos))], [neg[i] for i in rng.permutation(len(neg))])
        )

    train_pairs, held = pairs("train"), pairs("eval")
    # a training-split opening that is also a held-out one (1 of IMDB's reviews) is never trained on
    # or validated on: its pair is skipped in the shuffled order (the shipped sizes never reach it)
    held_texts = {t for pair in held for t in pair}
    train_pairs = [(c, r) for c, r in train_pairs if c not in held_texts and r not in held_texts]
    if n_train + n_val > len(train_pairs):
        raise DataError(
            f"n_train + n_val = {n_train + n_val} exceeds the {len(train_pairs)} IMDB training-review pairs"
        )
    if n_test > len(held):
        raise DataError(f"n_test = {n_test} exceeds the {len(held)} held-out IMDB pairs")
    train = [{"prompt": IMDB_PROMPT, "chosen": c, "rejected": r} for c, r in train_pairs[:n_train]]
    return CompareData(
        "dpo",
        train,
        # val: training-split reviews this comparison never trains on; test: the held-out reviews
        _pair_items(train_pairs[n_train : n_train + n_val], IMDB_PROMPT),
        _pair_items(held[:n_test], IMDB_PROMPT),
        {"name": "imdb-openings", "completion_tokens": completion_tokens, "prompt": IMDB_PROMPT},
    )


def caa_behaviour(
    tokenizer, behaviour: str, n_train: int, n_val: int, n_test: int, seed: int = 0
) -> CompareData:
    """DPO toward a CAA behaviour (Rimsky et al. 2024, the seven A/B sets of
    :func:`vsteer.data.caa_ab`): prompt = the A/B question as the user turn of the model's chat
    template, chosen = ``" (X)"`` the answer that shows the behaviour, rejected = the other answer.
    Train and val pairs from the ``generate`` items (val: items this comparison never trains on);
    test pairs: CAA's 50 held-out ``test`` items and then ``generate`` items used for neither, up
    to ``n_test``. Every split alternates the chosen answer's letter (:func:`_alternate_letters`),
    so a letter preference can neither lower the training loss nor move the held-out shift (an
    unbalanced first run, 44 (B) vs 36 (A) in training and 13 vs 17 in val, gave every arm a
    negative val shift: it learned the letter)."""
    from vsteer.data.readers import caa_ab

    generate, test = caa_ab(behaviour, "generate"), caa_ab(behaviour, "test")
    if n_train + n_val > len(generate):
        raise DataError(
            f"n_train + n_val = {n_train + n_val} exceeds the {len(generate)} CAA {behaviour} generate items"
        )
    order = np.random.default_rng(seed).permutation(len(generate))
    # letters alternate in every split: with the chosen answer (A) as often as (B), a letter
    # preference neither lowers the training loss nor moves the held-out shift
    pool = _alternate_letters([generate[i] for i in order])
    train_items = pool[:n_train]
    rest = _alternate_letters(pool[n_train:])
    val_items = rest[:n_val]
    held = _alternate_letters(test + rest[n_val:])
    if n_test > len(held):
        raise DataError(
            f"n_test = {n_test} exceeds the {len(held)} held-out CAA {behaviour} pairs "
            f"(50 test items + generate items not used for training or val)"
        )
    held = held[:n_test]

    def prompt(item) -> str:
        messages = [{"role": "user", "content": item.question}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def pairs(items):
        return [(" " + it.matching, " " + it.not_matching) for it in items], [prompt(it) for it in items]

    train = [
        {"prompt": prompt(it), "chosen": " " + it.matching, "rejected": " " + it.not_matching}
        for it in train_items
    ]
    return CompareData(
        "dpo",
        train,
        _pair_items(*pairs(val_items)),
        _pair_items(*pairs(held)),
        {
            "name": "caa-behaviour",
            "behaviour": behaviour,
            "train": f"caa/generate/{behaviour}",
            "val": f"caa/generate/{behaviour} (not trained on)",
            "test": f"caa/test/{behaviour} + caa/generate/{behaviour} (not trained on, not val)",
        },
    )


def _alternate_letters(items: list) -> list:
    """``items`` reordered so that the chosen answer alternates (A), (B), (A), ... while both
    letters last (each letter's items keep their order; other letters, survival-instinct's
    (C)-(H), and the excess of one letter follow at the end)."""
    a = [it for it in items if it.matching == "(A)"]
    b = [it for it in items if it.matching == "(B)"]
    other = [it for it in items if it.matching not in ("(A)", "(B)")]
    n = min(len(a), len(b))
    mixed = [it for pair in zip(a[:n], b[:n]) for it in pair]
    return mixed + a[n:] + b[n:] + other


def _pair_items(pairs, prompt: str | list[str], offset: int = 0) -> list[Item]:
    out = []
    for i, (c, r) in enumerate(pairs):
        p = prompt if isinstance(prompt, str) else prompt[i]
        out += [Item(p, c, 1, offset + i), Item(p, r, 0, offset + i)]
    return out


# ---- user files ----------------------------------------------------------------------------


def read_rows(path: str | Path, what: str) -> list[dict]:
    """Rows of a JSONL file; one clear line for a missing file, a bad line or an empty file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: data file {str(path)!r} not found; expected a JSONL file")
    rows = jsonl_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows ({what} needs at least one)")
    return rows


def _text_field(path, i, row, names) -> str:
    for name in names:
        if name in row:
            value = row[name]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}:{i}: field {name!r} must be a non-empty string, got {value!r}")
            return value
    raise DataError(f"{path}:{i}: row lacks {' or '.join(map(repr, names))}; it has {sorted(row)}")


def train_rows(path, task: str) -> list[dict]:
    """Validated TRL training rows (SFT text/prompt-completion, DPO prompt-chosen-rejected)."""
    out = []
    for i, row in read_rows(path, "data.train"):
        if task == "dpo":
            out.append(
                {
                    "prompt": row.get("prompt", "")
                    if isinstance(row.get("prompt", ""), str)
                    else _bad(path, i, "prompt"),
                    "chosen": _text_field(path, i, row, ("chosen",)),
                    "rejected": _text_field(path, i, row, ("rejected",)),
                }
            )
        elif "completion" in row:
            out.append(
                {"prompt": row.get("prompt", ""), "completion": _text_field(path, i, row, ("completion",))}
            )
        else:
            out.append({"text": _text_field(path, i, row, ("text",))})
    return out


def _bad(path, i, name):
    raise DataError(f"{path}:{i}: field {name!r} must be a string")


def eval_items(path, task: str, what: str, offset: int = 0) -> list[Item]:
    """Validated scored items of a user file (see the module docstring for the row schema)."""
    items = []
    for n, (i, row) in enumerate(read_rows(path, what)):
        prompt = row.get("prompt", "")
        if not isinstance(prompt, str):
            _bad(path, i, "prompt")
        if task == "dpo":
            items += _pair_items(
                [(_text_field(path, i, row, ("chosen",)), _text_field(path, i, row, ("rejected",)))],
                prompt,
                offset + n,
            )
        else:
            label = row.get("label")
            if label not in (0, 1) or isinstance(label, bool):
                raise DataError(
                    f"{path}:{i}: 'label' must be 1 (target style) or 0 (contrast), got {label!r}"
                )
            items.append(Item(prompt, _text_field(path, i, row, ("text", "completion")), label))
    labels = {it.label for it in items}
    if labels != {0, 1}:
        raise DataError(
            f"{path}: {what} needs items of both labels (1 = target, 0 = contrast), found {sorted(labels)}"
        )
    return items


def split_items(items: list[Item], val_fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Split items (whole pairs together) into disjoint val and test sets, each with both labels."""
    keys = sorted({it.group if it.group is not None else ("i", k) for k, it in enumerate(items)}, key=str)
    rng = np.random.default_rng(seed)
    order = [keys[i] for i in rng.permutation(len(keys))]
    n_val = max(1, round(val_fraction * len(order)))
    val_keys = set(order[:n_val])
    key_of = [it.group if it.group is not None else ("i", k) for k, it in enumerate(items)]
    val = [it for it, k in zip(items, key_of) if k in val_keys]
    test = [it for it, k in zip(items, key_of) if k not in val_keys]
    for part in (val, test):
        if {it.label for it in part} != {0, 1}:
            raise DataError(
                f"data.eval has too few items to split into val and test with both labels ({len(items)} items)"
            )
    return val, test


def user_data(
    train: str,
    task: str,
    eval: str | None = None,
    val: str | None = None,
    test: str | None = None,
    val_fraction: float = 0.3,
    seed: int = 0,
) -> CompareData:
    """A comparison task from the user's JSONL files."""
    rows = train_rows(train, task)
    if val is not None and test is not None:
        v, t = eval_items(val, task, "data.val"), eval_items(test, task, "data.test", offset=10**6)
    elif eval is not None:
        v, t = split_items(eval_items(eval, task, "data.eval"), val_fraction, seed)
    else:
        raise DataError(
            "data needs held-out items: give data.eval (split into val/test) or both data.val and data.test"
        )
    return CompareData(
        task, rows, v, t, {"name": "user", "train": str(train), "eval": eval, "val": val, "test": test}
    )
