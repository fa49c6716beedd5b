"""The single-vector patching test (one layer, the entity's last token), on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import _tiny_config, make_tiny_model
from test_experiments import TOK, pair

from vsteer.errors import DataError
from vsteer.experiments import patching

CITIES = [
    ("Rome", "Italy"),
    ("Oslo", "Norway"),
    ("Lima", "Peru"),
    ("Kiev", "Ukraine"),
    ("Bern", "Switzerland"),
    ("Doha", "Qatar"),
    ("Graz", "Austria"),
    ("Bonn", "Germany"),
    ("Apia", "Samoa"),
    ("Suva", "Fiji"),
    ("Male", "Maldives"),
    ("Nuuk", "Greenland"),
]


def city_pairs(shift: int = 1):
    """Each city the source once, its donor the city ``shift`` places on (all one 4-character piece)."""
    n = len(CITIES)
    return [
        pair(*CITIES[i][:1], CITIES[(i + shift) % n][0], CITIES[i][1], CITIES[(i + shift) % n][1])
        for i in range(n)
    ]


def one_layer_value_only_model():
    """One layer whose keys are zero: attention is uniform, so the last position reads the entity only
    through its value vector at layer 0 (and its residual stream does not reach the last position)."""
    torch.manual_seed(0)
    config = _tiny_config("llama")
    config.num_hidden_layers = 1
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.zero_()
    return model


def test_last_token_patch_where_donor_and_source_values_agree_recovers_nothing():
    # "Romeabcd" / "Osloabcd": the entity's last piece is the same token, so at layer 0 its q/k/v
    # (a function of that token alone) are equal in both prompts
    model = make_tiny_model("llama")
    p = patching.align_pair(TOK, pair("Romeabcd", "Osloabcd"))
    assert len(p.positions) == 2
    last = [("v", 0), ("k", 0), ("q", 0), ("v", 1)]
    res = patching.patch_pairs(
        model, TOK, [p], sites=("v",), layers=[0], sweep_sites=("v",), last_token=last, progress_bar=False
    )
    for site in ("v", "k", "q"):
        np.testing.assert_allclose(res["last"][(site, 0)], res["clean"], atol=1e-6)
    # the same layer at every entity token, and the last token one layer on, do move the answer
    assert abs(res["patched"][("v", 0)][0] - res["clean"][0]) > 1e-4
    assert abs(res["last"][("v", 1)][0] - res["clean"][0]) > 1e-4


def test_planted_value_path_recovers_fully_at_v_and_not_at_k():
    model = one_layer_value_only_model()
    pairs = [patching.align_pair(TOK, p) for p in city_pairs()]
    res = patching.patch_pairs(
        model, TOK, pairs, sites=(), layers=[], last_token=[("v", 0), ("k", 0)], progress_bar=False
    )
    assert np.abs(res["donor"] - res["clean"]).min() > 1e-4  # every pair has something to recover
    np.testing.assert_allclose(res["last"][("v", 0)], res["donor"], atol=1e-4)
    np.testing.assert_allclose(res["last"][("k", 0)], res["clean"], atol=1e-5)
    assert np.array_equal(res["last_top"][("v", 0)], res["donor_top"])


def test_run_patching_reports_the_single_vector_test_on_held_out_pairs():
    model = one_layer_value_only_model()
    config = patching.PatchConfig(sites=("v",), select_fraction=0.25)
    result = patching.run_patching(model, TOK, config, pairs=city_pairs(), progress_bar=False)
    single = result.meta["single"]
    assert single["chosen_layers"] == {"v": 0, "k": 0, "q": 0, "resid": 0}
    split = single["split"]["custom"]
    assert len(split["selection"]) == 3 and len(split["held_out"]) == 9
    assert not set(split["selection"]) & set(split["held_out"])
    rows = {r["site"]: r for r in single["records"] if r["relation"] == "pooled"}
    assert rows["v"]["n_pairs"] == 9 and rows["v"]["recovered"] == pytest.approx(1.0, abs=1e-4)
    assert rows["k"]["recovered"] == pytest.approx(0.0, abs=1e-4)
    assert set(rows) == {"v", "k", "q", "resid", patching.CONTROL}
    # the control's entity is neither of the pair's; the verdict rows are the single-vector ones
    for src, ctrl in zip(split["held_out"], single["controls"]["custom"]):
        p = next(p for p in city_pairs() if p.source_entity == src)
        assert ctrl not in (p.source_entity, p.donor_entity)
    ids = [f.rule_id for f in result.findings]
    assert ids == [
        "patching.v_single_flips",
        "patching.v_single_recovers",
        "patching.v_single_vs_k",
        "patching.v_single_vs_resid",
    ]
    assert result.findings[1].effect.value == pytest.approx(1.0, abs=1e-4)
    assert any("Single-vector test" in n for n in result.notes)


def test_the_layer_is_chosen_on_the_selection_split_alone():
    model = make_tiny_model("llama")
    config = patching.PatchConfig(sites=("v",), select_fraction=0.25)
    first = patching.run_patching(model, TOK, config, pairs=city_pairs(1), progress_bar=False)
    held = set(first.meta["single"]["split"]["custom"]["held_out"])
    # scramble the held-out pairs (other donors, their answers): same count and order, so the same split
    mixed = [p if p.source_entity not in held else q for p, q in zip(city_pairs(1), city_pairs(5))]
    second = patching.run_patching(model, TOK, config, pairs=mixed, progress_bar=False)
    assert second.meta["single"]["split"] == first.meta["single"]["split"]
    assert second.meta["single"]["chosen_layers"] == first.meta["single"]["chosen_layers"]
    assert second.meta["single"]["sweep"] == first.meta["single"]["sweep"]
    pooled = [
        {r["site"]: r["recovered"] for r in res.meta["single"]["records"] if r["relation"] == "pooled"}
        for res in (first, second)
    ]
    assert pooled[0]["v"] != pooled[1]["v"]  # the held-out numbers did change


def test_split_needs_a_relation_with_two_pairs():
    groups = {"custom": [patching.align_pair(TOK, pair())]}
    with pytest.raises(DataError, match="at least 2 pairs") as err:
        patching.split_pairs(groups, 0.5)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="strictly between 0 and 1"):
        patching.split_pairs(groups, 1.0)


def test_without_the_single_vector_test_the_all_layer_form_is_the_verdict():
    config = patching.PatchConfig(sites=("v",), single_sites=())
    result = patching.run_patching(
        make_tiny_model("llama"), TOK, config, pairs=city_pairs()[:2], progress_bar=False
    )
    assert "single" not in result.meta
    assert {f.rule_id for f in result.findings} == {"patching.v_recovers"}


def test_the_plot_draws_with_and_without_the_single_vector_test(tmp_path):
    model = one_layer_value_only_model()
    for single in (patching.SINGLE_SITES, ()):
        config = patching.PatchConfig(sites=("v", "resid"), sweep_sites=("v",), single_sites=single)
        result = patching.run_patching(model, TOK, config, pairs=city_pairs()[:4], progress_bar=False)
        assert result.plot(tmp_path / f"p{len(single)}.png").stat().st_size > 0


def test_last_token_and_control_patches_batched_equal_one_by_one():
    # prompts of different lengths: left padding shifts each row's entity token differently
    model = make_tiny_model("qwen2")
    raw = [
        pair("Rome", "Oslo", "Italy", "Norway"),
        patching.CounterfactualPair("Lima is in", "Kiev is in", "Lima", "Kiev", "Peru", "Ukraine"),
        patching.CounterfactualPair(
            "We went to Bern and saw it is in",
            "We went to Doha and saw it is in",
            "Bern",
            "Doha",
            "Switzerland",
            "Qatar",
        ),
    ]
    pairs = [patching.align_pair(TOK, p) for p in raw]
    controls = [(pairs[(i + 1) % 3].donor_ids, pairs[(i + 1) % 3].positions[-1]) for i in range(3)]
    kw = dict(
        sites=(), layers=[], last_token=[("v", 1), ("resid", 0)], controls=controls, control_sites=[("v", 1)]
    )
    together = patching.patch_pairs(model, TOK, pairs, batch_size=3, progress_bar=False, **kw)
    alone = patching.patch_pairs(model, TOK, pairs, batch_size=1, progress_bar=False, **kw)
    for key in ("last", "control"):
        for c in together[key]:
            np.testing.assert_allclose(together[key][c], alone[key][c], atol=1e-5, err_msg=f"{key} {c}")
    # the control moved the answer: it patched the other prompt's vector, not the pair's own
    assert np.abs(together["control"][("v", 1)] - together["clean"]).max() > 1e-4
