"""The claim experiments on the embedded model and the shipped data, at small sizes.

They check that each experiment runs end to end on real inputs and keeps its exact mechanics;
the verdicts at full size come from the ``vsteer patch/swap/probe/basis`` commands.
"""

from __future__ import annotations

import pytest
import torch

from vsteer.experiments import basis, patching, probing, swaps

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from vsteer.models import load_model

    return load_model("smollm2-135m-instruct")


def test_city_pairs_cover_the_fact_set_and_align(smollm2):
    _, tok = smollm2
    pairs = patching.pairs_from_facts(tok, "city_country")
    assert len(pairs) >= 50
    assert all(p.pair.source_answer != p.pair.donor_answer for p in pairs)


def test_patching_resid_at_all_layers_moves_the_answer_almost_fully(smollm2):
    model, tok = smollm2
    pairs = patching.pairs_from_facts(tok, "city_country", n_pairs=12)
    res = patching.patch_pairs(model, tok, pairs, sites=("v", "resid"), layers=[], progress_bar=False)
    # only layer 0's keys/values still see the source entity's embedding
    resid = patching.recovered_fraction(res["patched"][("resid", "all")], res["clean"], res["donor"])
    assert resid.value > 0.95


def test_a_swap_on_the_real_model_restores_its_weights(smollm2):
    model, tok = smollm2
    before = {k: v.clone() for k, v in model.state_dict().items() if ".self_attn." in k}
    config = swaps.SwapConfig(n_windows=1, window=32, n_prompts=2, matrices=("v", "k"), activations=False)
    result = swaps.run_swaps(model, tok, config, pairs=[(3, 20)], progress_bar=False)
    assert len(result.records) == 2 and all(r["delta_log_ppl"] == r["delta_log_ppl"] for r in result.records)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in before.items())


def test_probes_run_on_sst2_from_one_pass(smollm2):
    model, tok = smollm2
    config = probing.ProbeConfig(n_train=80, n_test=40, sites=("v", "k"), layers=[29], cv=2)
    result = probing.run_probes(model, tok, config, progress_bar=False)
    assert {(r["site"], r["layer"]) for r in result.records} == {(s, x) for s in "vk" for x in (15, 29)}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in result.records)


def test_ov_readout_of_the_last_layer_gives_tokens(smollm2):
    model, tok = smollm2
    rows = basis.ov_readout(model, tok, layers=[29], k=5)
    assert len(rows) == 9 and all(r["top_tokens_plus"] for r in rows)
