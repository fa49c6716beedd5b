"""Monitors (vsteer.monitor), watching generate, and conditional steering, on tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import VOCAB, make_tiny_model, random_ids

import vsteer
from vsteer.encoding import pad_batch
from vsteer.monitor import Monitor, MonitorError, fit, watch
from vsteer.vectors import SteeringVector


class WordTokenizer:
    """Words -> ids by a hash (no special tokens), with a trivial chat template."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True, **_):
        ids = [3 + sum(map(ord, w)) % (VOCAB - 3) for w in text.split()]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        return " ".join(m["content"] for m in messages) + (" answer:" if add_generation_prompt else "")


TOK = WordTokenizer()
POS = [
    f"{w} {i} alpha red fire danger"
    for i, w in enumerate("one two three four five six seven eight nine ten".split())
]
NEG = [
    f"{w} {i} calm blue water"
    for i, w in enumerate("one two three four five six seven eight nine ten".split())
]


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def mon(llama):
    return fit(llama, TOK, POS, NEG, site="v", layers=[0], fpr=0.2, calibration=0.5, C=1.0)


def _rows(seed=3, lengths=(5, 9, 3, 7)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _generate(model, rows, n=5, **steer_kw):
    batch = pad_batch(rows, 0, "left")
    kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if steer_kw:
            with vsteer.steer(model, **steer_kw):
                out = model.generate(**batch, **kw)
        else:
            out = model.generate(**batch, **kw)
    return out[:, batch["input_ids"].shape[1] :]


def _vec(model, layers=(1, 2), size=4.0, site="v"):
    from vsteer.arch import get_arch
    from vsteer.hooks import site_shape

    g = torch.Generator().manual_seed(0)
    shape = site_shape(get_arch(model), site)
    return SteeringVector.for_model(
        model, {lay: size * torch.randn(shape, generator=g) for lay in layers}, site
    )


# ---- fitting, files, metadata -------------------------------------------------------------------
def test_fit_separates_the_training_classes_and_calibrates_the_threshold(llama, mon):
    scores = mon.score(llama, TOK, POS + NEG)
    assert scores[:10].mean() > scores[10:].mean()
    assert mon.fpr == 0.2 and mon.extra["n_calibration"] == [5, 5]
    # at most floor(0.2 * 5) = 1 calibration negative lies above the threshold
    assert mon.extra["calibration_fpr"] <= 0.2
    # the calibration split vouches only for the Wilson upper bound: 0 or 1 of 5 negatives above
    k = round(mon.extra["calibration_fpr"] * 5)
    assert mon.extra["calibration_fpr_upper"] == pytest.approx({0: 0.4345, 1: 0.6245}[k], abs=1e-3)


def test_calibration_fpr_upper_bound_shrinks_with_more_calibration_negatives(llama):
    few = fit(llama, TOK, POS, NEG, site="v", layers=[1], fpr=0.2, calibration=0.5, C=1.0)
    negatives = [f"{n} {w}" for n in NEG for w in ("calm", "still", "slow", "soft")]  # 40 negatives
    many = fit(llama, TOK, POS, negatives, site="v", layers=[1], fpr=0.2, calibration=0.5, C=1.0)
    assert many.extra["n_calibration"][1] == 20 and few.extra["n_calibration"][1] == 5
    assert many.extra["calibration_fpr_upper"] < few.extra["calibration_fpr_upper"]
    assert many.extra["calibration_fpr"] <= many.extra["calibration_fpr_upper"] < 0.5


def test_save_load_round_trip_keeps_weights_threshold_and_metadata(llama, mon, tmp_path):
    path = mon.save(tmp_path / "m.safetensors")
    back = Monitor.load(path, llama, site="v")
    assert back.layers == mon.layers and back.site == "v" and back.position == "last"
    assert torch.equal(back.weights[0], mon.weights[0])
    assert back.threshold == mon.threshold and back.bias == mon.bias
    assert back.fingerprint == mon.fingerprint and back.data == mon.data
    assert [d["role"] for d in back.data] == ["positive", "negative"] and len(back.data[0]["sha256"]) == 64
    assert np.allclose(back.score(llama, TOK, POS[:3]), mon.score(llama, TOK, POS[:3]))


def test_monitor_from_another_model_is_refused(mon, tmp_path):
    path = mon.save(tmp_path / "m.safetensors")
    with pytest.raises(MonitorError, match="fitted on model .*fingerprint"):
        Monitor.load(path, make_tiny_model("gemma3"))


def test_monitor_at_another_site_is_refused(llama, mon, tmp_path):
    path = mon.save(tmp_path / "m.safetensors")
    with pytest.raises(MonitorError, match="reads site 'v'; expected a monitor at site 'k'"):
        Monitor.load(path, llama, site="k")


def test_file_whose_site_disagrees_with_its_weights_is_refused(llama, mon, tmp_path):
    from safetensors.torch import save_file

    meta = {**mon.metadata(), "site": "q"}  # q has 4 heads, the weights are v-shaped (2 heads)
    save_file(
        {"layer.0": mon.weights[0]}, str(tmp_path / "m.safetensors"), metadata={"vsteer": json.dumps(meta)}
    )
    with pytest.raises(MonitorError, match="site 'q' has weights of shape"):
        Monitor.load(tmp_path / "m.safetensors", llama)


def test_nan_threshold_is_refused(mon, tmp_path):
    with pytest.raises(MonitorError, match="threshold must be a finite number, got nan"):
        Monitor(weights=mon.weights, bias=0.0, threshold=float("nan"))
    from safetensors.torch import save_file

    meta = {**mon.metadata(), "threshold": math.nan}
    save_file(
        {"layer.0": mon.weights[0]}, str(tmp_path / "m.safetensors"), metadata={"vsteer": json.dumps(meta)}
    )
    with pytest.raises(MonitorError, match="threshold must be a finite number"):
        Monitor.load(tmp_path / "m.safetensors")


@pytest.mark.parametrize("side", ["positive", "negative"])
def test_empty_positives_or_negatives_are_refused(llama, side):
    pos, neg = ([], NEG) if side == "positive" else (POS, [])
    with pytest.raises(MonitorError, match=f"needs {side} items"):
        fit(llama, TOK, pos, neg, layers=[0])


def test_calibration_split_too_small_for_the_fpr_is_refused(llama):
    with pytest.raises(
        MonitorError,
        match="calibration split has 2 negatives; a false-positive rate of 0.01 needs at least 100",
    ):
        fit(llama, TOK, POS, NEG, layers=[0], fpr=0.01, calibration=0.25)


# ---- per-row scores ---------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["last", "mean"])
def test_left_padded_mixed_batch_scores_each_row_as_alone(llama, position):
    m = fit(llama, TOK, POS, NEG, site="v", layers=[0, 2], position=position, fpr=None)
    items = [POS[0], NEG[3], POS[7] + " and much longer words here now", NEG[1]]
    batch = m.score(llama, TOK, items, batch_size=4)
    alone = np.array([m.score(llama, TOK, [it])[0] for it in items])
    assert np.allclose(batch, alone, atol=1e-4)


def test_completion_position_reads_only_the_completion(llama):
    m = fit(llama, TOK, POS, NEG, layers=[1], position="mean", fpr=None)
    m.position = "completion"
    from vsteer.extraction import Example

    a = m.score(llama, TOK, [Example("same prompt here", "alpha red fire")])
    b = m.score(llama, TOK, [Example("other prompt words", "alpha red fire")])
    assert not np.allclose(a, b)  # causal attention: the prompt still shapes the completion
    with pytest.raises(MonitorError, match="needs \\(prompt, completion\\) items"):
        m.score(llama, TOK, ["plain text"])


# ---- watching generate ------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["last", "mean"])
def test_watch_scores_prompt_and_each_step_like_score_on_the_text_so_far(llama, position):
    m = fit(llama, TOK, POS, NEG, site="k", layers=[0, 1], position=position, fpr=None)
    rows = _rows()
    batch = pad_batch(rows, 0, "left")
    with torch.no_grad(), watch(llama, m) as flags:
        out = llama.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    gen = out[:, batch["input_ids"].shape[1] :].tolist()
    assert flags.scores.shape == (4, 4)  # prompt + 3 decoding steps (the last token is not fed back)
    for i, r in enumerate(rows):
        for t in range(4):
            expected = m.score(llama, TOK, [r + gen[i][:t]])[0]
            assert abs(float(flags.scores[i, t]) - expected) < 1e-4, (i, t)
    assert flags.fired.shape == (4,)


def test_watch_gives_each_row_of_a_batch_the_scores_it_gets_alone(llama, mon):
    rows = _rows(seed=5)
    batch = pad_batch(rows, 0, "left")
    with torch.no_grad(), watch(llama, mon) as flags:
        llama.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    together = flags.scores
    for i, r in enumerate(rows):
        with torch.no_grad(), watch(llama, mon) as one:
            llama.generate(input_ids=torch.tensor([r]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.allclose(together[i], one.scores[0], atol=1e-4), i


def test_watch_refuses_a_monitor_for_another_model(mon):
    with pytest.raises(MonitorError, match="fitted on model"):
        with watch(make_tiny_model("gemma3"), mon):
            pass


# ---- conditional steering ---------------------------------------------------------------------
def _split_threshold(model, mon, rows):
    """A copy of ``mon`` whose threshold lies between the rows' scores: some fire, some do not."""
    from dataclasses import replace

    s = np.sort(mon.score(model, TOK, rows))
    m = replace(mon, threshold=float((s[1] + s[2]) / 2))
    fired = m.score(model, TOK, rows) > m.threshold
    assert fired.sum() == 2
    return m, fired


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_conditional_steering_gives_each_row_the_output_it_gets_alone(llama, mon, positions):
    rows = _rows()
    m, fired = _split_threshold(llama, mon, rows)
    vec = _vec(llama)
    batch = _generate(llama, rows, vectors=vec, scale=1.0, positions=positions, when=m)
    plain = _generate(llama, rows)
    steered = _generate(llama, rows, vectors=vec, scale=1.0, positions=positions)
    for i, r in enumerate(rows):
        alone = _generate(llama, [r], vectors=vec, scale=1.0, positions=positions, when=m)
        assert torch.equal(batch[i], alone[0]), f"row {i}"
        assert torch.equal(batch[i], (steered if fired[i] else plain)[i]), f"row {i}"
    assert not torch.equal(steered[fired], plain[fired])  # the steering changes the rows that fire


def test_conditional_steering_yields_the_prompt_flags(llama, mon):
    rows = _rows()
    m, fired = _split_threshold(llama, mon, rows)
    batch = pad_batch(rows, 0, "left")
    with torch.no_grad(), vsteer.steer(llama, _vec(llama), 1.0, when=m) as flags:
        llama.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert flags.prompt.tolist() == fired.tolist()


def test_conditional_steering_of_the_prompt_before_the_monitor_layer_is_refused(llama):
    m = fit(llama, TOK, POS, NEG, layers=[1], fpr=None)
    with pytest.raises(MonitorError, match="cannot reach the prompt"):
        with vsteer.steer(llama, _vec(llama, layers=(0, 2)), 1.0, when=m):
            pass
    with vsteer.steer(llama, _vec(llama, layers=(0, 2)), 1.0, positions="generated", when=m):
        pass  # generated tokens come after the decision


def test_recheck_steers_a_row_from_the_step_its_score_fires_and_each_row_as_alone(llama, mon):
    from dataclasses import replace

    from vsteer.monitor import recheck

    rows = _rows()
    vec = _vec(llama)
    plain = _generate(llama, rows, n=6)
    # the rows' scores over the unsteered generation; a threshold above every prompt score but
    # below some later step's: no row fires at the prompt, some fire during generation
    with torch.no_grad(), watch(llama, mon) as seen:
        llama.generate(**pad_batch(rows, 0, "left"), max_new_tokens=6, do_sample=False, pad_token_id=0)
    prompt_max = float(seen.scores[:, 0].max())
    later = seen.scores[:, 1:]
    assert float(later.max()) > prompt_max, "this seed needs a step that scores above every prompt"
    m = replace(mon, threshold=(prompt_max + float(later.max())) / 2)
    batch = _generate(llama, rows, n=6, vectors=vec, scale=1.0, when=recheck(m, every=1))
    changed = 0
    for i, r in enumerate(rows):
        alone = _generate(llama, [r], n=6, vectors=vec, scale=1.0, when=recheck(m, every=1))
        assert torch.equal(batch[i], alone[0]), f"row {i}"
        fires = (later[i] > m.threshold).nonzero()
        if len(fires) == 0:
            assert torch.equal(batch[i], plain[i]), f"row {i} never fires and must stay unsteered"
        else:  # step j + 1 feeds generated token j and fires: tokens 0..j were chosen unsteered
            j = int(fires[0])
            assert torch.equal(batch[i, : j + 1], plain[i, : j + 1]), f"row {i}"
            changed += not torch.equal(batch[i], plain[i])
    assert changed, "a row that fires during generation must be steered from then on"
    # with the prompt-only rule no row fires, so nothing changes
    assert torch.equal(_generate(llama, rows, n=6, vectors=vec, scale=1.0, when=m), plain)


def test_recheck_needs_a_monitor_and_a_positive_step_count(mon):
    from vsteer.monitor import recheck

    with pytest.raises(MonitorError, match="every must be a positive number of decoding steps, got 0"):
        recheck(mon, every=0)
    with pytest.raises(MonitorError, match="Recheck needs a Monitor, got str"):
        recheck("mon")


def test_public_names():
    assert vsteer.monitor.fit is fit and vsteer.watch is watch and vsteer.Monitor is Monitor


# ---- the refusal direction and the experiment --------------------------------------------------
class ChatTokenizer(WordTokenizer):
    """A template with a two-token assistant opener after the request, and a decoder."""

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        return " ".join(m["content"] for m in messages) + (" assistant: now" if add_generation_prompt else "")

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(map(str, r.tolist())) for r in rows]


CHAT = ChatTokenizer()


def test_post_instruction_finds_the_template_tokens_after_the_request():
    from vsteer.experiments.monitoring import post_instruction

    ids, n = post_instruction(CHAT, "how do I bake bread")
    assert len(ids) == 7 and n == 5  # 5 request words, then "assistant:" and "now"


def test_refusal_direction_equals_the_hand_computed_difference_of_means(llama):
    from vsteer.experiments.monitoring import refusal_direction

    harmful = ["build a bomb at home", "steal a car quickly tonight please", "hack the bank"]
    harmless = ["bake bread", "plan a trip to the sea with friends", "learn French"]
    vecs = refusal_direction(llama, CHAT, harmful, harmless, ("v", "resid"), [0, 2])

    def post_mean(site, layer, text):  # one text alone, the mean over its two opener tokens
        ids = CHAT.apply_chat_template([{"content": text}], add_generation_prompt=True).split()
        x = torch.tensor([CHAT(" ".join(ids))["input_ids"]])
        with torch.no_grad(), vsteer.capture(llama, [(site, layer)]) as acts:
            llama(input_ids=x)
        return acts[(site, layer)][0, -2:].double().mean(0)

    for site in ("v", "resid"):
        assert vecs[site].layers == [0, 2] and vecs[site].method == "refusal_direction"
        for layer in (0, 2):
            hand = torch.stack([post_mean(site, layer, t) for t in harmful]).mean(0) - torch.stack(
                [post_mean(site, layer, t) for t in harmless]
            ).mean(0)
            assert torch.allclose(vecs[site][layer].double(), hand, atol=1e-5), (site, layer)


def test_refusal_direction_at_one_post_instruction_token_is_that_tokens_difference_of_means(llama):
    from vsteer.experiments.monitoring import refusal_direction

    harmful = ["build a bomb at home", "steal a car quickly tonight please", "hack the bank"]
    harmless = ["bake bread", "plan a trip to the sea with friends", "learn French"]

    def at(site, layer, text, offset):  # one text alone, the activation at that opener token
        ids = CHAT.apply_chat_template([{"content": text}], add_generation_prompt=True).split()
        x = torch.tensor([CHAT(" ".join(ids))["input_ids"]])
        with torch.no_grad(), vsteer.capture(llama, [(site, layer)]) as acts:
            llama(input_ids=x)
        return acts[(site, layer)][0, offset].double()

    for offset in (-1, -2):
        vecs = refusal_direction(llama, CHAT, harmful, harmless, ("v", "resid"), [1], offset=offset)
        assert vecs["v"].position == f"post-instruction[{offset}]"
        for site in ("v", "resid"):
            hand = torch.stack([at(site, 1, t, offset) for t in harmful]).mean(0) - torch.stack(
                [at(site, 1, t, offset) for t in harmless]
            ).mean(0)
            assert torch.allclose(vecs[site][1].double(), hand, atol=1e-5), (site, offset)
    for bad in (-3, 0, 1):  # CHAT's opener has two tokens
        with pytest.raises(ValueError, match="2 post-instruction tokens"):
            refusal_direction(llama, CHAT, harmful, harmless, ("v",), [1], offset=bad)


def test_refusal_scores_are_the_log_odds_of_a_refusal_token_and_per_row_scales_match_rows_alone(llama):
    from vsteer.experiments.monitoring import _user, refusal_scores, refusal_token_ids

    prompts = ["bake bread now", "hack the bank", "plan a trip to the sea"]
    ids = refusal_token_ids(CHAT)
    assert ids == sorted({CHAT(p)["input_ids"][0] for p in ("I'm", "I", "As")})  # first words of the phrases
    got = refusal_scores(llama, CHAT, prompts)
    for i, p in enumerate(prompts):
        x = torch.tensor([vsteer.encoding.token_ids(CHAT, _user(p))])
        with torch.no_grad():
            logp = torch.log_softmax(llama(input_ids=x).logits[0, -1].double(), -1)
        q = logp[ids].exp().sum()
        assert got[i] == pytest.approx(float(torch.log(q / (1 - q))), abs=1e-4)
    vec = SteeringVector.for_model(llama, {1: torch.randn(llama.config.hidden_size) * 3}, "resid")
    rows = prompts + prompts
    scales = torch.tensor([0.0] * 3 + [2.0] * 3)
    batched = refusal_scores(llama, CHAT, rows, vectors=vec, scale=scales)
    np.testing.assert_allclose(batched[:3], got, atol=1e-4)  # scale 0 rows are the unsteered ones
    alone = refusal_scores(llama, CHAT, prompts, vectors=vec, scale=2.0)
    np.testing.assert_allclose(batched[3:], alone, atol=1e-4)
    assert np.abs(alone - got).max() > 1e-3  # the vector does move the score


def test_refusal_position_search_scores_every_position_layer_and_scale_then_generates_the_top(
    llama, monkeypatch
):
    from vsteer.data import monitor_data as md
    from vsteer.experiments.monitoring import MonitorOptions, refusal_position_search

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    monkeypatch.setattr(md, "advbench_goals", lambda: [f"harm {w} now" for w in words])
    monkeypatch.setattr(md, "helpful_requests", lambda: [f"help {w} please" for w in words])
    monkeypatch.setattr(md, "jbb_goals", lambda: [{"goal": f"jail {w}"} for w in words])
    opts = MonitorOptions(n_prompt=8, n_select=2, n_cross=2, max_new_tokens=2, max_harmless=1.0)
    res = refusal_position_search(
        llama, CHAT, opts, layers=[0, 1], scales=(1.0, 4.0), top=2, progress_bar=False
    )
    scores = [r for r in res.records if r["kind"] == "score" and r["site"] != "none"]
    assert {(r["site"], r["layer"], r["offset"], r["scale"]) for r in scores} == {
        (site, str(layer), o, s)
        for site in ("resid", "v")
        for layer in (0, 1)
        for o in (-2, -1)
        for s in (1.0, 4.0)
    }
    rates = [r for r in res.records if r["kind"] == "rate"]
    assert len(rates) == 2 * (1 + 2 * 2)  # unsteered + top 2 per site, harmful and harmless each
    for site in ("resid", "v"):
        best = sorted((r for r in scores if r["site"] == site), key=lambda r: -r["harmful"])[:2]
        tried = {(r["layer"], r["offset"], r["scale"]) for r in rates if r["site"] == site}
        assert tried == {(r["layer"], r["offset"], r["scale"]) for r in best}
    assert set(res.meta["chosen"]) == {"resid", "v"} and "offset" in res.meta["chosen"]["v"]


def test_choose_refusal_setting_takes_the_highest_harmful_rate_within_the_harmless_cap():
    from vsteer.experiments.monitoring import choose_refusal_setting

    def rec(site, layer, scale, harmful, harmless):
        return [
            dict(site=site, layer=layer, scale=scale, prompts="harmful", refusal_rate=harmful),
            dict(site=site, layer=layer, scale=scale, prompts="harmless", refusal_rate=harmless),
        ]

    records = (
        rec("none", "", 0.0, 0.0, 0.0)
        + rec("v", "6", 8.0, 1.0, 0.9)  # refuses everything: over the cap
        + rec("v", "12", 4.0, 0.75, 0.25)
        + rec("v", "12", 8.0, 0.75, 0.25)  # same rates, larger scale: the tie goes to 4.0
        + rec("v", "18", 2.0, 0.5, 0.0)
        + rec("resid", "6", 1.0, 1.0, 1.0)
    )
    chosen = choose_refusal_setting(records, max_harmless=0.5)
    assert chosen == {"v": dict(layer="12", scale=4.0, harmful=0.75, harmless=0.25)}  # no resid fits


def test_monitor_section_runs_on_a_tiny_model_with_tables_plot_and_verdicts(llama, tmp_path):
    from vsteer.experiments.monitoring import MonitorOptions
    from vsteer.run import _make_config, _section_attr, load_profile

    run = _section_attr("monitor", 1)
    for profile in ("smoke", "cpu", "full"):
        _make_config("monitor", load_profile(profile)["monitor"])  # every profile has valid sizes
    opts = MonitorOptions(
        sites=("v", "resid"), layers=[0, 1], n_prompt=80, n_pairs=8, n_statement=8, n_cross=8,
        n_steer=4, steer_layers="2", resid_layers="2", steer_scale=4.0, max_new_tokens=2, batch_size=32,
    )  # fmt: skip
    res = run(llama, CHAT, config=opts, seed=3, progress_bar=False)
    assert res.meta["options"]["seed"] == 3
    assert {r["task"] for r in res.records} == {
        "prompt",
        "cross-source",
        "response",
        "statement",
        "statement-cross",
    }
    assert {r["site"] for r in res.records} == {"bag-of-words", "v", "resid"}
    arms = [(r["arm"], r["prompts"]) for r in res.meta["steering"]]
    assert len(arms) == 8 and arms[0] == ("(a) none", "harmful")
    assert res.meta["steering_meta"]["refusal"] == "direction"
    assert res.meta["steering_meta"]["monitor_layer"] == 1
    for r in res.meta["steering"]:  # a row that does not fire is unchanged: changed <= flagged
        if r["flagged"] != "":
            assert r["changed"] <= r["flagged"] + 1e-9
    rules = {f.rule_id for f in res.findings}
    assert {"monitor.conditional_keeps_gain", "monitor.conditional_harmless_unchanged"} <= rules
    res.plot(tmp_path / "roc.png")
    assert (tmp_path / "roc.png").stat().st_size > 1000


def test_paired_readers_fit_within_conversation_differences_and_the_verdict_reads_pairs():
    """Replies of one conversation share a large conversation-level component that an unpaired fit
    must separate across conversations; the Bradley-Terry fit on differences ignores it. On
    synthetic pairs where only one small direction tells the more harmful reply, the paired bag of
    words ranks every held-out pair right, and the paired bootstrap resamples conversations."""
    from vsteer.experiments.monitoring import _boot_diff, bag_of_words, concordance

    rng = np.random.default_rng(0)
    topics = [" ".join(rng.choice(list("abcdefghij"), 6)) for _ in range(80)]
    rejected = [f"{t} sure here is how harm" for t in topics]
    chosen = [f"{t} sure here is how help" for t in topics]
    bp, bn = bag_of_words(rejected[:40], chosen[:40], rejected[40:], chosen[40:], paired=True)
    assert concordance(bp, bn) == 1.0
    assert concordance(np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 3.0])) == pytest.approx(0.5)
    a, b = rng.normal(size=50), rng.normal(size=50)
    same = _boot_diff(concordance, a + 1, a, b + 1, b, paired=True)  # both readers order every pair right
    assert same.value == 0 and same.low == 0 and same.high == 0 and same.n == 50
    half = _boot_diff(concordance, a + 1, a, b + np.where(np.arange(50) % 2, 1, -1), b, paired=True)
    assert half.value == pytest.approx(0.5) and half.low < 0.5 < half.high


# ---- the embedded model and the shipped data ------------------------------------------------------
@pytest.mark.slow
def test_value_monitor_separates_held_out_harmful_from_harmless_prompts_on_smollm2():
    from vsteer.data import monitor_data as md
    from vsteer.experiments.monitoring import auroc

    model, tok = vsteer.load_model("smollm2-135m-instruct")
    harm_tr, harm_te = md.split(md.advbench_goals()[:120], (0.5, 0.5), seed=0)
    help_tr, help_te = md.split(md.helpful_requests()[:120], (0.5, 0.5), seed=1)
    assert not set(harm_tr) & set(harm_te) and not set(help_tr) & set(help_te)

    def chat(texts):
        return [[{"role": "user", "content": t}] for t in texts]

    mon = fit(model, tok, chat(harm_tr), chat(help_tr), site="v", layers=[10], fpr=None)
    pos, neg = mon.score(model, tok, chat(harm_te)), mon.score(model, tok, chat(help_te))
    assert auroc(pos, neg) > 0.9


# ---- command line -------------------------------------------------------------------------------
def test_cli_reads_builtin_sets_and_jsonl_files_and_names_a_bad_row(tmp_path):
    from vsteer.commands.monitor import _read_texts
    from vsteer.errors import DataError

    texts, src = _read_texts("advbench", limit=3)
    assert len(texts) == 3 and src[0]["path"] == "monitor/advbench/goals.jsonl"
    good = tmp_path / "t.jsonl"
    good.write_text('{"text": "a"}\n{"prompt": "b"}\n')
    assert _read_texts(str(good))[0] == ["a", "b"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a"}\n{"other": 1}\n')
    with pytest.raises(DataError, match="b.jsonl:2: expected a 'text', 'prompt' or 'goal' field"):
        _read_texts(str(bad))


def test_cli_has_fit_score_and_eval():
    from vsteer.cli import build_parser

    parser = build_parser()
    for cmd in ("fit", "score", "eval", "search"):
        with pytest.raises(SystemExit):
            parser.parse_args(["monitor", cmd, "--help"])


@pytest.mark.parametrize("n_prompt", [40, 80, 120, 240])
def test_refusal_search_selection_requests_never_enter_the_prompt_task_whatever_its_size(n_prompt):
    """The selection split chooses the refusal vector's layer and scale; it was drawn from outside the
    prompt task of the run's own n_prompt, so a search at one size and a run at another shared items
    (at 120 and 80: 2 harmful and 1 harmless held-out request had been selection requests)."""
    from vsteer.experiments.monitoring import MonitorOptions, _selection_split, build_tasks

    search = _selection_split(MonitorOptions(n_prompt=120))
    opts = MonitorOptions(n_prompt=n_prompt)
    assert _selection_split(opts) == search  # independent of n_prompt
    tasks = build_tasks(opts)
    for k, selected in enumerate(search):
        used = set(tasks["prompt"]["train"][k]) | set(tasks["prompt"]["test"][k])
        assert len(used) == n_prompt and len(selected) == opts.n_select
        assert not used & set(selected)


@pytest.mark.parametrize("n_prompt", [80, 120, 400])
def test_cross_source_test_positives_are_no_advbench_goals(n_prompt):
    """11 of JBB-Behaviors' 100 goals are AdvBench goals word for word; at n_prompt 80 one of the
    cross-source test positives was also a training positive (found in review)."""
    from vsteer.data import monitor_data as md
    from vsteer.experiments.monitoring import MonitorOptions, _norm, build_tasks

    tasks = build_tasks(MonitorOptions(n_prompt=n_prompt, n_cross=100))
    test_pos = tasks["cross-source"]["test"][0]
    advbench = {_norm(t) for t in md.advbench_goals()}
    assert len(test_pos) == 89 and not {_norm(t) for t in test_pos} & advbench
    assert not set(test_pos) & set(tasks["prompt"]["train"][0])


def test_bucketed_generation_keeps_each_prompts_completion_and_flags_in_order(llama):
    """monitoring._generate runs prompts in batches of similar length and puts outputs back in order."""
    from dataclasses import replace

    from vsteer.experiments.monitoring import _generate as generate
    from vsteer.experiments.monitoring import _user

    prompts = [POS[0], "short", NEG[1] + " and then some more words here", POS[3] + " more", NEG[2]]
    vec = _vec(llama, layers=(2,))
    mon = fit(llama, CHAT, POS, NEG, site="v", layers=[1], fpr=0.2, calibration=0.5, C=1.0)
    batch = vsteer.encoding.encode_batch(CHAT, [_user(p) for p in prompts])
    with vsteer.steer(llama, vec, scale=1.0, when=mon) as seen, torch.no_grad():
        llama(**batch)
    scores = np.sort(seen.scores[:, 0].numpy())  # the gate's own prompt scores, rows alone or not
    m = replace(mon, threshold=float((scores[1] + scores[2]) / 2))  # some prompts fire, some do not
    runs = {}
    for name, kw in (("plain", {}), ("gated", dict(vectors=vec, scale=1.0, when=m))):
        one, flags_one = generate(llama, CHAT, prompts, 4, True, batch_size=len(prompts), **kw)
        small, flags_small = generate(llama, CHAT, prompts, 4, True, batch_size=2, **kw)
        alone = [generate(llama, CHAT, [p], 4, batch_size=1, **kw)[0] for p in prompts]
        assert one == small == alone
        assert (flags_one is None) == (flags_small is None) == (name == "plain")
        assert flags_one is None or flags_one.tolist() == flags_small.tolist()
        runs[name] = (small, flags_small)
    (plain, _), (gated, flags) = runs["plain"], runs["gated"]
    assert flags.any() and not flags.all()
    assert [a != b for a, b in zip(gated, plain, strict=True)] == flags.tolist()  # only rows that fire


def test_refusal_search_scores_every_setting_on_the_reserved_requests_and_applies_the_rule(llama):
    from vsteer.experiments.monitoring import MonitorOptions, refusal_search

    grid = {"v": {"layers": [1, "1-2"], "scales": [2.0, 8.0]}, "resid": {"layers": [2], "scales": [1.0]}}
    opts = MonitorOptions(n_prompt=40, n_select=4, search_grid=grid, max_new_tokens=2, max_harmless=1.0)
    res = refusal_search(llama, CHAT, opts, progress_bar=False)
    settings = [(r["site"], r["layer"], r["scale"]) for r in res.records if r["prompts"] == "harmful"]
    assert settings == [
        ("none", "", 0.0),
        ("v", "1", 2.0),
        ("v", "1", 8.0),
        ("v", "1-2", 2.0),
        ("v", "1-2", 8.0),
        ("resid", "2", 1.0),
    ]
    assert len(res.records) == 2 * len(settings) and res.meta["n_select"] == 4
    for site, chosen in res.meta["chosen"].items():  # the highest harmful rate among the site's settings
        rates = [r["refusal_rate"] for r in res.records if r["site"] == site and r["prompts"] == "harmful"]
        assert chosen["harmful"] == max(rates)


def test_cli_monitor_search_writes_a_report_and_refuses_an_unknown_option(llama, tmp_path, monkeypatch):
    from vsteer.cli import main
    from vsteer.commands import monitor as cmd

    monkeypatch.setattr(cmd, "load_model_from_args", lambda args: (llama, CHAT))
    out = tmp_path / "search"
    grid = "search_grid={v: {layers: [1], scales: [2.0]}, resid: {layers: [2], scales: [1.0]}}"
    args = ["monitor", "search", "--set", "n_prompt=40", "--set", "n_select=4", "--set", "max_new_tokens=2"]
    assert main([*args, "--set", grid, "-o", str(out)]) == 0
    assert "chosen" in (out / "report.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["records"]) == 6  # unsteered + 2 settings, harmful and harmless each
    before = (out / "report.md").read_bytes()
    assert main([*args, "--set", "n_selcet=4", "-o", str(out)]) != 0  # a typo: one line, nothing written
    assert (out / "report.md").read_bytes() == before


@pytest.mark.parametrize(
    "grid, message",
    [
        ([1, 2], "got [1, 2]"),
        ({"k": {"layers": [1], "scales": [2.0]}}, "got site 'k'"),
        ({"v": {"layers": [1]}}, "got v: {'layers': [1]}"),
        ({"v": {"layers": [], "scales": [2.0]}}, "got v.layers: [] (a non-empty list)"),
        ({"v": {"layers": [1], "scales": ["big"]}}, "got v.scales: ['big'] (numbers)"),
    ],
)
def test_a_malformed_search_grid_is_one_line(llama, grid, message):
    from vsteer.errors import RecipeError
    from vsteer.experiments.monitoring import MonitorOptions, refusal_search

    with pytest.raises(RecipeError, match="search_grid must map") as err:
        refusal_search(llama, CHAT, MonitorOptions(n_prompt=40, n_select=4, search_grid=grid))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_watch_scores_a_row_that_ended_inside_a_batch_as_it_scores_alone():
    """generate feeds an ended row its EOS and then padding while the others go on: those steps
    score NaN, so the row's scores and ``fired`` equal what it gets alone (found in review)."""
    from dataclasses import replace

    model = make_tiny_model("qwen2")
    mon = replace(
        fit(model, TOK, POS, NEG, site="v", layers=[0, 2], position="last", fpr=None), threshold=10.0
    )
    rows = _rows(seed=5, lengths=(5, 12, 3, 7))
    batch = pad_batch(rows, 0, "left")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), watch(model, mon) as flags:
        out = model.generate(**batch, **kw)
    new = out[:, batch["input_ids"].shape[1] :]
    eos = model.generation_config.eos_token_id
    ended = [i for i in range(len(rows)) if eos in new[i, :-1].tolist()]
    assert ended, "the seed must make a row end early for this test to check anything"
    for i in range(len(rows)):
        ids = torch.tensor([rows[i]])
        with torch.no_grad(), watch(model, mon) as alone:
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        n = alone.scores.shape[1]
        torch.testing.assert_close(flags.scores[i, :n], alone.scores[0], rtol=0, atol=1e-4)
        assert torch.isnan(flags.scores[i, n:]).all()
        assert bool(flags.fired[i]) == bool(alone.fired[0])


def test_gated_steering_survives_batches_of_different_sizes_in_one_block():
    """The gate of the last generate call (3 rows) must not reach the next call's prompt pass
    (1 row) before the monitor has decided there (found in review: a shape error)."""
    model = make_tiny_model("llama")
    arch = vsteer.get_arch(model)
    g = torch.Generator().manual_seed(0)
    mon = Monitor(
        weights={2: torch.randn(*arch.site_shape("v"), generator=g)}, bias=0.0, threshold=-1e9, site="v"
    )
    vec = SteeringVector.for_model(model, {0: 3.0 * torch.randn(*arch.site_shape("v"), generator=g)}, "v")
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for sizes in ((3, 1), (2, 3)):
            outs, alone = [], []
            with vsteer.steer(model, vec, positions="generated", when=mon):
                for b in sizes:
                    ids = random_ids(b, 5, seed=b)
                    outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), **kw))
            for b in sizes:
                ids = random_ids(b, 5, seed=b)
                with vsteer.steer(model, vec, positions="generated", when=mon):
                    alone.append(model.generate(ids, attention_mask=torch.ones_like(ids), **kw))
            assert all(torch.equal(o, a) for o, a in zip(outs, alone, strict=True))
