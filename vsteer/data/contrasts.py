"""Contrastive sets for the value-basis dimensions and the novel-name probe (sources: ``SOURCES.md``).

Each reader returns fresh ``(text, label)`` lists or name lists from files shipped in ``vsteer/data``:

- :func:`true_false_statements`: RepE's 612 true/false statements (label 1 = true), factuality;
- :func:`mmlu_domains`: the question stems of CAA's A/B MMLU items of two subject groups (label 1 = STEM,
  0 = humanities; groups as in MMLU's own ``categories.py``), domain;
- :func:`persona_statements`: the Anthropic persona statements (label 1 = the statement matches the
  trait, i.e. its matching answer is "Yes"), behavioural tendency;
- :func:`animal_names` / :func:`object_names`: real animal (UCI Zoo) and object (COCO category) names;
- :func:`negation_pairs`: CondaQA's negated Wikipedia sentences and their affirmative edits;
- :func:`formality_pairs`: formal and informal sentences of Pavlick & Tetreault's corpus, paired by
  word count (label 1 = formal in :func:`formality_statements`), formality.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from functools import cache

from vsteer.data.readers import PERSONA_TRAITS, data_path, facts
from vsteer.errors import DataError

# MMLU's subject -> group map (Hendrycks et al. 2021, ``categories.py``: STEM and humanities groups)
MMLU_STEM = (
    "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
    "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
    "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_mathematics", "high_school_physics",
    "high_school_statistics", "machine_learning",
)  # fmt: skip
MMLU_HUMANITIES = (
    "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
    "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
    "philosophy", "prehistory", "professional_law", "world_religions",
)  # fmt: skip
# COCO names left out of the object list, with the reason (the rest of the rule: one word, no person,
# animal or food category)
COCO_EXCLUDED = {
    "person": "a person",
    "bird cat dog horse sheep cow elephant bear zebra giraffe": "COCO's animal supercategory",
    "banana apple sandwich orange broccoli carrot pizza donut cake": "COCO's food supercategory",
    "mouse kite drone": "also an animal name (a mouse, the kite bird, a drone bee)",
    "remote": "an adjective on its own (the category is 'remote control')",
    "pottedplant diningtable tvmonitor": "darknet's fused spellings of two-word names, not words",
}


@cache
def _text(relative: str) -> str:
    raw = data_path(relative).read_bytes()
    return (gzip.decompress(raw) if data_path(relative).suffix == ".gz" else raw).decode("utf-8")


def true_false_statements() -> list[tuple[str, int]]:
    """RepE's true/false statements ``(statement, label)``, label 1 = true; 612 rows, 306 per label."""
    relative = "repe/facts_true_false.csv"
    rows = list(csv.DictReader(io.StringIO(_text(relative))))
    out = []
    for i, row in enumerate(rows):
        if row.get("label") not in ("0", "1") or not (row.get("statement") or "").strip():
            raise DataError(f"{relative} row {i + 1} is not 'statement,<0|1>': {row!r:.80}")
        out.append((row["statement"].strip(), int(row["label"])))
    return out


def _stem(prompt: str) -> str:
    return prompt.split("\n\nChoices:")[0].strip()


def mmlu_domains() -> list[tuple[str, int]]:
    """Question stems of the CAA A/B MMLU items of the STEM (label 1, 180 items) and humanities
    (label 0, 130 items) subjects, in file order; the other 27 subjects are left out."""
    relative = "caa/test/mmlu/mmlu.json"
    rows = json.loads(_text(relative))
    out = []
    for row in rows:
        if row["category"] in MMLU_STEM:
            out.append((_stem(row["prompt"]), 1))
        elif row["category"] in MMLU_HUMANITIES:
            out.append((_stem(row["prompt"]), 0))
    return out


def persona_statements(traits=PERSONA_TRAITS) -> list[tuple[str, int]]:
    """Anthropic persona statements of ``traits`` ``(statement, label)``, label 1 = the statement matches
    the trait (its matching answer is "Yes"); 1000 per trait, 500 per label."""
    out = []
    for trait in traits:
        if trait not in PERSONA_TRAITS:
            raise DataError(f"unknown persona trait {trait!r}; expected one of: {', '.join(PERSONA_TRAITS)}")
        text = _text(f"anthropic-evals/persona/{trait}.jsonl")
        for row in (json.loads(line) for line in text.split("\n") if line.strip()):
            out.append((row["statement"].strip(), int(row["answer_matching_behavior"].strip() == "Yes")))
    return out


def animal_names() -> list[str]:
    """The 98 animal names of the UCI Zoo facts (``facts("animal_class")``), in source order."""
    return [f.subject for f in facts("animal_class")]


def object_names() -> list[str]:
    """Object names from the COCO category list (darknet's ``coco.names``): one-word names outside the
    person, animal and food categories, minus the ambiguous ones in :data:`COCO_EXCLUDED`; 41 names."""
    excluded = {w for key in COCO_EXCLUDED for w in key.split()}
    names = [line.strip() for line in _text("facts/coco-names/coco.names").split("\n") if line.strip()]
    return [n for n in names if re.fullmatch(r"[a-z]+", n) and n not in excluded]


def negation_pairs() -> list[dict]:
    """CondaQA minimal pairs (Ravichander et al. 2022): ``{"passage_id", "cue", "negated",
    "affirmative"}``, a Wikipedia sentence with a negation cue and a crowdworker's edit of it with the
    negation undone; 607 pairs, built by ``scripts/make_negation_pairs.py`` (rules in ``SOURCES.md``)."""
    rows = [json.loads(line) for line in _text("condaqa/negation_pairs.jsonl").splitlines() if line.strip()]
    for r in rows:
        if not (r.get("negated") and r.get("affirmative") and r["negated"] != r["affirmative"]):
            raise DataError(f"condaqa/negation_pairs.jsonl: passage {r.get('passage_id')} is not a pair")
    return rows


FORMAL_ABOVE, INFORMAL_BELOW = 0.6, 0.4  # on the shipped 0..1 scale: mean rating above +0.6 / below -0.6


def formality_pairs() -> list[tuple[str, str]]:
    """``(formal, informal)`` sentence pairs of equal word count from Pavlick & Tetreault's formality
    corpus (1,000 shipped sentences, ``formality/``): formal = score above :data:`FORMAL_ABOVE`,
    informal = below :data:`INFORMAL_BELOW` (a mean rating beyond +-0.6 on the -3..+3 scale). Formal
    sentences run longer (21 vs 8 words on average), so a plain contrast would find length; here
    the i-th formal and the i-th informal sentence of each word count are paired, in file order (128
    pairs)."""
    relative = "formality/pavlick_formality.csv.gz"
    formal: dict[int, list[str]] = {}
    informal: dict[int, list[str]] = {}
    for i, row in enumerate(csv.DictReader(io.StringIO(_text(relative)))):
        try:
            score, text = float(row["score"]), row["text"].strip()
        except (KeyError, TypeError, ValueError, AttributeError):
            raise DataError(f"{relative} row {i + 2} is not 'split,score,text': {row!r:.80}") from None
        words = len(text.split())
        if score > FORMAL_ABOVE:
            formal.setdefault(words, []).append(text)
        elif score < INFORMAL_BELOW:
            informal.setdefault(words, []).append(text)
    return [pair for n in sorted(formal) for pair in zip(formal[n], informal.get(n, []))]


def formality_statements(pairs: list[tuple[str, str]] | None = None) -> list[tuple[str, int]]:
    """``pairs`` (default: all of :func:`formality_pairs`) flattened to ``(text, label)``, label 1 =
    formal, pair by pair."""
    return [item for f, inf in (formality_pairs() if pairs is None else pairs) for item in ((f, 1), (inf, 0))]
