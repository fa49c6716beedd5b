"""Verdicts: pure functions of a measurement (:class:`~vsteer.evaluate.Finding`) and a rule.

Experiments and cached pieces store *findings* (what was measured, with its interval); the
verdict is derived from a finding and its :class:`Rule` every time a report is written, so a
rule change needs no rerun and an old verdict is never replayed. Rules are data, in
``vsteer/recipes/verdicts.yaml`` (rule id -> threshold, direction, ROPE, rationale); that file
is not part of any piece's cache key, and this module is not part of any code fingerprint.

API (for experiments)::

    from vsteer.evaluate import bootstrap, finding

    f = finding(
        "swaps.wk_barely",                 # a rule id in vsteer/recipes/verdicts.yaml
        claim="swapping W_K barely matters",
        measured="mean Δlog-perplexity of W_K swaps",
        effect=bootstrap(values, seed=seed),   # an Estimate
        command="vsteer swap",
    )
    ExperimentResult(..., findings=[f])

and for reports::

    rules = load_rules()                   # or load_rules("my_rules.yaml")
    verdicts = judge_all(findings, rules)  # raw verdict + Holm-adjusted verdict per finding

A rules file maps ids to::

    swaps.wk_barely:
      what: mean Δlog-perplexity        # the quantity, for the rule's text
      threshold: 0.0953                 # the claim's boundary
      larger_supports: false            # which side of it the claim predicts
      rope: [-0.0953, 0.0953]           # region of practical equivalence
      null_claim: true                  # a "no effect / barely matters" claim
      rationale: one line on why these numbers

The rule (95% intervals, ``lo``/``hi``):

- directional claim (``null_claim: false``), ``larger_supports: true``: *supported* when the
  interval lies wholly above the threshold and above the ROPE; *not supported* when it lies
  wholly at or below the threshold, or wholly inside the ROPE (practically equal to it);
  otherwise *inconclusive*. ``larger_supports: false`` mirrors this.
- null claim: *supported* only when the whole interval lies inside the ROPE, *not supported*
  when it lies wholly outside it, otherwise *inconclusive*.

Multiplicity: :func:`judge_all` also gives each verdict a one-sided p-value (a normal
approximation from its interval: ``se = (hi - lo) / (2 * 1.96)``; two one-sided tests for null
claims) and applies Holm's step-down correction over all findings judged together. A raw
*supported* verdict whose Holm-adjusted p-value exceeds 0.025 (the one-sided level of a 95%
interval) becomes *inconclusive* in ``holm_verdict``; other verdicts are unchanged. Holm keeps
the chance of any false *supported* among the whole set at 2.5%. The same correction within each
claim's family of rules (:func:`family`: the rule id up to its first dot) gives ``claim_verdict``:
the chance of any false *supported* about one claim stays at 2.5%.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vsteer.errors import RecipeError
from vsteer.evaluate import Estimate, Finding

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
ALPHA = 0.025  # one-sided level matching a two-sided 95% interval
_Z = 1.959963984540054

RULES_FILE = Path(__file__).parent / "recipes" / "verdicts.yaml"
_RULE_KEYS = ("what", "threshold", "larger_supports", "rope", "null_claim", "rationale")


@dataclass(frozen=True)
class Rule:
    """When a 95% interval supports a claim (see the module docstring).

    ``rope``: the region of practical equivalence ``(low, high)``; required for null claims.
    """

    threshold: float = 0.0
    larger_supports: bool = True
    rope: tuple[float, float] | None = None
    null_claim: bool = False
    what: str = "effect"
    rationale: str = ""

    def __post_init__(self):
        if self.rope is not None:
            lo, hi = (float(x) for x in self.rope)
            if not lo <= hi:
                raise RecipeError(f"ROPE {list(self.rope)} must be [low, high] with low <= high")
            object.__setattr__(self, "rope", (lo, hi))
            if not self.null_claim and not lo <= self.threshold <= hi:
                raise RecipeError(f"ROPE {[lo, hi]} must contain the threshold {self.threshold:g}")
        elif self.null_claim:
            raise RecipeError("a null claim ('no effect', 'barely matters') needs a ROPE")

    def text(self) -> str:
        """The rule in one sentence, for the report."""
        what = self.what
        if self.null_claim:
            lo, hi = self.rope
            return (
                f"supported if the 95% CI of the {what} lies wholly inside the ROPE [{lo:g}, {hi:g}]; "
                "not supported if it lies wholly outside; otherwise inconclusive"
            )
        side, other = (">", "<=") if self.larger_supports else ("<", ">=")
        t = self.threshold
        if self.rope is None:
            return (
                f"supported if the 95% CI of the {what} lies wholly {side} {t:g}; "
                f"not supported if it lies wholly {other} {t:g}; otherwise inconclusive"
            )
        lo, hi = self.rope
        edge = hi if self.larger_supports else lo
        return (
            f"supported if the 95% CI of the {what} lies wholly {side} {edge:g} (beyond the ROPE "
            f"[{lo:g}, {hi:g}] around {t:g}); not supported if it lies wholly {other} {t:g} or inside "
            "the ROPE; otherwise inconclusive"
        )


def decide(effect: Estimate, rule: Rule | float = 0.0, larger_supports: bool = True) -> str:
    """The verdict of ``effect`` under ``rule`` (or, as before, a bare threshold and direction)."""
    if not isinstance(rule, Rule):
        rule = Rule(threshold=float(rule), larger_supports=larger_supports)
    lo, hi = effect.low, effect.high
    if rule.null_claim:
        a, b = rule.rope
        if a <= lo and hi <= b:
            return SUPPORTED
        if hi < a or lo > b:
            return NOT_SUPPORTED
        return INCONCLUSIVE
    t, rope = rule.threshold, rule.rope
    if not rule.larger_supports:  # mirror so that larger always supports
        lo, hi, t = -hi, -lo, -t
        rope = None if rope is None else (-rope[1], -rope[0])
    edge = t if rope is None else max(t, rope[1])
    if lo > edge:
        return SUPPORTED
    if hi <= t or (rope is not None and rope[0] <= lo and hi <= rope[1]):
        return NOT_SUPPORTED
    return INCONCLUSIVE


def rule_text(threshold: float, larger_supports: bool = True, what: str = "effect") -> str:
    """The text of a bare threshold rule (kept for callers of the old API)."""
    return Rule(threshold=threshold, larger_supports=larger_supports, what=what).text()


def p_value(effect: Estimate, rule: Rule) -> float:
    """One-sided p-value of "supported" under ``rule``, by a normal approximation of the interval
    (1 where the estimate or its interval is not a number).

    The standard error comes from the half of the interval that faces the edge being tested
    (``value - low`` for "larger than", ``high - value`` for "smaller than"), so a skewed percentile
    interval gives p < 0.025 exactly where its end clears the edge, as the raw verdict reads it:
    Holm over one finding changes nothing. An estimate outside its own interval falls back to the
    interval's half width."""
    if not all(math.isfinite(x) for x in (effect.value, effect.low, effect.high)):
        return 1.0
    v, lo, hi = effect.value, effect.low, effect.high
    half = (hi - lo) / (2 * _Z)
    se_low = (v - lo) / _Z if v > lo else half  # the spread below the estimate
    se_high = (hi - v) / _Z if hi > v else half  # and above it

    def above(edge: float) -> float:  # p for H0: effect <= edge, from the lower half
        if se_low <= 0:
            return 0.0 if v > edge else 1.0
        return 0.5 * math.erfc((v - edge) / se_low / math.sqrt(2))

    def below(edge: float) -> float:  # p for H0: effect >= edge, from the upper half
        if se_high <= 0:
            return 0.0 if v < edge else 1.0
        return 0.5 * math.erfc((edge - v) / se_high / math.sqrt(2))

    if rule.null_claim:
        a, b = rule.rope
        return max(above(a), below(b))
    if rule.larger_supports:
        return above(rule.threshold if rule.rope is None else max(rule.threshold, rule.rope[1]))
    return below(rule.threshold if rule.rope is None else min(rule.threshold, rule.rope[0]))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order. A p-value that is not a finite
    number (from an estimate that is NaN) counts as 1: it can never be rejected, and it still
    counts in ``m``; sorting NaN would leave the step-down order undefined."""
    p_values = [p if isinstance(p, int | float) and math.isfinite(p) else 1.0 for p in p_values]
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Verdict:
    """A finding judged by its rule: the raw verdict, and the Holm-adjusted one when judged in a set."""

    claim: str
    measured: str
    effect: Estimate
    verdict: str
    rule: str
    command: str = ""
    rule_id: str = ""
    p_value: float | None = None
    p_holm: float | None = None
    holm_verdict: str | None = None
    p_claim: float | None = None
    claim_verdict: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["effect"] = self.effect.to_dict()
        return d


def _flag(spec: Mapping, key: str, default: bool) -> bool:
    """A rule's yes/no key: YAML true/false only (a quoted "false" would read as true)."""
    value = spec.get(key, default)
    if not isinstance(value, bool):
        raise RecipeError(f"{key} must be true or false, got {value!r}")
    return value


def load_rules(path: str | os.PathLike | None = None) -> dict[str, Rule]:
    """Read a rules file (default: the shipped ``vsteer/recipes/verdicts.yaml``), checked."""
    import yaml

    path = Path(path) if path is not None else RULES_FILE
    if not path.is_file():
        raise RecipeError(f"verdict rules file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"verdict rules {str(path)!r} must map rule ids to rules")
    rules = {}
    for rid, spec in raw.items():
        if not isinstance(spec, dict):
            raise RecipeError(f"verdict rule {rid!r} in {path.name} must be a mapping")
        unknown = set(spec) - set(_RULE_KEYS)
        if unknown:
            raise RecipeError(
                f"unknown key {sorted(unknown)[0]!r} in verdict rule {rid!r}; expected some of {', '.join(_RULE_KEYS)}"
            )
        if not spec.get("rationale"):
            raise RecipeError(f"verdict rule {rid!r} in {path.name} needs a one-line rationale")
        try:
            rules[str(rid)] = Rule(
                threshold=float(spec.get("threshold", 0.0)),
                larger_supports=_flag(spec, "larger_supports", True),
                rope=tuple(spec["rope"]) if spec.get("rope") is not None else None,
                null_claim=_flag(spec, "null_claim", False),
                what=str(spec.get("what", "effect")),
                rationale=str(spec["rationale"]),
            )
        except RecipeError as err:
            raise RecipeError(f"verdict rule {rid!r} in {path.name}: {err}") from None
    return rules


_SHIPPED: dict[str, Rule] | None = None


def shipped_rules() -> dict[str, Rule]:
    global _SHIPPED
    if _SHIPPED is None:
        _SHIPPED = load_rules()
    return _SHIPPED


def _rule_of(f: Finding, rules: Mapping[str, Rule]) -> Rule:
    try:
        return rules[f.rule_id]
    except KeyError:
        raise RecipeError(
            f"no verdict rule {f.rule_id!r} (claim {f.claim!r}); add it to the rules file"
        ) from None


def judge(f: Finding, rules: Mapping[str, Rule] | None = None) -> Verdict:
    """The raw verdict of one finding (no multiplicity adjustment)."""
    rule = _rule_of(f, shipped_rules() if rules is None else rules)
    return Verdict(
        f.claim,
        f.measured,
        f.effect,
        decide(f.effect, rule),
        rule.text(),
        f.command,
        f.rule_id,
        p_value(f.effect, rule),
    )


def family(rule_id: str) -> str:
    """The claim a rule belongs to: its id up to the first dot (``adapters.style.v_vs_qk`` ->
    ``adapters``); each section of the report tests one claim of the document."""
    return rule_id.split(".", 1)[0]


def _downgrade(v: Verdict, p: float) -> str:
    return INCONCLUSIVE if v.verdict == SUPPORTED and p > ALPHA else v.verdict


def judge_all(findings: Iterable[Finding], rules: Mapping[str, Rule] | None = None) -> list[Verdict]:
    """Verdicts of a set of findings, each with two Holm-adjusted p-values and verdicts: within
    its claim's family (``p_claim``, ``claim_verdict``: the chance of any false *supported*
    about that claim stays at 2.5%) and over the whole set (``p_holm``, ``holm_verdict``)."""
    raw = [judge(f, rules) for f in findings]
    adjusted = holm([v.p_value for v in raw])
    by_family: dict[str, list[int]] = {}
    for i, v in enumerate(raw):
        by_family.setdefault(family(v.rule_id), []).append(i)
    within = [0.0] * len(raw)
    for idx in by_family.values():
        for i, p in zip(idx, holm([raw[i].p_value for i in idx]), strict=True):
            within[i] = p
    return [
        Verdict(
            **{
                **v.__dict__,
                "p_holm": p,
                "holm_verdict": _downgrade(v, p),
                "p_claim": pc,
                "claim_verdict": _downgrade(v, pc),
            }
        )
        for v, p, pc in zip(raw, adjusted, within, strict=True)
    ]
