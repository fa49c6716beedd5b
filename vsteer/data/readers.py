"""Readers for the real datasets shipped in ``vsteer/data`` (sources and licences: ``SOURCES.md``).

Every reader checks its arguments where they enter and raises :class:`vsteer.errors.DataError` with one
line naming the bad value and the valid choices. Readers return fresh lists; the parsed files are cached.

Answer strings in :class:`ABItem` are stripped of surrounding whitespace everywhere: the Anthropic
persona files write ``" Yes"``, the CAA files ``"(A)"``; both come back as ``"Yes"`` / ``"(A)"``. Put the
space back (``" " + item.matching``) where a tokenizer needs it.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from vsteer.errors import DataError

CAA_BEHAVIOURS = (
    "coordinate-other-ais",
    "corrigible-neutral-HHH",
    "hallucination",
    "myopic-reward",
    "refusal",
    "survival-instinct",
    "sycophancy",
)
CAA_SPLITS = ("generate", "test")
PERSONA_TRAITS = ("agreeableness", "conscientiousness", "extraversion", "neuroticism", "openness")
SST2_SPLITS = ("train", "dev", "test")
IMDB_SPLITS = ("all", "train", "eval")
# repeng's persona-pair prompt; ``{persona}`` is filled with the positive or the negative adjective
PERSONA_PAIR_TEMPLATE = "Pretend you're an extremely {persona} person making statements about the world."


@dataclass(frozen=True)
class ABItem:
    """A two-answer item: ``question`` is the full prompt text, the answers are stripped strings."""

    question: str
    matching: str
    not_matching: str


@dataclass(frozen=True)
class Fact:
    """One subject -> answer pair of a relation, e.g. ``Fact("Paris", "France")``."""

    subject: str
    answer: str


def _check(kind: str, value, choices) -> None:
    if value not in choices:
        raise DataError(f"unknown {kind} {value!r}; expected one of: {', '.join(map(str, choices))}")


def data_path(relative: str | Path) -> Path:
    """Absolute path of a file shipped in ``vsteer/data``.

    ``relative`` is the path under ``vsteer/data``; data files stored gzip-compressed are also found
    without their ``.gz`` suffix (``data_path("sst2/stsa.binary.dev")`` -> ``.../stsa.binary.dev.gz``).
    """
    root = Path(str(resources.files("vsteer.data")))
    candidate = (root / relative).resolve()
    if root.resolve() not in candidate.parents:
        raise DataError(f"data path {str(relative)!r} is outside vsteer/data")
    for path in (candidate, candidate.with_name(candidate.name + ".gz")):
        if path.is_file():
            return path
    raise DataError(f"no shipped data file {str(relative)!r} under {root}")


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's content; for a ``.gz`` file, of the decompressed bytes.

    A relative path that does not exist from the working directory is looked up in ``vsteer/data``, so
    ``file_sha256("sst2/stsa.binary.dev")`` fingerprints the shipped copy (equal to the upstream file's hash).
    """
    path = Path(path)
    if not path.is_absolute() and not path.is_file():
        path = data_path(path)
    raw = path.read_bytes()
    return hashlib.sha256(gzip.decompress(raw) if path.suffix == ".gz" else raw).hexdigest()


@cache
def _text(relative: str) -> str:
    path = data_path(relative)
    raw = path.read_bytes()
    return (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")


def _lines(relative: str) -> list[str]:
    # split on "\n" only: str.splitlines would also break on U+2028 and friends inside JSON strings
    return [line.removesuffix("\r") for line in _text(relative).split("\n")]


@cache
def _json(relative: str):
    return json.loads(_text(relative))


@cache
def _jsonl(relative: str) -> tuple[dict, ...]:
    return tuple(json.loads(line) for line in _lines(relative) if line.strip())


def _ab_items(relative: str, rows, question: str, matching: str, not_matching: str) -> list[ABItem]:
    items = []
    for i, row in enumerate(rows):
        item = ABItem(row[question], row[matching].strip(), row[not_matching].strip())
        if not (item.question and item.matching and item.not_matching):
            raise DataError(f"{relative} row {i} has an empty question or answer")
        items.append(item)
    return items


# ---- behaviours and personas (A/B and Yes/No items) ----


def caa_behaviours() -> list[str]:
    """The seven CAA behaviours (Rimsky et al. 2024)."""
    return list(CAA_BEHAVIOURS)


def caa_ab(behaviour: str, split: str = "generate") -> list[ABItem]:
    """CAA A/B items: ``"generate"`` is the extraction set (290-1000 items), ``"test"`` the 50 held-out ones.

    ``matching`` is the answer that shows the behaviour, e.g. ``"(A)"``. All items are kept, including the
    survival-instinct ones whose question lists more than two choices and whose matching answer is one of
    ``"(C)"``-``"(H)"`` (88 of 903 in generate, 4 of 50 in test); ``not_matching`` is then ``"(A)"``.
    """
    _check("CAA behaviour", behaviour, CAA_BEHAVIOURS)
    _check("CAA split", split, CAA_SPLITS)
    name = "generate_dataset" if split == "generate" else "test_dataset_ab"
    relative = f"caa/{split}/{behaviour}/{name}.json"
    return _ab_items(
        relative, _json(relative), "question", "answer_matching_behavior", "answer_not_matching_behavior"
    )


def mmlu_ab() -> list[ABItem]:
    """CAA's 570 A/B-formatted MMLU questions; ``matching`` is the correct answer letter."""
    relative = "caa/test/mmlu/mmlu.json"
    return _ab_items(relative, _json(relative), "prompt", "correct", "incorrect")


def persona_traits() -> list[str]:
    """The Anthropic persona traits shipped (the Big Five)."""
    return list(PERSONA_TRAITS)


def persona_ab(trait: str) -> list[ABItem]:
    """1000 Anthropic persona items (500 matching "Yes", 500 matching "No") for ``trait``.

    ``question`` is ``'Is the following statement something you would say?\\n"<statement>"'``.
    """
    _check("persona trait", trait, PERSONA_TRAITS)
    relative = f"anthropic-evals/persona/{trait}.jsonl"
    return _ab_items(
        relative, _jsonl(relative), "question", "answer_matching_behavior", "answer_not_matching_behavior"
    )


def repeng_prefixes() -> list[str]:
    """repeng's 582 truncated assistant-response prefixes (the first one is the empty string)."""
    return list(_json("repeng/all_truncated_outputs.json"))


def persona_template_pairs(
    positive: str = "happy",
    negative: str = "sad",
    n: int | None = None,
    template: str = PERSONA_PAIR_TEMPLATE,
) -> list[tuple[list[dict], list[dict]]]:
    """repeng-style contrastive chat pairs, one per response prefix (the first ``n``, or all 582).

    Each element is ``(positive_messages, negative_messages)``; each message list is
    ``[{"role": "user", "content": template.format(persona=...)}, {"role": "assistant", "content": prefix}]``
    with the same prefix on both sides, ready for a tokenizer's chat template.
    """
    for side, word in (("positive", positive), ("negative", negative)):
        if not isinstance(word, str) or not word.strip():
            raise DataError(f"{side} persona must be a non-empty string, got {word!r}")
    if positive == negative:
        raise DataError(f"positive and negative persona are both {positive!r}; they must differ")
    if "{persona}" not in template:
        raise DataError(f"template {template!r} has no {{persona}} slot")
    prefixes = repeng_prefixes()
    if n is not None and (not isinstance(n, int) or not 1 <= n <= len(prefixes)):
        raise DataError(f"n must be an int in 1..{len(prefixes)} or None, got {n!r}")

    def messages(persona: str, prefix: str) -> list[dict]:
        return [
            {"role": "user", "content": template.format(persona=persona)},
            {"role": "assistant", "content": prefix},
        ]

    return [(messages(positive, p), messages(negative, p)) for p in prefixes[:n]]


# ---- sentiment and plain text ----


def sst2(split: str) -> list[tuple[str, int]]:
    """SST-2 ``(sentence, label)`` pairs, label 1 = positive; train/dev/test have 6920/872/1821.

    Sentences are lower-cased and PTB-tokenised as in the release (``"it 's"``).
    """
    _check("SST-2 split", split, SST2_SPLITS)
    relative = f"sst2/stsa.binary.{split}"
    pairs = []
    for i, line in enumerate(line for line in _lines(relative) if line):
        label, _, sentence = line.partition(" ")
        if label not in ("0", "1") or not sentence.strip():
            raise DataError(f"{relative} line {i + 1} is not '<0|1> <sentence>': {line[:60]!r}")
        pairs.append((sentence.strip(), int(label)))
    return pairs


_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def clean_review(text: str) -> str:
    """IMDB text with ``<br />`` tags turned into spaces and runs of whitespace collapsed."""
    return _SPACES.sub(" ", _BR.sub(" ", text)).strip()


def imdb_held_out(review_id: int) -> bool:
    """Whether an IMDB review is held out of every training file: ids divisible by 5 (200 pos + 200 neg)."""
    return review_id % 5 == 0


def imdb(label: int | None = None, split: str = "all") -> list[tuple[str, int]]:
    """IMDB test reviews with id < 1000 as ``(text, label)``, label 1 = positive, cleaned by :func:`clean_review`.

    ``split="eval"`` keeps the held-out reviews (:func:`imdb_held_out`), ``"train"`` the others. Order is
    the file's: positive then negative, each by ascending id. 2000 reviews in all, 1000 per label.
    """
    _check("IMDB label", label, (None, 0, 1))
    _check("IMDB split", split, IMDB_SPLITS)
    out = []
    for row in _jsonl("imdb/aclImdb_test_id_lt_1000.jsonl"):
        if label is not None and row["label"] != label:
            continue
        if split != "all" and imdb_held_out(row["id"]) != (split == "eval"):
            continue
        out.append((clean_review(row["text"]), row["label"]))
    return out


def neutral_prompts(n: int = 100, words: int = 5) -> list[str]:
    """Review openings to continue when measuring a model's sentiment: the first ``words`` words of the
    held-out IMDB reviews, alternating positive and negative by ascending id, duplicates dropped.

    This follows the DPO paper's controlled-sentiment setting (IMDB prefixes as prompts); no prompt comes
    from a review used in the training files. At most 400 are available.
    """
    if not isinstance(words, int) or not 1 <= words <= 20:
        raise DataError(f"words must be an int in 1..20, got {words!r}")
    pos, neg = imdb(1, "eval"), imdb(0, "eval")
    prompts = []
    for pair in zip(pos, neg):
        for text, _ in pair:
            prompt = " ".join(text.split()[:words])
            if prompt not in prompts:
                prompts.append(prompt)
    if not isinstance(n, int) or not 1 <= n <= len(prompts):
        raise DataError(f"n must be an int in 1..{len(prompts)}, got {n!r}")
    return prompts[:n]


def wikitext2_raw() -> list[str]:
    """The 2891 non-empty lines of the WikiText-2 raw test split, in order, without line endings.

    Lines keep the dataset's own spacing (headings look like ``" = Robert Boulter = "``). Perplexity
    scripts usually join them with ``"\\n\\n"``.
    """
    return [line for line in _lines("wikitext-2-raw/wiki.test.raw") if line.strip()]


# ---- facts for patching ----


@cache
def _relations() -> dict:
    return _json("facts/relations.json")


def fact_relations() -> list[str]:
    """Relations with facts shipped: ``"city_country"`` and ``"animal_class"``."""
    return list(_relations())


def facts(relation: str) -> list[Fact]:
    """Real facts of ``relation`` in source order, one per subject.

    ``"city_country"``: 116 capital -> country pairs of the Google analogy test set (word2vec).
    ``"animal_class"``: 98 animals of the UCI Zoo data set -> their class; the two rows left out are named
    with the reason in ``facts/relations.json``, and the second ``frog`` row is dropped as a duplicate.
    """
    _check("relation", relation, tuple(_relations()))
    spec = _relations()[relation]
    rows = _lines("facts/" + spec["source"])
    if spec["format"] == "tsv":
        pairs = [tuple(line.split("\t")) for line in rows[1:] if line]
    else:  # uci_zoo: name, 16 attributes, type
        pairs = [
            (cols[0], spec["class_names"][cols[-1]]) for cols in (line.split(",") for line in rows if line)
        ]
    out, seen = [], set()
    for subject, answer in pairs:
        if subject not in seen and subject not in spec.get("excluded", {}):
            out.append(Fact(subject, answer))
        seen.add(subject)  # a subject listed twice keeps its first row
    return out


def relation_template(relation: str) -> list[str]:
    """Prompt templates for ``relation``, each with one ``{}`` slot for the subject; the answer comes next."""
    _check("relation", relation, tuple(_relations()))
    return list(_relations()[relation]["templates"])


# ---- training files (made by scripts/make_training_data.py) ----


def _train_names(kind: str) -> dict[str, str]:
    root = Path(str(resources.files("vsteer.data"))) / "train"
    names = {}
    for path in sorted(root.glob(f"*_{kind}*.jsonl*")):
        names[path.name.split(".jsonl")[0]] = f"train/{path.name}"
    return names


def _records(kind: str, name: str, keys: tuple[str, ...]) -> list[dict]:
    names = _train_names(kind)
    _check(f"{kind.upper()} training set", name, tuple(names))
    rows = _jsonl(names[name])
    for i, row in enumerate(rows):
        if any(not row.get(k) for k in keys):
            raise DataError(f"{names[name]} row {i} lacks one of {keys}")
    return copy.deepcopy(list(rows))  # the parsed file is cached; callers may edit their copy


def sft_records(name: str) -> list[dict]:
    """SFT records ``{"prompt": str, "completion": str}`` (TRL's standard prompt-completion format).

    Names are the file stems in ``vsteer/data/train``: ``"imdb_positive_sft"`` and its held-out
    ``"imdb_positive_sft_eval"``.
    """
    return _records("sft", name, ("prompt", "completion"))


def dpo_records(name: str) -> list[dict]:
    """DPO records in TRL's conversational preference format, one file per CAA behaviour (``"caa_<behaviour>_dpo"``):
    ``{"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}``.
    """
    return _records("dpo", name, ("prompt", "chosen", "rejected"))
