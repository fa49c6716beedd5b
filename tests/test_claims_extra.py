"""Issue 14 items 3 and 5: more value-basis dimensions, the novel-name probe, their data."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from test_experiments import TOK

from vsteer.data import contrasts, file_sha256
from vsteer.data.readers import data_path
from vsteer.errors import DataError
from vsteer.experiments import basis, novel
from vsteer.experiments.common import rng


# ---- value basis: a planted direction is found, a shuffled one is not --------------------------
def _planted_resid(spaces, labels, seed=0, strength=3.0):
    """Per layer ``[n, d]`` noise plus, for label 1, a direction inside head 0's OV output space."""
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels, dtype=torch.float32)[:, None]
    xs = []
    for col, *_ in spaces:
        d = col[0] @ torch.randn(col[0].shape[1], generator=g)
        noise = torch.randn(len(labels), col[0].shape[0], generator=g)
        xs.append(noise + strength * y * d / d.norm())
    return xs


def test_a_direction_planted_in_an_ov_space_beats_both_baselines_and_shuffled_labels_do_not():
    model = make_tiny_model("llama")
    spaces = basis.ov_spaces(model)
    labels = np.array([0, 1] * 60)
    xs = _planted_resid(spaces, labels)
    config = basis.BasisConfig(n_shuffles=20, n_boot=100)
    _, est = basis.direction_alignment(xs, labels, spaces, config, rng(0))
    assert est["write"].low > 1.2 and est["write_data"].low > 1.2
    shuffled = rng(1).permutation(labels)
    _, est = basis.direction_alignment(xs, shuffled, spaces, config, rng(0))
    assert est["write_data"].low < 1.0 < est["write_data"].high or abs(est["write_data"].value - 1) < 0.2
    assert est["write_data"].value < 1.2


def test_paired_items_are_resampled_and_shuffled_by_pair():
    """Found in review: formality's bootstrap and shuffled baseline treated the two sentences of a pair
    as independent items. With groups, a pair's shared content cancels in every resample (a narrower
    interval around the same estimate here), and a shuffle swaps labels inside pairs only."""
    model = make_tiny_model("llama")
    spaces = basis.ov_spaces(model)
    labels = np.array([1, 0] * 60)
    xs = _planted_resid(spaces, labels, strength=2.0)
    g = torch.Generator().manual_seed(5)
    xs = [x + 4.0 * torch.randn(60, x.shape[1], generator=g).repeat_interleave(2, 0) for x in xs]
    groups = np.arange(120) // 2
    config = basis.BasisConfig(n_shuffles=20, n_boot=200)
    _, loose = basis.direction_alignment(xs, labels, spaces, config, rng(0))
    _, paired = basis.direction_alignment(xs, labels, spaces, config, rng(0), groups)
    assert paired["write"].value == pytest.approx(loose["write"].value)
    width = {k: e["write"].high - e["write"].low for k, e in (("loose", loose), ("paired", paired))}
    assert width["paired"] < 0.8 * width["loose"]
    for _ in range(20):
        shuffled = basis._shuffle(labels, groups, np.random.default_rng(_))
        assert (shuffled.reshape(-1, 2).sum(1) == 1).all()  # one formal, one informal in every pair
    assert not all(
        (basis._shuffle(labels, groups, np.random.default_rng(s)) == labels).all() for s in range(5)
    )


def test_run_basis_tests_every_named_dimension_with_its_own_verdict_rows():
    model = make_tiny_model("llama")
    words = ["good", "bad"]
    own = {name: [(f"x {words[i % 2]} {name} {i}", i % 2) for i in range(12)] for name in basis.DIMENSIONS}
    config = basis.BasisConfig(n_shuffles=4, n_boot=10, dimensions=("sentiment",))
    result = basis.run_basis(model, TOK, config, dimension_data=own, progress_bar=False)
    assert {r["dimension"] for r in result.records} == set(own)
    assert len(result.verdicts) == 3 * len(own)
    assert sum("factuality" in f.claim for f in result.findings) == 3
    assert sum("formality" in f.claim for f in result.findings) == 3
    assert "Untested" not in result.to_markdown()  # every named dimension has data now
    with pytest.raises(DataError, match="unknown basis dimension 'tone'"):
        basis.run_basis(model, TOK, basis.BasisConfig(dimensions=("tone",)), progress_bar=False)


def test_dimension_items_are_balanced_and_seed_fixed():
    for name in ("factuality", "domain", "behaviour", "formality"):
        items = basis.dimension_items(name, 40, seed=3)
        assert sum(y for _, y in items) == 20 and len(items) == 40
        assert items == basis.dimension_items(name, 40, seed=3)
        assert items != basis.dimension_items(name, 40, seed=4)


def test_formality_items_are_rated_pairs_of_equal_length():
    """Formal and informal halves differ in rating, not in word count (a plain contrast would be 21 vs 8
    words on average, so the direction could be length)."""
    with gzip.open(data_path("formality/pavlick_formality.csv.gz"), "rt", encoding="utf-8") as f:
        scores = {row["text"].strip(): float(row["score"]) for row in csv.DictReader(f)}
    assert len(scores) == 1000
    assert "CC BY 3.0" in data_path("formality/LICENSE").read_text()
    assert file_sha256("formality/pavlick_formality.csv") == (
        "f4507390d0d3821ca00912b060c8d990d986ac663488b2989cf46d825acbcb8c"
    )
    pairs = contrasts.formality_pairs()
    assert len(pairs) == 128 and len({f for f, _ in pairs}) == len({i for _, i in pairs}) == 128
    for formal, informal in pairs:
        assert len(formal.split()) == len(informal.split())
        assert scores[formal] > contrasts.FORMAL_ABOVE and scores[informal] < contrasts.INFORMAL_BELOW
    items = basis.dimension_items("formality", 20, seed=0)  # whole pairs are drawn
    lengths = [len(t.split()) for t, _ in items]
    assert lengths[0::2] == lengths[1::2] and [y for _, y in items] == [1, 0] * 10
    assert contrasts.formality_statements()[:2] == [(pairs[0][0], 1), (pairs[0][1], 0)]


# ---- novel names -------------------------------------------------------------------------------
class VocabTokenizer:
    def get_vocab(self):
        return {"Ġgloom": 0, "▁tunek": 1, "ab": 2, "Ġ12": 3, "<|im_end|>": 4}


def test_vocab_words_strips_word_start_markers_and_keeps_alphabetic_pieces():
    assert novel.vocab_words(VocabTokenizer()) == {"gloom", "tunek", "ab"}
    assert novel.vocab_words(object()) == set()


def test_pseudowords_are_deterministic_and_never_a_rejected_word():
    first = novel.pseudowords(30, seed=0)
    assert first == novel.pseudowords(30, seed=0) and len(set(first)) == 30
    assert first != novel.pseudowords(30, seed=1)
    again = novel.pseudowords(
        30, seed=0, reject={w.upper() for w in first[:5]} | novel.vocab_words(VocabTokenizer())
    )
    assert not set(first[:5]) & set(again) and "tunek" not in again
    assert all(w.isalpha() and w[0] not in "aeiou" for w in again)
    with pytest.raises(DataError, match="n must be"):
        novel.pseudowords(0)


def test_name_texts_end_at_the_name_or_just_before_it():
    (text,) = novel.name_texts(["blomet"], novel.NEUTRAL_FRAMES[:1], novel.ANIMAL_CONTEXT)
    assert "animal called a blomet." in text and text.endswith("see the blomet")
    (before,) = novel.name_texts(["blomet"], novel.NEUTRAL_FRAMES[:1], novel.ANIMAL_CONTEXT, before=True)
    assert before.endswith("see the")


def _category_features(n, d_dir, sign, g, dim=24):
    return g.normal(size=(n, dim)) + sign[:, None] * 2.0 * d_dir


def test_a_planted_category_direction_transfers_and_a_shuffled_one_does_not():
    g = np.random.default_rng(0)
    d_dir = np.eye(24)[5]
    y = np.array([0, 1] * 40)
    x_train = _category_features(80, d_dir, 2 * y - 1.0, g)
    x_test = _category_features(80, d_dir, 2 * y - 1.0, g)
    n = 30
    animal = _category_features(n, d_dir, np.ones(n), g)
    obj = _category_features(n, d_dir, -np.ones(n), g)
    plain = g.normal(size=(n, 24))  # the control position carries no category
    sc = novel.score_site(x_train, y, x_test, y, animal, obj, plain, g.normal(size=(n, 24)), C=0.1)
    assert sc["real_accuracy"] > 0.9 and sc["transfer"].mean() > 0.9
    assert 0.2 < sc["control"].mean() < 0.8
    flips = g.permutation(np.r_[np.ones(n // 2), -np.ones(n - n // 2)])  # contexts assigned at random
    shuffled = novel.score_site(
        x_train, y, x_test, y, _category_features(n, d_dir, flips, g), _category_features(n, d_dir, -flips, g),
        plain, plain, C=0.1,
    )  # fmt: skip
    assert 0.2 < shuffled["transfer"].mean() < 0.8


def test_run_probes_adds_the_novel_name_verdicts_when_asked():
    from vsteer.experiments import probing

    data = [(f"this is {['good', 'bad'][i % 2]} stuff {i}", i % 2) for i in range(40)]
    config = probing.ProbeConfig(
        layers=[1], cv=2, n_control=2, novel_names=8, novel_layers=2, intensity_words=16, negation_pairs=12
    )
    result = probing.run_probes(
        make_tiny_model("llama"), TOK, config, data[:24], data[24:], progress_bar=False
    )
    ids = [f.rule_id for f in result.findings]
    assert {"probing.novel_v_transfers", "probing.novel_v_beyond_context", "probing.novel_v_vs_resid"} <= set(
        ids
    )
    assert len(result.meta["invented_names"]) == 8 and "control share" in result.to_markdown()
    assert (
        sum("sentiment intensity" in f.claim or "sentiment polarity" in f.claim for f in result.findings) == 2
    )
    (neg,) = [f for f in result.findings if "encode negation" in f.claim]
    assert neg.rule_id == "probing.selectivity" and "6 CondaQA pairs" in neg.measured
    assert len(result.meta["negation_passages"]) == 12 and "| bag of words |" in result.to_markdown()


def test_negation_probe_splits_by_pair_and_refuses_a_bad_size():
    from vsteer.experiments import intensity, probing

    config = probing.ProbeConfig(layers=[1], cv=2, n_control=2)
    model = make_tiny_model("llama")
    with pytest.raises(DataError, match="negation_pairs must be between 4 and 607"):
        intensity.run_negation(model, TOK, 1, 608, config, seed=0)
    _, _, meta = intensity.run_negation(model, TOK, 1, 8, config, seed=0)
    _, _, again = intensity.run_negation(model, TOK, 1, 8, config, seed=0)
    assert meta == again and len(set(meta["negation_passages"])) == 8


# ---- data --------------------------------------------------------------------------------------
def test_new_data_files_carry_their_upstream_hash_and_a_licence():
    assert (
        file_sha256("repe/facts_true_false.csv")
        == "151b6163289460eb8b37f7c6a1998e23aed8e05b5e557bf1a2297079bf0e5af9"
    )
    assert file_sha256("facts/coco-names/coco.names") == (
        "6d3719bc96e2b091c0ea271b3ea85c9f7b2a556a58ee604362a19be5eac0cf9e"
    )
    for folder in ("repe", "facts/coco-names"):
        assert data_path(f"{folder}/LICENSE").read_text().strip()


def test_negation_pairs_are_condaqa_minimal_pairs_with_their_licence():
    pairs = contrasts.negation_pairs()
    assert len(pairs) == 607 and len({p["passage_id"] for p in pairs}) == 607
    assert [p["passage_id"] for p in pairs] == sorted(p["passage_id"] for p in pairs)
    assert all(p["cue"].lower() in p["negated"].lower() and p["negated"] != p["affirmative"] for p in pairs)
    assert "Apache License" in data_path("condaqa/LICENSE").read_text()
    assert file_sha256("condaqa/negation_pairs.jsonl") == (
        "9dedc082c2898a7c972cbb8484a82d10c0f783119ff55d80cbe6a1b19ab9ab5e"
    )


def test_contrast_readers_counts():
    facts = contrasts.true_false_statements()
    assert len(facts) == 612 and sum(y for _, y in facts) == 306
    domains = contrasts.mmlu_domains()
    assert (sum(y for _, y in domains), len(domains)) == (180, 310)
    assert not any("Choices:" in t for t, _ in domains)
    assert len(contrasts.persona_statements()) == 5000
    objects = contrasts.object_names()
    assert len(objects) == 41 and not set(objects) & set(contrasts.animal_names())
    assert {"mouse", "kite", "person", "banana"}.isdisjoint(objects)


# ---- polarity and intensity (VADER) ------------------------------------------------------------
def test_intensity_words_fill_four_balanced_cells_with_a_fixed_seed():
    from vsteer.experiments import intensity

    words = intensity.intensity_words(40, seed=0)
    cells = {(p, s) for _, p, s in words}
    assert len(words) == 40 and cells == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(sum(1 for _, p, s in words if (p, s) == c) == 10 for c in cells)
    assert words == intensity.intensity_words(40, seed=0) and words != intensity.intensity_words(40, seed=1)
    valence = intensity.vader_valence()
    assert all(abs(valence[w]) >= intensity.STRONG for w, _, s in words if s)


def test_vader_lexicon_with_another_hash_is_refused(monkeypatch):
    from vsteer.experiments import intensity

    monkeypatch.setattr(intensity, "VADER_LEXICON_SHA256", "0" * 64)
    with pytest.raises(DataError, match="sha256"):
        intensity.vader_valence()
