"""Statistics shared by the experiments: bootstrap intervals, Wilson intervals, findings.

Every headline number carries a 95% interval over items: a percentile bootstrap (a fixed seed gives
the same interval), except for proportions, where the bootstrap collapses: a mean of 0/1 outcomes
gets the Wilson score interval, a paired difference of two 0/1 outcomes Newcombe's hybrid score
interval (``Estimate.method`` says which). An experiment reports a claim as a :class:`Finding` (made with :func:`finding`): the
measurement and the id of the rule that judges it. Verdicts are computed from findings and the
rules file at report time, in :mod:`vsteer.verdicts` (see there for the rule and Holm).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclass(frozen=True)
class Estimate:
    """A statistic with its 95% interval over ``n`` items; ``method``: how the interval was made
    (``"bootstrap"``, ``"wilson"``, ``"newcombe"``, ...)."""

    value: float
    low: float
    high: float
    n: int
    method: str = "bootstrap"

    def __str__(self) -> str:
        return f"{self.value:.3g} [{self.low:.3g}, {self.high:.3g}]"

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    proportion: bool = True,
) -> Estimate:
    """Percentile bootstrap of ``statistic`` over the first axis of ``values`` (items).

    The mean of a 0/1 sample (a proportion) gets the Wilson score interval instead: a percentile
    bootstrap of a proportion is ``[p, p]`` whenever every item agrees (0 refusals in 8 prompts gives
    [0, 0], as if 8 prompts proved the rate is 0) and covers too rarely near 0 and 1.
    ``proportion=False``: values that only happen to be 0 or 1 (differences of scores) are not a
    proportion, whose Wilson interval could never reach below 0."""
    x = np.asarray(values, dtype=np.float64)
    if x.shape[0] == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if proportion and statistic is np.mean and _binary(x):
        low, high = wilson_interval(int(x.sum()), x.shape[0], _z(level))
        return Estimate(float(x.mean()), low, high, x.shape[0], "wilson")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    if statistic is np.mean:  # vectorised: the mean over all but the resample axis
        stats = x[idx].reshape(n_boot, -1).mean(axis=1)
    else:
        stats = np.array([statistic(x[i]) for i in idx])
    alpha = (1 - level) / 2
    return Estimate(
        float(statistic(x)),
        float(np.quantile(stats, alpha)),
        float(np.quantile(stats, 1 - alpha)),
        x.shape[0],
    )


def paired_difference(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean of ``a - b`` over paired items, with its interval: a percentile bootstrap, or for two
    0/1 outcomes per item (refused or not, flipped or not) :func:`newcombe_paired`."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} vs {b.shape}")
    if a.ndim == 1 and a.shape[0] and _binary(a) and _binary(b):
        return newcombe_paired(a, b, level)
    # a difference of scores is never a proportion, even where every item's is 0 or 1
    return bootstrap(a - b, n_boot=n_boot, seed=seed, level=level, proportion=False)


def newcombe_paired(a, b, level: float = 0.95) -> Estimate:
    """Difference of two paired proportions, ``mean(a) - mean(b)`` for 0/1 outcomes on the same
    items, with Newcombe's hybrid score interval (Newcombe 1998, *Stat. Med.* 17:2635, method 10):
    the Wilson intervals of both proportions, combined with the phi correlation of the pairs, whose
    numerator ``ad - bc`` is shrunk to ``max(ad - bc - n/2, 0)`` when positive, as Newcombe does
    (phi = 0 when a margin is empty). Unlike a bootstrap it does not collapse to a point when the
    pairs all agree: 0 discordant pairs in 8 give about [-0.32, 0.32]."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n = a.shape[0]
    both, only_a = int((a & b).sum()), int((a & ~b).sum())
    only_b, neither = int((~a & b).sum()), int((~a & ~b).sum())
    z = _z(level)
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, z)
    l2, u2 = wilson_interval(both + only_b, n, z)
    denom = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    cross = max(cross - n / 2, 0.0) if cross > 0 else cross
    phi = cross / math.sqrt(denom) if denom else 0.0
    d = p1 - p2
    delta = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    eps = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return Estimate(float(d), float(max(d - delta, -1.0)), float(min(d + eps, 1.0)), n, "newcombe")


def _binary(x: np.ndarray) -> bool:
    """Every value is 0 or 1 (outcomes, not scores)."""
    return x.ndim == 1 and bool(np.all((x == 0) | (x == 1)))


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - (1 - level) / 2)


def stratified_bootstrap(
    values: Sequence[float] | np.ndarray,
    strata: Sequence,
    weights: dict,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """Percentile bootstrap of a stratified mean ``Σ_h w_h · mean(values of stratum h)``.

    ``strata`` names each item's stratum, ``weights`` each stratum's share of the population (they
    are renormalised over the strata the sample holds). Items are resampled within their stratum,
    as a stratified sample is drawn, so a stratum that is rare in the population but heavy in the
    sample counts by its population share, not its sample share.

    Each stratum's resampled means are rescaled about its mean by ``sqrt(n_h / (n_h - 1))`` (the
    rescaling bootstrap of Rao & Wu, 1988): a plain within-stratum bootstrap has variance
    ``(n_h - 1) / n_h · s_h² / n_h``, half the textbook ``s_h² / n_h`` in a stratum of 2 items, which
    is what a small stratum of a stratified sample holds. A stratum of one item adds no spread."""
    x = np.asarray(values, dtype=np.float64)
    labels = np.asarray(strata)
    if x.shape[0] == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} values but {labels.shape[0]} stratum labels")
    present = list(dict.fromkeys(labels.tolist()))
    missing = [h for h in present if h not in weights]
    if missing:
        raise ValueError(f"no population weight for stratum {missing[0]!r}")
    total = sum(float(weights[h]) for h in present)
    rng = np.random.default_rng(seed)
    value, stats = 0.0, np.zeros(n_boot)
    for h in present:
        xh = x[labels == h]
        w = float(weights[h]) / total
        value += w * xh.mean()
        n = xh.shape[0]
        boot = xh[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        scale = math.sqrt(n / (n - 1)) if n > 1 else 0.0
        stats += w * (xh.mean() + scale * (boot - xh.mean()))
    alpha = (1 - level) / 2
    return Estimate(
        float(value), float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha)), x.shape[0]
    )


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (accuracies of probes, refusal rates, shares)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(float(centre - half), 0.0), min(float(centre + half), 1.0))


@dataclass(frozen=True)
class Finding:
    """A measurement behind a claim: what cached pieces and experiment results store.

    ``rule_id`` names the rule in ``vsteer/recipes/verdicts.yaml`` that turns it into a verdict
    (at report time, see :mod:`vsteer.verdicts`); the finding itself holds no verdict.
    """

    rule_id: str
    claim: str
    measured: str
    effect: Estimate
    command: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["effect"] = self.effect.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Finding:
        return cls(d["rule_id"], d["claim"], d["measured"], Estimate(**d["effect"]), d.get("command", ""))


def finding(rule_id: str, *, claim: str, measured: str, effect: Estimate, command: str = "") -> Finding:
    """A :class:`Finding`; ``rule_id`` must name a rule of the shipped rules file."""
    if rule_id not in _shipped_rule_ids():
        from vsteer.errors import RecipeError

        raise RecipeError(f"unknown verdict rule {rule_id!r}; add it to vsteer/recipes/verdicts.yaml")
    if not isinstance(effect, Estimate):
        raise TypeError(f"effect must be an Estimate, got {type(effect).__name__}")
    return Finding(rule_id, claim, measured, effect, command)


@cache
def _shipped_rule_ids() -> frozenset[str]:
    # read here, not through vsteer.verdicts, so that the rules never become part of this module
    import yaml

    return frozenset(yaml.safe_load((Path(__file__).parent / "recipes" / "verdicts.yaml").read_text()) or {})
