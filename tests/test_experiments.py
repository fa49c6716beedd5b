"""Mechanics of the claim experiments, on tiny models built in the test."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import VOCAB, make_tiny_model, random_ids

from vsteer.errors import DataError, SiteError
from vsteer.experiments import basis, patching, probing, swaps
from vsteer.hooks import capture, hook_count, intervene, replace


class WordTokenizer:
    """A tiny fast-tokenizer stand-in: words (split into 4-character pieces) and punctuation."""

    pad_token_id = 0
    padding_side = "left"

    def _pieces(self, text):
        out = []
        for m in re.finditer(r"\w+|[^\w\s]", text):
            for s in range(m.start(), m.end(), 4):
                e = min(s + 4, m.end())
                out.append((3 + sum(map(ord, text[s:e])) % (VOCAB - 3), (s, e)))
        return out

    def __call__(self, text, return_tensors=None, padding=False, truncation=False, max_length=None,
                 add_special_tokens=True, return_offsets_mapping=False):  # fmt: skip
        if isinstance(text, str):
            pieces = self._pieces(text)
            enc = {"input_ids": [i for i, _ in pieces], "attention_mask": [1] * len(pieces)}
            if return_offsets_mapping:
                enc["offset_mapping"] = [o for _, o in pieces]
            if return_tensors == "pt":
                enc = {k: torch.tensor([v]) for k, v in enc.items()}
            return enc
        seqs = [[i for i, _ in self._pieces(t)][: max_length if truncation else None] for t in text]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids):
        return "".join(f"<{int(i)}>" for i in ids)


TOK = WordTokenizer()
TEXT = " ".join(f"word{i % 13} and thing{i % 7}." for i in range(200))
PROMPTS = ["the cat sat", "a dog ran far away", "hello there", "one two three four"]


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def pair(src="Rome", don="Oslo", a_src="Italy", a_don="Norway"):
    template = "I live in {}. The country I live in is"
    return patching.CounterfactualPair(template.format(src), template.format(don), src, don, a_src, a_don)


# ---- patching -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_patching_k_with_its_own_activations_changes_nothing(family):
    model = make_tiny_model(family)
    ids = random_ids()
    clean = logits(model, ids)
    with capture(model, [("k", 1)]) as acts:
        logits(model, ids)
    with intervene(model, {("k", 1): replace(acts[("k", 1)], positions=[2, 3])}):
        patched = logits(model, ids)
    assert torch.equal(clean, patched)


def test_patch_with_donor_equal_to_source_recovers_nothing_and_changes_no_logit():
    model = make_tiny_model("llama")
    same = patching.align_pair(TOK, pair(don="Rome", a_don="Norway"))
    res = patching.patch_pairs(model, TOK, [same], layers=[0, 2], progress_bar=False)
    for patched in res["patched"].values():
        assert np.array_equal(patched, res["clean"])


def test_align_pair_finds_every_mention_of_the_entity():
    p = patching.CounterfactualPair("Rome is Rome.", "Oslo is Oslo.", "Rome", "Oslo", "Italy", "Norway")
    assert patching.align_pair(TOK, p).positions == [0, 2]


def test_misaligned_entity_spans_are_one_error_line():
    with pytest.raises(DataError, match="does not align") as err:
        patching.align_pair(TOK, pair(don="Washington"))
    assert "\n" not in str(err.value)


def test_pairs_from_facts_pair_only_entities_of_equal_token_length():
    facts = [
        ("Rome", "Italy"),
        ("Oslo", "Norway"),
        ("Washington", "USA"),
        ("Paris", "France"),
        ("Lima", "Peru"),
    ]
    pairs = patching.pairs_from_facts(TOK, "city_country", "I live in {}. It is in", facts=facts)
    assert pairs and all(len(p.positions) == 1 for p in pairs)  # Washington/Paris have no partner
    assert {p.pair.source_entity for p in pairs} == {"Rome", "Oslo", "Lima"}


def test_run_patching_reports_sites_and_a_verdict():
    model = make_tiny_model("qwen2")
    pairs = [pair(), pair("Lima", "Kiev", "Peru", "Ukraine"), pair("Oslo", "Rome", "Norway", "Italy")]
    config = patching.PatchConfig(layers=[1], sweep_sites=("v",))
    result = patching.run_patching(model, TOK, config, pairs=pairs, progress_bar=False)
    assert {r["site"] for r in result.records} == set(patching.PATCH_SITES)
    assert result.verdict().verdict in ("supported", "not supported", "inconclusive")
    assert {r["layer"] for r in result.records if r["site"] == "v"} == {1, "all"}
    assert {r["layer"] for r in result.records if r["site"] == "k"} == {"all"}


def test_empty_pair_list_is_one_error_line():
    with pytest.raises(DataError, match="empty"):
        patching.run_patching(make_tiny_model("llama"), TOK, pairs=[], progress_bar=False)


# ---- swaps ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "phi3", "gemma3"])
@pytest.mark.parametrize("role", ["v", "k", "q", "o"])
def test_swapping_a_layer_with_itself_changes_nothing(family, role):
    model = make_tiny_model(family)
    ids = random_ids()
    clean = logits(model, ids)
    with swaps.swap_weights(model, role, 1, 1):
        assert torch.equal(logits(model, ids), clean)


def test_swapping_an_activation_with_itself_changes_nothing():
    model = make_tiny_model("llama")
    ids = random_ids()
    clean = logits(model, ids)
    with capture(model, [("v", 1)]) as acts:
        logits(model, ids)
    with intervene(model, swaps.activation_swap_ops("v", 1, 1, acts)):
        assert torch.equal(logits(model, ids), clean)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "phi3"])
def test_weights_are_restored_bit_identically_after_a_swap(family):
    model = make_tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with swaps.swap_weights(model, "v", 0, 2):
        assert not torch.equal(logits(model, random_ids()), logits(make_tiny_model(family), random_ids()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_weights_are_restored_after_an_exception():
    model = make_tiny_model("phi3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError), swaps.swap_weights(model, "k", 0, 1):
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "phi3"])
def test_fused_swap_moves_only_the_roles_rows(family):
    from vsteer.arch import get_arch

    model = make_tiny_model(family)
    arch = get_arch(model)
    w = {(layer, r): arch.weight(layer, r).clone() for layer in (0, 2) for r in ("q", "k", "v")}
    with swaps.swap_weights(model, "v", 0, 2):
        assert torch.equal(arch.weight(0, "v"), w[(2, "v")])
        assert torch.equal(arch.weight(2, "v"), w[(0, "v")])
        for r in ("q", "k"):
            assert torch.equal(arch.weight(0, r), w[(0, r)])


def test_layer_pair_out_of_range_is_one_error_line():
    model = make_tiny_model("llama")
    with pytest.raises(SiteError, match="out of range") as err:
        with swaps.swap_weights(model, "v", 0, 3):
            pass
    assert "\n" not in str(err.value)
    with pytest.raises(SiteError, match="out of range"):
        swaps.run_swaps(model, TOK, pairs=[(0, 7)], text=TEXT, prompts=PROMPTS, progress_bar=False)


def test_run_swaps_reports_every_pair_matrix_and_kind_and_leaves_no_hooks():
    model = make_tiny_model("llama")
    hooks = hook_count(model)
    config = swaps.SwapConfig(n_pairs=2, n_windows=2, window=16)
    result = swaps.run_swaps(model, TOK, config, text=TEXT, prompts=PROMPTS, progress_bar=False)
    assert len(result.records) == 2 * 4 * 2
    assert hook_count(model) == hooks
    # one finding per claim, each judged by its own rule and measured from these records
    ids = [f.rule_id for f in result.findings]
    assert ids == [
        "swaps.v_vs_k_ppl",
        "swaps.wv_breaks",
        "swaps.wk_barely",
        "swaps.v_vs_k_ppl",
        "swaps.kl_v_vs_k",
    ]
    wv = [r["delta_log_ppl"] for r in result.records if r["kind"] == "weights" and r["matrix"] == "v"]
    assert result.findings[1].effect.value == pytest.approx(np.mean(wv)) and result.findings[1].effect.n == 2
    from vsteer.verdicts import decide, shipped_rules

    for f, v in zip(result.findings, result.verdicts, strict=True):
        assert v.verdict == decide(f.effect, shipped_rules()[f.rule_id])
    strata = result.meta["strata"]
    assert strata == swaps.strata_table(result.records, 2)
    assert sum(s["n_pairs"] for s in strata) == 2 * 2  # both pairs, once per kind


def test_strata_table_splits_the_paired_difference_by_whether_a_pair_includes_an_early_layer():
    def rec(kind, m, a, b, d):
        return {"kind": kind, "matrix": m, "layer_a": a, "layer_b": b, "delta_log_ppl": d}

    records = [
        rec("weights", "v", 0, 3, 5.0),
        rec("weights", "k", 0, 3, 1.0),  # with layer 0: V - K = 4
        rec("weights", "v", 1, 2, 0.5),
        rec("weights", "k", 1, 2, 0.7),  # without: -0.2
        rec("weights", "v", 2, 4, 0.9),
        rec("weights", "k", 2, 4, 0.6),  # without: +0.3
        rec("weights", "q", 1, 2, 9.0),  # other matrices do not enter
    ]
    strata = swaps.strata_table(records, 1)
    assert [(s["stratum"], s["n_pairs"]) for s in strata] == [("with layer 0", 1), ("without layer 0", 2)]
    assert strata[0]["mean"] == pytest.approx(4.0) and strata[0]["v_worse"] == 1.0
    assert strata[1]["mean"] == pytest.approx(0.05) and strata[1]["median"] == pytest.approx(0.05)
    assert strata[1]["v_worse"] == 0.5
    assert swaps.strata_table([r for r in records if r["matrix"] != "k"], 1) == []
    # with the first two layers early, pair (1, 2) joins the early stratum
    two = swaps.strata_table(records, 2)
    assert [(s["stratum"], s["n_pairs"]) for s in two] == [("with layers 0-1", 2), ("without layers 0-1", 1)]
    assert two[0]["mean"] == pytest.approx(1.9) and two[1]["mean"] == pytest.approx(0.3)


def test_layer_pairs_sample_within_the_early_layer_strata_and_return_their_population_weights():
    pairs, weights = swaps.layer_pairs(30, 8, seed=0)
    assert len(pairs) == len(set(pairs)) == 8 and all(0 <= a < b < 30 for a, b in pairs)
    # layers 0 and 1 are in 29 + 28 of the 435 pairs: proportional allocation gives 1.05 of 8, raised to 2
    assert sum(a < 2 for a, _ in pairs) == 2
    assert weights == pytest.approx({"early": 57 / 435, "later": 378 / 435})
    # 60 pairs: the proportional share (8) of early pairs; early_layers=1 splits by layer 0 alone
    assert sum(a < 2 for a, _ in swaps.layer_pairs(30, 60, seed=1)[0]) == 8
    one, w1 = swaps.layer_pairs(30, 8, seed=0, early_layers=1)
    assert sum(a == 0 for a, _ in one) == 2 and w1["early"] == pytest.approx(29 / 435)
    # a simple sample, the census and samples too small to stratify carry no weights
    assert swaps.layer_pairs(30, 8, seed=0, early_layers=0)[1] is None
    assert swaps.layer_pairs(4, None, seed=0) == ([(a, b) for a in range(4) for b in range(a + 1, 4)], None)
    assert swaps.layer_pairs(4, 3, seed=0)[1] is None
    with pytest.raises(DataError, match="early_layers must be >= 0"):
        swaps.layer_pairs(30, 8, seed=0, early_layers=-1)


def test_layer_pairs_give_the_early_stratum_the_share_asked_for_with_the_same_weights():
    pairs, weights = swaps.layer_pairs(30, 24, seed=0, early_pairs=6)
    assert len(set(pairs)) == 24 and sum(a < 2 for a, _ in pairs) == 6
    # the allocation changes the sample, never the weights the estimates use
    assert weights == swaps.layer_pairs(30, 24, seed=0)[1]
    assert sum(a < 2 for a, _ in swaps.layer_pairs(30, 24, seed=0)[0]) == 3  # proportional: 3.1
    # all 57 early pairs can be asked for when 2 are left for the other stratum
    assert sum(a < 2 for a, _ in swaps.layer_pairs(30, 59, seed=0, early_pairs=57)[0]) == 57
    # each stratum keeps at least 2 pairs (23 of 24 leaves 1) and gets no more than it has (57 early)
    for n, bad, high in ((24, 23, 22), (70, 58, 57)):
        with pytest.raises(DataError, match=rf"early_pairs must be between 2 and {high} .* got {bad}$"):
            swaps.layer_pairs(30, n, seed=0, early_pairs=bad)
    with pytest.raises(DataError, match="early_pairs must be >= 2"):
        swaps.layer_pairs(30, 24, seed=0, early_pairs=1)
    # 6 layers: 9 pairs with layer 0 or 1, 6 without; 10 pairs with 3 early would need 7 others
    with pytest.raises(
        DataError,
        match=r"early_pairs must be between 4 and 8 for n_pairs 10 \(9 pairs .*, 6 without\), got 3",
    ):
        swaps.layer_pairs(6, 10, seed=0, early_pairs=3)
    assert sum(a < 2 for a, _ in swaps.layer_pairs(6, 10, seed=0, early_pairs=4)[0]) == 4
    with pytest.raises(DataError, match="early_pairs needs strata"):
        swaps.layer_pairs(30, 24, seed=0, early_layers=0, early_pairs=6)


def test_swap_verdicts_weight_an_overdrawn_early_stratum_by_its_population_share():
    def rec(kind, m, pair, d, kl=0.0):
        return {
            "kind": kind,
            "matrix": m,
            "layer_a": pair[0],
            "layer_b": pair[1],
            "delta_log_ppl": d,
            "kl": kl,
        }

    # two layer-0 pairs with V - K = 4, four others with V - K = 0.1: half the sample, 1/3 of all pairs
    pairs = [(0, 3), (0, 5), (1, 2), (2, 4), (3, 5), (4, 5)]
    records = []
    for p in pairs:
        d = 4.0 if p[0] == 0 else 0.1
        records += [rec("weights", "v", p, 1.0 + d, kl=d), rec("weights", "k", p, 1.0)]
    config = swaps.SwapConfig(matrices=("v", "k"), activations=False, early_layers=1)
    weights = swaps.population_weights(6, 1)
    assert weights["early"] == pytest.approx(5 / 15)
    found = {f.rule_id: f for f in swaps._verdicts(records, config, seed=0, weights=weights)[0]}
    expect = 5 / 15 * 4.0 + 10 / 15 * 0.1
    assert found["swaps.v_vs_k_ppl"].effect.value == pytest.approx(expect)
    assert found["swaps.kl_v_vs_k"].effect.value == pytest.approx(expect)
    assert found["swaps.wv_breaks"].effect.value == pytest.approx(1.0 + expect)
    assert "strata weighted" in found["swaps.v_vs_k_ppl"].measured
    # without weights the same records give the plain mean over the sample
    plain = {f.rule_id: f for f in swaps._verdicts(records, config, seed=0)[0]}
    assert plain["swaps.v_vs_k_ppl"].effect.value == pytest.approx((2 * 4.0 + 4 * 0.1) / 6)


def test_run_swaps_samples_within_strata_and_its_verdicts_use_the_population_weights():
    from conftest import _tiny_config

    config = _tiny_config("llama")
    config.num_hidden_layers = 6
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    sw = swaps.SwapConfig(
        n_pairs=6, n_windows=1, window=16, matrices=("v", "k"), activations=False, early_layers=1
    )
    result = swaps.run_swaps(model, TOK, sw, text=TEXT, prompts=PROMPTS, progress_bar=False)
    weights = result.meta["strata_weights"]
    assert weights == pytest.approx(swaps.population_weights(6, 1))
    assert sum(a == 0 for a, _ in result.meta["pairs"]) == 2
    wv = swaps._estimate(result.records, "weights", "v", "delta_log_ppl", 0, weights, 1)
    assert result.findings[1].rule_id == "swaps.wv_breaks" and result.findings[1].effect == wv
    assert "sampled within strata (2 with layer 0, 4 without)" in result.notes[0]


def test_swaps_with_the_same_seed_give_identical_numbers():
    config = swaps.SwapConfig(n_pairs=2, n_windows=2, window=16, matrices=("v", "k"))

    def run():
        r = swaps.run_swaps(make_tiny_model("llama"), TOK, config, text=TEXT, prompts=PROMPTS, seed=3)
        return r.records, [v.to_dict() for v in r.verdicts]

    assert run() == run()


def test_empty_perplexity_text_is_one_error_line():
    with pytest.raises(DataError, match="empty"):
        swaps.run_swaps(make_tiny_model("llama"), TOK, text="", prompts=PROMPTS, progress_bar=False)


# ---- probing --------------------------------------------------------------------------------
def planted(n, dim=40, seed=0):
    g = np.random.default_rng(seed)
    y = g.integers(0, 2, n)
    x = g.normal(size=(n, dim))
    x[:, 3] += 4.0 * (2 * y - 1)
    return x, y


def test_probe_on_a_planted_linear_feature_reaches_100_and_its_control_50():
    x, y = planted(600)
    fit = probing.fit_probe(x[:400], y[:400], x[400:], y[400:])
    assert fit.accuracy >= 0.97
    assert 0.35 <= fit.control_accuracy <= 0.65


def test_collect_features_takes_all_sites_and_layers_from_one_pass():
    model = make_tiny_model("llama")
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        feats = probing.collect_features(model, TOK, PROMPTS, batch_size=len(PROMPTS), progress_bar=False)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert feats[("q", 2)].shape == (4, 32) and feats[("v", 0)].shape == (4, 16)
    assert feats[("resid", 1)].shape == (4, 32)


@pytest.mark.parametrize("position", ["last", "mean"])
def test_collect_features_stops_after_the_deepest_site_with_the_full_forward_values(position):
    """A middle layer's features: the forward ends at that layer (the last block never runs) and
    the values equal those of a whole forward pass."""
    from vsteer.encoding import encode_batch
    from vsteer.hooks import capture

    model = make_tiny_model("llama")
    ran = []
    handle = model.model.layers[-1].register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        feats = probing.collect_features(
            model, TOK, PROMPTS, sites=("v", "resid"), layers=[1], position=position, progress_bar=False
        )
    finally:
        handle.remove()
    assert not ran
    enc = encode_batch(TOK, PROMPTS, max_length=64)
    with torch.no_grad(), capture(model, [("v", 1), ("resid", 1)], stop=False) as acts:
        model(**enc, use_cache=False)
    mask = enc["attention_mask"].float()[..., None]
    for site in ("v", "resid"):
        x = acts[(site, 1)].flatten(2).float()
        want = x[:, -1] if position == "last" else (x * mask).sum(1) / mask.sum(1)
        np.testing.assert_allclose(feats[(site, 1)], want.numpy(), rtol=0, atol=1e-6)


def test_last_token_features_do_not_depend_on_batch_padding():
    model = make_tiny_model("llama")
    together = probing.collect_features(model, TOK, PROMPTS, batch_size=4, progress_bar=False)
    alone = probing.collect_features(model, TOK, PROMPTS[:1], batch_size=1, progress_bar=False)
    np.testing.assert_allclose(together[("resid", 2)][0], alone[("resid", 2)][0], atol=1e-5)


def test_run_probes_same_seed_same_numbers_and_empty_data_errors():
    words = ["good", "bad"]
    data = [(f"this is {words[i % 2]} stuff {i}", i % 2) for i in range(60)]
    config = probing.ProbeConfig(layers=[1], cv=2)

    def run():
        r = probing.run_probes(
            make_tiny_model("llama"), TOK, config, data[:40], data[40:], progress_bar=False
        )
        return r.records, [v.to_dict() for v in r.verdicts]

    assert run() == run()
    with pytest.raises(DataError, match="empty"):
        probing.run_probes(make_tiny_model("llama"), TOK, config, [], data, progress_bar=False)


# ---- value basis ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_ov_factors_reproduce_the_heads_ov_map(family):
    from vsteer.arch import get_arch

    model = make_tiny_model(family)
    arch = get_arch(model)
    (a, b), hd = basis.ov_factors(model, 1)[0], arch.head_dim
    u, s, v = basis.ov_svd(a, b)
    torch.testing.assert_close((u * s) @ v.t(), a @ b, atol=1e-4, rtol=1e-4)
    assert a.shape == (arch.d_model, hd) and b.shape == (hd, arch.d_model)


def test_steering_vector_readout_accepts_plain_tensors_and_objects():
    model = make_tiny_model("llama")
    vec = torch.randn(2, 8)
    rows = basis.readout_steering_vector(model, TOK, {1: vec}, site="v", k=3)
    assert rows[0]["layer"] == 1 and rows[0]["top_tokens_plus"].count("|") == 2

    class Obj:
        site = "v"
        directions = {1: vec}

    assert basis.readout_steering_vector(model, TOK, Obj(), k=3) == rows


def test_run_basis_result_renders_and_serialises(tmp_path):
    model = make_tiny_model("llama")
    items = [(f"x {'good' if i % 2 else 'bad'} {i}", i % 2) for i in range(20)]
    config = basis.BasisConfig(n_shuffles=5, n_boot=20, dimensions=("sentiment",))
    result = basis.run_basis(model, TOK, config, items=items)
    assert len(result.records) == 3 and len(result.verdicts) == 3
    assert "OV readout" in result.to_markdown()
    json.dumps(result.to_dict())
    assert result.plot(tmp_path / "p.png").exists()


# ---- CLI ------------------------------------------------------------------------------------
def test_cli_registers_the_four_commands():
    from vsteer.cli import build_parser

    parser = build_parser()
    for cmd in ("patch", "swap", "probe", "basis"):
        args = parser.parse_args([cmd, "--out", "x", "--seed", "2"])
        assert args.model == "smollm2-135m-instruct" and args.seed == 2


def test_cli_bad_layer_pair_is_one_error_line(capsys):
    from vsteer.cli import main

    assert main(["swap", "--pair", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vsteer: error:") and "\n" not in err


@pytest.mark.parametrize("family", ["gpt2", "phi3", "gemma3"])
def test_collect_features_runs_several_batches_on_other_families(family):
    feats = probing.collect_features(make_tiny_model(family), TOK, PROMPTS, batch_size=2, progress_bar=False)
    assert all(f.shape[0] == 4 and np.isfinite(f).all() for f in feats.values())


def test_control_labels_are_balanced_within_each_true_class():
    y = np.array([0] * 50 + [1] * 70)
    c = probing.control_labels(y, seed=0)
    assert c[y == 0].sum() == 25 and c[y == 1].sum() == 35


# ---- probe controls: several random-label draws ---------------------------------------------
def test_reported_control_is_the_mean_of_the_draws_each_an_independent_random_label_probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = planted(300)
    fit = probing.fit_probe(x[:200], y[:200], x[200:], y[200:], seed=3, n_control=6)
    assert fit.control_correct.shape == (6, 100)
    assert fit.control_accuracy == pytest.approx(fit.control_accuracies.mean())
    for d in range(6):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=fit.C, max_iter=300, tol=1e-3))
        probe.fit(x[:200], probing.control_labels(y[:200], 3 + 1 + d))
        assert fit.control_accuracies[d] == pytest.approx(float((probe.predict(x[200:]) == y[200:]).mean()))
    assert len(set(fit.control_accuracies.round(6))) > 1  # the draws differ


def test_selectivity_interval_carries_the_draw_to_draw_variance():
    from vsteer.evaluate import paired_difference

    g = np.random.default_rng(0)
    correct = g.random(400) < 0.8
    spread = np.stack([g.random(400) < p for p in np.linspace(0.2, 0.8, 10)])  # draws that vary
    same = np.stack([spread[5]] * 10)  # draws that do not
    sel = probing.selectivity(correct, spread, seed=1)
    assert sel.value == pytest.approx(correct.mean() - spread.mean())
    single = paired_difference(correct, spread[0], seed=1)
    items_only = paired_difference(correct, spread.mean(0), seed=1)
    width = sel.high - sel.low
    assert width > 1.3 * (single.high - single.low) and width > 1.3 * (items_only.high - items_only.low)
    flat = probing.selectivity(correct, same, seed=1)
    one = paired_difference(correct, same[0], seed=1)
    assert flat.high - flat.low == pytest.approx(one.high - one.low, rel=0.2)


def test_selectivity_resamples_whole_groups_of_dependent_items():
    """Found in review: the negation probe's interval resampled sentences although a sentence and its
    minimal-pair edit are one pair. With ``groups`` whole pairs are drawn: items that agree within
    their pair widen the interval by about sqrt(2); without groups nothing changes."""
    g = np.random.default_rng(0)
    pair_correct = g.random(200) < 0.7
    correct = np.repeat(pair_correct, 2)  # both sentences of a pair right or both wrong
    control = np.stack([np.repeat(g.random(200) < 0.5, 2) for _ in range(5)])
    groups = np.repeat(np.arange(200), 2)
    loose = probing.selectivity(correct, control, seed=3)
    paired = probing.selectivity(correct, control, seed=3, groups=groups)
    assert paired.value == loose.value and paired.n == loose.n == 400
    assert (paired.high - paired.low) > 1.25 * (loose.high - loose.low)
    # groups of one are the items themselves: the very same draws
    same = probing.selectivity(correct, control, seed=3, groups=np.arange(400))
    assert (same.low, same.high) == (loose.low, loose.high)
    with pytest.raises(DataError, match="one label per item"):
        probing.selectivity(correct, control, groups=groups[:10])


def test_run_probes_averages_n_control_draws_from_the_config():
    data = [(f"this is {['good', 'bad'][i % 2]} stuff {i}", i % 2) for i in range(60)]
    assert probing.ProbeConfig().n_control == 10
    config = probing.ProbeConfig(layers=[1], cv=2, n_control=3, sites=("v",))
    result = probing.run_probes(
        make_tiny_model("llama"), TOK, config, data[:40], data[40:], progress_bar=False
    )
    assert all("control_sd" in r for r in result.records)
    (x, y), (xt, yt) = planted(40), planted(20, seed=1)
    with pytest.raises(DataError, match="n_control"):
        probing.fit_probe(x, y, xt, yt, n_control=0)
