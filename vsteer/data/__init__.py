"""The real datasets vsteer ships, their readers, and loaders for your own data.

The readers read files inside the package (``vsteer/data``); sources, commits, licences and the
subsampling rules are in ``vsteer/data/SOURCES.md``, content hashes in ``vsteer/data/SHA256SUMS``.
:mod:`vsteer.data.user` loads and validates your own JSONL files or ``datasets.Dataset`` objects;
:mod:`vsteer.data.balance` builds answer-balanced extraction sets.
"""

from vsteer.data.balance import balance_answers, is_balanced, matching_counts, swap_options
from vsteer.data.readers import (
    CAA_BEHAVIOURS,
    PERSONA_PAIR_TEMPLATE,
    PERSONA_TRAITS,
    ABItem,
    Fact,
    caa_ab,
    caa_behaviours,
    clean_review,
    data_path,
    dpo_records,
    fact_relations,
    facts,
    file_sha256,
    imdb,
    imdb_held_out,
    mmlu_ab,
    neutral_prompts,
    persona_ab,
    persona_template_pairs,
    persona_traits,
    relation_template,
    repeng_prefixes,
    sft_records,
    sst2,
    wikitext2_raw,
)
from vsteer.data.user import SCHEMAS, ab_items, contrast_pairs, data_source, labelled_texts, validate

__all__ = [
    "CAA_BEHAVIOURS",
    "PERSONA_PAIR_TEMPLATE",
    "PERSONA_TRAITS",
    "ABItem",
    "Fact",
    "caa_ab",
    "caa_behaviours",
    "clean_review",
    "data_path",
    "dpo_records",
    "fact_relations",
    "facts",
    "file_sha256",
    "imdb",
    "imdb_held_out",
    "mmlu_ab",
    "neutral_prompts",
    "persona_ab",
    "persona_template_pairs",
    "persona_traits",
    "relation_template",
    "repeng_prefixes",
    "sft_records",
    "sst2",
    "wikitext2_raw",
    "SCHEMAS",
    "ab_items",
    "balance_answers",
    "contrast_pairs",
    "data_source",
    "is_balanced",
    "labelled_texts",
    "matching_counts",
    "swap_options",
    "validate",
]
