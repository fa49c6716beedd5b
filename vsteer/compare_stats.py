"""Statistics of an adapter comparison (:mod:`vsteer.compare`), computed afresh from the
per-item scores its pieces store: a change here reruns no training or scoring (the pieces'
code fingerprint leaves this module out), as a change of a verdict rule does not.

* :func:`shift_effect`: the likelihood shift of target (label 1) over contrast (label 0) items,
  ``mean(d | 1) - mean(d | 0)`` with ``d = logp_arm - logp_base`` per item, so learning the
  dataset's format (which moves both labels alike) cancels out. Paired items (DPO) are
  resampled as pairs, unpaired ones (SFT) within each label.
* :func:`seed_item_effect`: the same with seeds resampled too (a two-level bootstrap).
* :func:`projection_ablation`: the shift and share of it each projection type's update carries; :func:`preference_accuracy`.
"""

from __future__ import annotations

import numpy as np

from vsteer.evaluate import Estimate


def _stat(d: np.ndarray, labels: np.ndarray) -> float:
    return float(d[labels == 1].mean() - d[labels == 0].mean())


def _estimate(value: float, draws, n: int) -> Estimate:
    """``value`` with the 95% percentile interval of its bootstrap ``draws``."""
    return Estimate(value, float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975)), n)


def _resamples(labels: np.ndarray, groups, n_boot: int, seed: int) -> list[np.ndarray]:
    """Index arrays of bootstrap resamples: whole pairs when ``groups`` is given, else per label."""
    rng = np.random.default_rng(seed)
    if groups is not None and all(g is not None for g in groups):
        keys = sorted(set(groups))
        members = {k: [] for k in keys}
        for i, g in enumerate(groups):
            members[g].append(i)
        blocks = [np.array(members[k]) for k in keys]
        return [
            np.concatenate([blocks[j] for j in rng.integers(0, len(blocks), len(blocks))])
            for _ in range(n_boot)
        ]
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    return [np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(n_boot)]


def shift_effect(d, labels, groups=None, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Likelihood shift of target over contrast items, ``mean(d|1) - mean(d|0)``, 95% bootstrap CI."""
    d, labels = np.asarray(d, float), np.asarray(labels)
    stats = [_stat(d[i], labels[i]) for i in _resamples(labels, groups, n_boot, seed)]
    return _estimate(_stat(d, labels), stats, len(d))


def seed_item_effect(shifts, labels, groups=None, blocks=None, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """The effect with seeds resampled as well as items: a two-level bootstrap.

    ``shifts``: ``[n_seeds, n_items]`` per-item shifts of each seed's run (NaN where a run did not
    score the item). ``blocks``: each seed's scored item indices (``test_items: per-seed``): a
    resample draws ``n_seeds`` seeds with replacement and, for each draw, that seed's items
    with replacement (by label; whole pairs when ``groups`` is given). Without ``blocks`` every
    seed scored every item: seeds (rows) and items (columns) are resampled independently. The
    interval then answers for the seed-to-seed spread too, which an item bootstrap of
    seed-averaged shifts leaves out (with 3 seeds a crude account of it, and a conservative one:
    resampling both levels counts the item noise of each seed's mean twice, so with seeds that
    agree it is about 1.4x as wide as the item interval)."""
    shifts, labels = np.asarray(shifts, float), np.asarray(labels)
    n_seeds = shifts.shape[0]
    rng = np.random.default_rng(seed)
    paired = groups is not None and all(g is not None for g in groups)
    if blocks is None:
        blocks = [np.arange(shifts.shape[1])] * n_seeds
        shared = True
    else:
        blocks, shared = [np.asarray(b, dtype=int) for b in blocks], False

    def units(idx: np.ndarray):
        """(target units, contrast units) of ``idx``: pair rows (chosen, rejected) or label rows."""
        if paired:
            by: dict = {}
            for i in idx:
                by.setdefault(groups[i], {})[int(labels[i])] = i
            keep = [g for g in by.values() if 0 in g and 1 in g]
            return np.array([g[1] for g in keep]), np.array([g[0] for g in keep])
        return idx[labels[idx] == 1], idx[labels[idx] == 0]

    def draw(pos, neg):
        if paired:
            k = rng.integers(0, len(pos), len(pos))
            return pos[k], neg[k]
        return pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]

    per_block = [units(b) for b in blocks]
    stats = []
    for _ in range(n_boot):
        picks = rng.integers(0, n_seeds, n_seeds)
        if shared:  # one item resample for all drawn seeds: items and seeds cross
            pos, neg = draw(*per_block[0])
            d = np.nanmean(shifts[picks], axis=0)
            stats.append(d[pos].mean() - d[neg].mean())
            continue
        tp, tn = [], []
        for j in picks:
            pos, neg = draw(*per_block[j])
            tp.append(shifts[j, pos])
            tn.append(shifts[j, neg])
        stats.append(np.concatenate(tp).mean() - np.concatenate(tn).mean())
    d = np.nanmean(shifts, axis=0)
    return _estimate(_stat(d, labels), stats, len(d))


def projection_ablation(
    d_full, d_ablated: dict, labels, groups=None, n_boot: int = 2000, seed: int = 0
) -> dict:
    """The projection ablation, all from the same item resamples.

    Per projection type ``p``: ``removed[p] = shift(full) - shift(ablated p)`` (nats/token), the part
    of the gained shift that dropping ``p``'s update takes away, and ``shares[p] = removed[p] /
    shift(full)``. ``gap``: ``removed[v]`` minus the largest other ``removed``, the statistic of the
    "the value path carries the largest share" verdict; ``share_gap``: the same with shares.

    The two gaps order the types alike (one positive denominator), but the share gap divides by the
    control's shift on the resampled items, and a resample where that shift comes near zero throws
    it far out: on 60 + 60 SST-2 items its interval reached [-6.89, 0.035]. The removal gap has no
    denominator, so its interval is as wide as the items make it; the shares stay as context."""
    d_full, labels = np.asarray(d_full, float), np.asarray(labels)
    names = list(d_ablated)
    ablated = {n: np.asarray(d_ablated[n], float) for n in names}
    samples = _resamples(labels, groups, n_boot, seed)

    def removed(idx):
        full = _stat(d_full[idx], labels[idx])
        return full, {n: full - _stat(ablated[n][idx], labels[idx]) for n in names}

    def v_minus_next(values: dict) -> float:
        return values["v"] - max(values[n] for n in names if n != "v")

    full, point = removed(np.arange(len(d_full)))
    draws = [removed(i) for i in samples]
    point_share = {n: point[n] / full for n in names}
    draw_share = [{n: r[n] / f for n in names} for f, r in draws]
    n = len(d_full)
    out = {
        "removed": {p: _estimate(point[p], [r[p] for _, r in draws], n) for p in names},
        "shares": {p: _estimate(point_share[p], [s[p] for s in draw_share], n) for p in names},
    }
    if "v" in names and len(names) > 1:
        out["gap"] = _estimate(v_minus_next(point), [v_minus_next(r) for _, r in draws], n)
        out["share_gap"] = _estimate(v_minus_next(point_share), [v_minus_next(s) for s in draw_share], n)
    return out


def preference_accuracy(logp: np.ndarray, items) -> float:
    """Share of pairs whose chosen text has the higher mean log p (policy only, no reference)."""
    by_group: dict = {}
    for lp, it in zip(logp, items):
        by_group.setdefault(it.group, {})[it.label] = lp
    wins = [g[1] > g[0] for g in by_group.values() if 0 in g and 1 in g]
    return float(np.mean(wins)) if wins else float("nan")
