"""Verdict statistics: the rule, its ROPE, Holm, the bootstrap, Wilson and the recovered fraction."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from vsteer.errors import RecipeError
from vsteer.evaluate import (
    Estimate,
    Finding,
    bootstrap,
    finding,
    paired_difference,
    stratified_bootstrap,
    wilson_interval,
)
from vsteer.experiments.patching import recovered_fraction
from vsteer.verdicts import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    Rule,
    decide,
    holm,
    judge,
    judge_all,
    load_rules,
    p_value,
    shipped_rules,
)


def est(lo, hi, value=None):
    return Estimate((lo + hi) / 2 if value is None else value, lo, hi, 50)


@pytest.mark.parametrize(
    "lo, hi, expected",
    [
        (0.1, 0.3, SUPPORTED),
        (-0.3, -0.1, NOT_SUPPORTED),
        (-0.1, 0.2, INCONCLUSIVE),
        (-0.2, 0.0, NOT_SUPPORTED),
    ],
)
def test_decide_against_a_threshold(lo, hi, expected):
    assert decide(est(lo, hi), Rule(threshold=0.0)) == expected
    assert decide(est(lo, hi), 0.0) == expected  # the old signature


@pytest.mark.parametrize(
    "lo, hi, expected",
    [(0.4, 0.55, SUPPORTED), (0.65, 0.8, NOT_SUPPORTED), (0.5, 0.7, INCONCLUSIVE), (0.6, 0.7, NOT_SUPPORTED)],
)
def test_decide_direction_flip_supports_smaller_effects(lo, hi, expected):
    rule = Rule(threshold=0.6, larger_supports=False)
    assert decide(est(lo, hi), rule) == expected
    assert decide(est(lo, hi), 0.6, larger_supports=False) == expected
    # mirroring the data and the threshold gives the same verdict as the flipped rule
    assert decide(est(-hi, -lo), Rule(threshold=-0.6)) == expected


@pytest.mark.parametrize(
    "lo, hi, expected",
    [
        (0.02, 0.2, INCONCLUSIVE),  # beyond 0 but not beyond the ROPE: could be practically zero
        (0.06, 0.2, SUPPORTED),  # wholly beyond the ROPE
        (-0.04, 0.04, NOT_SUPPORTED),  # wholly inside the ROPE: practically no effect
        (-0.2, -0.1, NOT_SUPPORTED),
    ],
)
def test_a_directional_claim_must_clear_its_rope(lo, hi, expected):
    assert decide(est(lo, hi), Rule(threshold=0.0, rope=(-0.05, 0.05))) == expected


def test_a_flipped_claim_must_clear_the_low_edge_of_its_rope():
    rule = Rule(threshold=0.6, larger_supports=False, rope=(0.59, 0.61))
    assert decide(est(0.5, 0.595), rule) == INCONCLUSIVE
    assert decide(est(0.5, 0.58), rule) == SUPPORTED
    assert decide(est(0.592, 0.605), rule) == NOT_SUPPORTED  # practically at the line


@pytest.mark.parametrize(
    "lo, hi, expected",
    [
        (-0.05, 0.08, SUPPORTED),
        (0.05, 0.2, INCONCLUSIVE),
        (0.12, 0.3, NOT_SUPPORTED),
        (-0.3, -0.11, NOT_SUPPORTED),
    ],
)
def test_a_no_effect_claim_is_supported_only_inside_its_rope(lo, hi, expected):
    rule = Rule(threshold=0.1, larger_supports=False, rope=(-0.1, 0.1), null_claim=True)
    assert decide(est(lo, hi), rule) == expected


def test_rules_that_cannot_be_judged_are_refused():
    with pytest.raises(RecipeError, match="needs a ROPE"):
        Rule(null_claim=True)
    with pytest.raises(RecipeError, match="must contain the threshold"):
        Rule(threshold=0.5, rope=(0.0, 0.1))


def test_every_shipped_rule_has_a_rope_and_a_rationale_and_every_finding_a_rule():
    rules = shipped_rules()
    for rid, rule in rules.items():
        assert rule.rationale, rid
        # the claim experiments' rules each carry a ROPE (a non-inferiority rule elsewhere may
        # rest on its margin alone)
        if rid.split(".")[0] in ("swaps", "probing", "patching", "basis", "steering"):
            assert rule.rope is not None, rid
    used = set()
    for path in (Path(__file__).parents[1] / "vsteer" / "experiments").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "finding" and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant):
                    used.add(arg.value)
                elif isinstance(arg, ast.JoinedStr):  # f"basis.{key}"
                    used.update(r for r in rules if r.startswith(arg.values[0].value))
    assert used and used <= set(rules), used - set(rules)


def test_a_finding_names_a_known_rule():
    with pytest.raises(RecipeError, match="unknown verdict rule 'swaps.nope'"):
        finding("swaps.nope", claim="c", measured="m", effect=est(0, 1))


def test_a_rules_file_with_an_unknown_key_is_one_clear_line(tmp_path):
    bad = tmp_path / "rules.yaml"
    bad.write_text("x.y:\n  threshold: 0\n  rope: [-1, 1]\n  rationale: r\n  colour: red\n")
    with pytest.raises(RecipeError, match="unknown key 'colour' in verdict rule 'x.y'") as err:
        load_rules(bad)
    assert "\n" not in str(err.value)


def test_p_value_is_the_one_sided_level_when_the_interval_touches_the_edge():
    e = Estimate(0.196, 0.0, 0.392, 50)  # symmetric 95% interval whose low end is at 0
    assert p_value(e, Rule(threshold=0.0)) == pytest.approx(0.025, rel=1e-3)
    assert p_value(
        Estimate(-0.196, -0.392, 0.0, 50), Rule(threshold=0.0, larger_supports=False)
    ) == pytest.approx(0.025, rel=1e-3)
    # two one-sided tests for a null claim: the worse of the two edges decides
    null = Rule(threshold=0.1, rope=(-0.1, 0.1), null_claim=True)
    assert p_value(Estimate(0.0, -0.1, 0.1, 50), null) == pytest.approx(0.025, rel=1e-3)


@pytest.mark.parametrize("rule_kw", [{}, {"larger_supports": False}, {"rope": (-0.05, 0.05)}])
def test_p_value_agrees_with_the_verdict_for_skewed_intervals(rule_kw):
    """Found in review: the p-value took its standard error from the whole interval as if it were
    symmetric, so a skewed percentile interval that clears the edge (raw: supported) could get
    p > 0.025 and be downgraded by Holm over one finding. Now p < 0.025 exactly where the raw
    verdict is supported, for any skew."""
    rule = Rule(threshold=0.0, **rule_kw)
    g = np.random.default_rng(0)
    for _ in range(2000):
        v = g.normal(0, 0.3)
        lo, hi = v - g.exponential(0.2) - 1e-6, v + g.exponential(0.2) + 1e-6
        e = Estimate(v, lo, hi, 50)
        assert (p_value(e, rule) < 0.025) == (decide(e, rule) == SUPPORTED), (e, rule_kw)
    skewed = Estimate(0.12, 0.1, 2.0, 50)
    assert decide(skewed, Rule(threshold=0.0)) == SUPPORTED
    assert (
        judge_all([Finding("r", "c", "m", skewed)], {"r": Rule(threshold=0.0)})[0].holm_verdict == SUPPORTED
    )
    null = Rule(threshold=0.1, rope=(-0.1, 0.1), null_claim=True)
    for e in (Estimate(0.095, -0.09, 0.099, 50), Estimate(0.0, -0.2, 0.05, 50), Estimate(0, -0.05, 0.05, 9)):
        assert (p_value(e, null) < 0.025) == (decide(e, null) == SUPPORTED)


def test_a_quoted_boolean_in_a_rules_file_is_refused(tmp_path):
    """Found in review: ``larger_supports: "false"`` read as true and reversed the rule."""
    bad = tmp_path / "rules.yaml"
    bad.write_text('x.y:\n  threshold: 0\n  larger_supports: "false"\n  rationale: r\n')
    with pytest.raises(RecipeError, match="larger_supports must be true or false, got 'false'") as err:
        load_rules(bad)
    assert "\n" not in str(err.value)
    bad.write_text("x.y:\n  threshold: 0\n  larger_supports: false\n  rationale: r\n")
    assert load_rules(bad)["x.y"].larger_supports is False


def test_holm_adjusts_like_the_textbook():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([]) == []


@pytest.mark.parametrize("where", [0, 1, 3])
def test_a_nan_p_value_counts_as_one_wherever_it_sits(where):
    """Found in review: sorting with a NaN key left the step-down order undefined, so one NaN
    (from a NaN estimate) could push every other p-value to 1."""
    p = [0.01, 0.01, 0.01]
    p.insert(where, float("nan"))
    out = holm(p)
    assert out[where] == 1.0
    assert [x for i, x in enumerate(out) if i != where] == pytest.approx([0.04, 0.04, 0.04])
    assert p_value(Estimate(float("nan"), float("nan"), float("nan"), 10), Rule(threshold=0.0)) == 1.0


def test_judge_all_downgrades_marginal_supported_verdicts_under_holm():
    rule = {"r": Rule(threshold=0.0)}
    strong = Finding("r", "strong", "m", Estimate(1.0, 0.8, 1.2, 50))
    marginal = Finding("r", "marginal", "m", Estimate(0.22, 0.01, 0.43, 50))  # p ~ 0.02
    alone = judge(marginal, rule)
    assert alone.verdict == SUPPORTED and 0.01 < alone.p_value < 0.025
    # with the strong one, a single marginal finding still passes (Holm's last step is at alpha)
    assert [v.holm_verdict for v in judge_all([strong, marginal], rule)] == [SUPPORTED, SUPPORTED]
    # two marginal ones: the smaller p is tested at alpha / 2 and fails, and so does the other
    verdicts = judge_all([strong, marginal, marginal], rule)
    assert [v.verdict for v in verdicts] == [SUPPORTED] * 3
    assert [v.holm_verdict for v in verdicts] == [SUPPORTED, INCONCLUSIVE, INCONCLUSIVE]
    assert [v.p_holm for v in verdicts] == pytest.approx(holm([v.p_value for v in verdicts]))


def test_judge_all_corrects_within_each_claim_and_over_the_report():
    """Two claims (rule-id prefixes a and b): a marginal finding alone in its claim survives the
    per-claim correction but not the report-wide one, where it shares the correction with b's."""
    rules = {"a.x": Rule(threshold=0.0), "b.y": Rule(threshold=0.0), "b.z": Rule(threshold=0.0)}
    marginal = Estimate(0.22, 0.01, 0.43, 50)  # p ~ 0.02
    fs = [
        Finding("a.x", "a", "m", marginal),
        Finding("b.y", "b1", "m", marginal),
        Finding("b.z", "b2", "m", marginal),
    ]
    vs = judge_all(fs, rules)
    assert [v.claim_verdict for v in vs] == [SUPPORTED, INCONCLUSIVE, INCONCLUSIVE]
    assert [v.holm_verdict for v in vs] == [INCONCLUSIVE] * 3
    assert vs[0].p_claim == pytest.approx(vs[0].p_value)
    assert [v.p_claim for v in vs[1:]] == pytest.approx(holm([vs[1].p_value, vs[2].p_value]))


def test_a_rule_change_changes_the_verdict_of_the_same_finding():
    f = Finding("r", "c", "m", Estimate(0.03, 0.01, 0.05, 50))
    assert judge(f, {"r": Rule(threshold=0.0)}).verdict == SUPPORTED
    assert judge(f, {"r": Rule(threshold=0.0, rope=(-0.1, 0.1))}).verdict == NOT_SUPPORTED


def test_bootstrap_95_interval_covers_a_known_mean_93_to_97_percent_of_the_time():
    # 800 draws: the binomial sd of the coverage is sqrt(.95 * .05 / 800) = 0.77 points, so
    # [93%, 97%] is about +-2.6 sd around 95% (a correct interval fails this with p ~ 1%; the
    # percentile bootstrap's small-sample undercoverage at n=60 is about half a point)
    rng = np.random.default_rng(1234)
    draws, n, mu = 800, 60, 0.3
    hits = 0
    for i in range(draws):
        e = bootstrap(rng.normal(mu, 1.0, size=n), n_boot=500, seed=i)
        hits += e.low <= mu <= e.high
    assert 0.93 <= hits / draws <= 0.97, hits / draws


def test_bootstrap_is_seeded_and_its_interval_brackets_the_statistic():
    x = np.random.default_rng(0).normal(size=40)
    a, b = bootstrap(x, seed=5), bootstrap(x, seed=5)
    assert a == b and a.low < a.value < a.high and a.n == 40
    assert a.value == pytest.approx(x.mean())
    # a custom statistic goes through the loop path and agrees with the vectorised mean
    c = bootstrap(x, statistic=lambda v: float(np.mean(v)), seed=5)
    assert (c.low, c.high) == pytest.approx((a.low, a.high))
    with pytest.raises(ValueError, match="empty"):
        bootstrap([])


def test_paired_difference_is_the_mean_of_differences():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 1.0, 1.0, 2.5])
    assert paired_difference(a, b).value == pytest.approx(1.25)
    with pytest.raises(ValueError, match="differ in shape"):
        paired_difference(a, b[:3])


@pytest.mark.parametrize(
    "k, n, lo, hi",
    # reference values: Wilson score interval, z = 1.96 (e.g. Newcombe 1998, Table I; R binom.confint)
    [(8, 10, 0.4902, 0.9433), (0, 10, 0.0, 0.2775), (50, 100, 0.4038, 0.5962), (81, 263, 0.2553, 0.3662)],
)
def test_wilson_interval_matches_reference_values(k, n, lo, hi):
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(lo, abs=1e-4) and high == pytest.approx(hi, abs=1e-4)


def test_wilson_interval_of_no_trials_is_everything():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_recovered_fraction_is_a_ratio_of_means_not_a_mean_of_ratios():
    clean, donor = np.zeros(2), np.array([1.0, 10.0])
    patched = np.array([1.0, 0.0])  # per-pair ratios 1 and 0 (mean 0.5); ratio of means 1/11
    assert recovered_fraction(patched, clean, donor).value == pytest.approx(1 / 11)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_recovered_fraction_recovers_a_known_share_with_its_interval(share):
    rng = np.random.default_rng(7)
    clean = rng.normal(0, 1, 200)
    donor = clean + rng.normal(3, 1, 200)
    noise = rng.normal(0, 0.2, 200)
    patched = clean + share * (donor - clean) + noise - noise.mean()  # the sample's share is exact
    e = recovered_fraction(patched, clean, donor, n_boot=500)
    assert e.low <= share <= e.high and e.high - e.low < 0.1
    assert math.isclose(e.value, share, abs_tol=0.03)


def test_stratified_bootstrap_estimates_the_population_mean_when_a_rare_stratum_is_overdrawn():
    # a population where 10% of items sit in a stratum with mean 3 and 90% in one with mean 0.2,
    # sampled 20 + 60: the plain sample mean is pulled to 0.85, the stratified mean is not
    rng = np.random.default_rng(7)
    weights, mu = {"rare": 0.1, "common": 0.9}, 0.1 * 3.0 + 0.9 * 0.2
    labels = ["rare"] * 20 + ["common"] * 60
    draws, hits, values, plain = 800, 0, [], []
    for i in range(draws):
        x = np.r_[rng.normal(3.0, 1.0, size=20), rng.normal(0.2, 1.0, size=60)]
        e = stratified_bootstrap(x, labels, weights, n_boot=500, seed=i)
        hits += e.low <= mu <= e.high
        values.append(e.value)
        plain.append(x.mean())
    assert abs(np.mean(values) - mu) < 0.02 and np.mean(plain) - mu > 0.3
    # percentile-bootstrap coverage at n=60 per stratum is about 94%; 800 draws: sd 0.8 points
    assert 0.91 <= hits / draws <= 0.97, hits / draws


def test_stratified_bootstrap_rescales_small_strata_to_the_textbook_variance():
    # two items 0 and 2: resampled means 0, 1, 1, 2 (variance 1/2); rescaled by sqrt(2) about the
    # mean they are 1 -/+ sqrt(2) (variance s^2 / n = 2 / 2 = 1), so the interval's ends are exact
    e = stratified_bootstrap([0.0, 2.0], ["a", "a"], {"a": 1.0}, n_boot=4000, seed=0)
    assert e.value == pytest.approx(1.0)
    assert e.low == pytest.approx(1 - math.sqrt(2)) and e.high == pytest.approx(1 + math.sqrt(2))
    # a stratum of 3 beside one of 40: the interval's half-width is 1.96 textbook standard errors
    rng = np.random.default_rng(1)
    x = np.r_[rng.normal(0, 1, 3), rng.normal(0, 1, 40)]
    labels, w = ["s"] * 3 + ["l"] * 40, {"s": 0.5, "l": 0.5}
    se = math.sqrt(0.25 * x[:3].var(ddof=1) / 3 + 0.25 * x[3:].var(ddof=1) / 40)
    e = stratified_bootstrap(x, labels, w, n_boot=20000, seed=2)
    assert (e.high - e.low) / 2 == pytest.approx(1.96 * se, rel=0.12)


def test_stratified_bootstrap_weights_by_hand_and_refuses_unweighted_strata():
    x = np.array([4.0, 6.0, 1.0, 1.0, 4.0])  # stratum means 5 and 2
    labels = ["a", "a", "b", "b", "b"]
    e = stratified_bootstrap(x, labels, {"a": 0.25, "b": 0.75}, seed=3)
    assert e.value == pytest.approx(0.25 * 5 + 0.75 * 2) and e.n == 5 and e.low <= e.value <= e.high
    # weights renormalise over the strata the sample holds
    assert stratified_bootstrap(x[2:], labels[2:], {"a": 0.25, "b": 0.75}).value == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no population weight for stratum 'b'"):
        stratified_bootstrap(x, labels, {"a": 1.0})
    with pytest.raises(ValueError, match="stratum labels"):
        stratified_bootstrap(x, labels[:3], {"a": 1.0, "b": 1.0})


def test_a_proportion_whose_items_all_agree_gets_a_wilson_interval_not_a_point():
    # 0 refusals in 8 prompts: a percentile bootstrap says [0, 0]; the Wilson bound is z²/(n+z²)
    e = bootstrap(np.zeros(8))
    assert e.method == "wilson" and e.value == 0 and e.low == 0
    assert e.high == pytest.approx(1.96**2 / (8 + 1.96**2), abs=1e-4)
    assert (bootstrap(np.ones(16)).low, bootstrap(np.ones(16)).high) == pytest.approx(
        wilson_interval(16, 16), abs=1e-4
    )
    # scores (not 0/1) keep the bootstrap
    assert bootstrap(np.array([0.0, 0.5, 1.0, 1.0])).method == "bootstrap"


def _paired_table(both, only_a, only_b, neither):
    a = np.r_[np.ones(both + only_a), np.zeros(only_b + neither)]
    b = np.r_[np.ones(both), np.zeros(only_a), np.ones(only_b), np.zeros(neither)]
    return a, b


def test_paired_proportions_get_newcombes_interval():
    # every pair agrees (both 0): not [0, 0] but the Wilson bounds of the two margins
    e = paired_difference(*_paired_table(0, 0, 0, 8))
    wil = 1.96**2 / (8 + 1.96**2)
    assert e.method == "newcombe" and e.value == 0
    assert (e.low, e.high) == pytest.approx((-wil, wil), abs=1e-4)
    # with an empty margin phi is 0 and the interval is the independent-samples square-and-add
    a, b = _paired_table(0, 6, 0, 18)
    l1, u1 = wilson_interval(6, 24)
    l2, u2 = wilson_interval(0, 24)
    e = paired_difference(a, b)
    assert e.value == pytest.approx(0.25)
    assert e.low == pytest.approx(0.25 - math.hypot(0.25 - l1, u2), abs=1e-4)
    assert e.high == pytest.approx(0.25 + math.hypot(u1 - 0.25, l2), abs=1e-4)
    # the point is the mean difference, and swapping the arms mirrors the interval
    a, b = _paired_table(36, 12, 2, 0)
    e, m = paired_difference(a, b), paired_difference(b, a)
    assert e.value == pytest.approx(0.2) and (m.low, m.high) == pytest.approx((-e.high, -e.low))
    assert e.low < 0.2 < e.high


@pytest.mark.parametrize(
    "cells, n, most", [((0.05, 0.25, 0.05, 0.65), 30, 0.985), ((0.0, 0.08, 0.0, 0.92), 24, 1.0)]
)
def test_newcombe_95_interval_covers_a_known_paired_difference(cells, n, most):
    # 800 draws of n pairs from a known 2x2 table (both, only a, only b, neither); the coverage's
    # binomial sd is 0.77 points. Near the boundary (the second table: a rare event in one arm only)
    # Newcombe's interval is conservative, and the percentile bootstrap covers far less than 95%:
    # it is [0, 0] whenever no event is drawn (0.92^24 = 13% of draws)
    rng = np.random.default_rng(7)
    truth = cells[1] - cells[2]
    hits = boot_hits = 0
    for i in range(800):
        counts = rng.multinomial(n, cells)
        a, b = _paired_table(*counts)
        e = paired_difference(a, b)
        hits += e.low <= truth <= e.high
        boot = bootstrap(a - b, lambda v: float(v.mean()), n_boot=400, seed=i)  # percentile, as before
        boot_hits += boot.low <= truth <= boot.high
    assert 0.93 <= hits / 800 <= most, (hits / 800, boot_hits / 800)
    assert boot_hits < hits


def test_a_paired_difference_of_scores_is_never_given_a_proportions_interval():
    """Found in review: 23 pairs tied at a share of 0.5 and one pair +1 made every difference 0 or
    1, so the difference got a Wilson interval, [0.007, 0.20], which can never include 0."""
    a = np.array([0.5] * 23 + [1.0])
    b = np.array([0.5] * 23 + [0.0])
    est = paired_difference(a, b)
    assert est.method == "bootstrap" and est.low <= 0.0 < est.value
    assert bootstrap(a - b).method == "wilson"  # a plain 0/1 sample is still a proportion
