"""Statistics shared by the experiments: bootstrap intervals and the verdict rule.

Every headline number carries a 95% bootstrap interval over items; a fixed seed gives the same
interval. Verdicts follow one rule, written into each result (:func:`decide`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclass(frozen=True)
class Estimate:
    """A statistic with its 95% bootstrap interval over ``n`` items."""

    value: float
    low: float
    high: float
    n: int

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
) -> Estimate:
    """Percentile bootstrap of ``statistic`` over the first axis of ``values`` (items)."""
    x = np.asarray(values, dtype=np.float64)
    if x.shape[0] == 0:
        raise ValueError("cannot bootstrap an empty sample")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    stats = np.array([statistic(x[i]) for i in idx])
    alpha = (1 - level) / 2
    return Estimate(
        float(statistic(x)),
        float(np.quantile(stats, alpha)),
        float(np.quantile(stats, 1 - alpha)),
        x.shape[0],
    )


def paired_difference(a, b, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Mean of ``a - b`` over paired items, with its interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} vs {b.shape}")
    return bootstrap(a - b, n_boot=n_boot, seed=seed)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (for accuracies of probes)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (float(centre - half), float(centre + half))


@dataclass(frozen=True)
class Verdict:
    """A claim, what was measured, the effect with its interval, and the rule that decided it."""

    claim: str
    measured: str
    effect: Estimate
    verdict: str
    rule: str
    command: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["effect"] = self.effect.to_dict()
        return d


def decide(effect: Estimate, threshold: float = 0.0, larger_supports: bool = True) -> str:
    """The one verdict rule: supported if the whole 95% interval lies beyond ``threshold`` on the
    side the claim predicts, not supported if it lies wholly on the other side (or at/below it),
    inconclusive if the interval straddles the threshold."""
    lo, hi = effect.low, effect.high
    if not larger_supports:
        lo, hi, threshold = -hi, -lo, -threshold
    if lo > threshold:
        return SUPPORTED
    if hi <= threshold:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def rule_text(threshold: float, larger_supports: bool = True, what: str = "effect") -> str:
    side = ">" if larger_supports else "<"
    other = "<=" if larger_supports else ">="
    return (
        f"supported if the 95% CI of the {what} lies wholly {side} {threshold:g}; "
        f"not supported if it lies wholly {other} {threshold:g}; otherwise inconclusive"
    )
