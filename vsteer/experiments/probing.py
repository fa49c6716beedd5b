"""Claim (b): a linear probe on the last layer's value vectors classifies sentiment at 85%+,
probes on keys or queries stay under 60%; middle-layer values already carry the semantics.

Features of every site and layer come from one forward pass over the data (the hook layer
records the chosen token position of each site while the model runs). Each site/layer gets a
standardised logistic probe whose L2 strength is chosen by cross-validation on the training
set, and control probes (same strength, random training labels independent of the true ones; ``n_control``
draws, 10 by default) so that the accuracy a high-dimensional site reaches on noise is visible;
selectivity = accuracy - mean control accuracy, its interval a bootstrap over test items and control
draws (one draw can land anywhere in the draw-to-draw spread: 0.50 +- 0.06 on SST-2).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from vsteer.arch import get_arch
from vsteer.encoding import encode_batch, to_numpy
from vsteer.errors import DataError
from vsteer.evaluate import Finding, bootstrap, finding, wilson_interval
from vsteer.experiments.common import batched, progress, require_items, rng, subsample
from vsteer.experiments.result import ExperimentResult
from vsteer.hooks import capture
from vsteer.models import model_device
from vsteer.sites import check_site_name, parse_layers

PROBE_SITES = ("q", "k", "v", "z", "resid")
V_THRESHOLD, KQ_THRESHOLD = 0.85, 0.60


def collect_features(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    sites=PROBE_SITES,
    layers: list[int] | None = None,
    position: str = "last",
    batch_size: int = 32,
    max_length: int = 64,
    progress_bar: bool | None = None,
) -> dict[tuple[str, int], np.ndarray]:
    """Features ``[n_texts, dim]`` (float32) for every ``(site, layer)``, from one pass over ``texts``.

    ``position``: ``"last"`` (the last real token) or ``"mean"`` (mean over real tokens). Per-head
    sites are flattened (``dim = heads * head_dim``).
    """
    arch = get_arch(model)
    require_items(texts, "probe dataset")
    if position not in ("last", "mean"):
        raise DataError(f"position must be 'last' or 'mean', got {position!r}")
    for s in sites:
        check_site_name(s)
    layers = list(range(arch.n_layers)) if layers is None else layers
    store: dict[tuple[str, int], list[np.ndarray]] = {(s, layer): [] for s in sites for layer in layers}
    # batches of similar length waste little compute on padding; rows are put back in order below
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    device = model_device(model)
    for chunk in progress(list(batched(order, batch_size)), "probe features", progress_bar):
        enc = encode_batch(tokenizer, [texts[i] for i in chunk], max_length=max_length, device=device)
        mask = enc["attention_mask"].float()
        # the forward stops right after the deepest site (a middle layer's probes skip the rest)
        with torch.no_grad(), capture(model, list(store), stop=True) as acts:
            model(**enc, use_cache=False, logits_to_keep=1)
        for key in store:
            x = acts[key].flatten(2).float()
            if position == "last":
                feat = x[:, -1]  # left padding: the last real token is the last position
            else:
                feat = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            store[key].append(to_numpy(feat).astype(np.float32))
    inverse = np.argsort(order)
    return {key: np.concatenate(v)[inverse] for key, v in store.items()}


@dataclass
class ProbeFit:
    accuracy: float
    correct: np.ndarray  # [n_test] bool
    control_accuracy: float  # mean over the control draws
    control_correct: np.ndarray  # [n_control, n_test] bool, one row per random-label draw
    C: float

    @property
    def control_accuracies(self) -> np.ndarray:
        """``[n_control]`` test accuracy of each control draw."""
        return self.control_correct.mean(axis=1)


def fit_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    Cs=(0.001, 0.01, 0.1),
    cv: int = 3,
    seed: int = 0,
    n_control: int = 10,
) -> ProbeFit:
    """A standardised L2 logistic probe with C chosen by ``cv``-fold cross-validation, and its
    controls: the same probe trained on ``n_control`` draws of random labels independent of the true
    ones (draw ``d`` uses :func:`control_labels` with seed ``seed + 1 + d``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        raise DataError("probe training labels have a single class; need both")

    def make(C):
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=300, tol=1e-3))

    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    scores = [cross_val_score(make(C), x_train, y_train, cv=folds).mean() for C in Cs]
    C = Cs[int(np.argmax(scores))]
    probe = make(C).fit(x_train, y_train)
    correct = probe.predict(x_test) == y_test
    if not isinstance(n_control, int) or n_control < 1:
        raise DataError(f"n_control must be an int >= 1 (random-label control draws), got {n_control!r}")
    control_correct = np.stack(
        [
            make(C).fit(x_train, control_labels(y_train, seed + 1 + d)).predict(x_test) == y_test
            for d in range(n_control)
        ]
    )
    return ProbeFit(float(correct.mean()), correct, float(control_correct.mean()), control_correct, C)


def selectivity(
    correct, control_correct, seed: int = 0, n_boot: int = 2000, level: float = 0.95, groups=None
):
    """Accuracy minus mean control accuracy, with a percentile bootstrap over test items *and* control
    draws, so the interval carries the draw-to-draw variance of the control.

    ``correct``: ``[n_test]`` bool (the probe); ``control_correct``: ``[n_control, n_test]`` bool (or
    ``[n_test]`` for one draw, whose draw variance cannot be estimated). ``groups``: ``[n_test]``
    labels of items that are not independent (a sentence and its minimal-pair edit): whole groups
    are resampled. Returns an ``Estimate`` (``n``: the items).
    """
    from vsteer.evaluate import Estimate

    a = np.asarray(correct, dtype=np.float64)
    c = np.atleast_2d(np.asarray(control_correct, dtype=np.float64))
    if c.shape[1] != a.shape[0] or a.shape[0] == 0:
        raise DataError(f"control draws {c.shape} do not match {a.shape[0]} test items")
    g = rng(seed)
    n, d = a.shape[0], c.shape[0]
    members = _group_members(n, groups)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        picked, draws = g.integers(0, len(members), len(members)), g.integers(0, d, d)
        items = picked if groups is None else np.concatenate([members[k] for k in picked])
        stats[b] = a[items].mean() - c[np.ix_(draws, items)].mean()
    alpha = (1 - level) / 2
    return Estimate(
        float(a.mean() - c.mean()), float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha)), n
    )


def _group_members(n: int, groups) -> list[np.ndarray]:
    """Item indices of each group (each item its own group when ``groups`` is None)."""
    if groups is None:
        return [np.array([i]) for i in range(n)]
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise DataError(f"groups has shape {groups.shape}; expected one label per item ({n})")
    _, inverse = np.unique(groups, return_inverse=True)
    return [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]


def control_labels(y: np.ndarray, seed: int) -> np.ndarray:
    """Random labels independent of ``y`` by construction: within each true class, a random half
    gets label 1. (A plain permutation keeps a chance correlation with ``y`` that a probe on a
    site with a strong label direction picks up: about 0.55-0.6 test accuracy on SST-2.)"""
    g = rng(seed)
    out = np.zeros_like(y)
    for c in np.unique(y):
        idx = g.permutation(np.flatnonzero(y == c))
        out[idx[: len(idx) // 2]] = 1
        if len(idx) % 2:
            out[idx[-1]] = g.integers(0, 2)
    return out


@dataclass
class ProbeConfig:
    """Sizes of the probe experiment. ``dataset``: ``"sst2"``, ``"persona:<trait or JSONL path>"`` or a
    JSONL path of ``{text, label}`` rows (see :func:`load_probe_dataset`). ``n_control``: random-label
    control draws averaged for the selectivity.
    ``layers``: ``"all"``, ``"0-29"``, ``"3,7"`` or a list (see :func:`vsteer.sites.parse_layers`);
    None: ``n_layers`` evenly spaced layers (the CPU default). The last layer and the middle
    layer are always included. ``novel_*``: the novel-name test (:mod:`vsteer.experiments.novel`;
    ``novel_names=0`` skips it); ``intensity_words``: the polarity/intensity probes,
    ``negation_pairs``: the negation probe (:mod:`vsteer.experiments.intensity`; 0 skips them). The
    main job's profiles switch them on."""

    dataset: str = "sst2"
    n_train: int = 600
    n_test: int = 400
    sites: tuple[str, ...] = PROBE_SITES
    layers: str | list[int] | None = None
    n_layers: int = 10
    position: str = "last"
    max_length: int = 64
    batch_size: int = 32
    Cs: tuple[float, ...] = (0.001, 0.01, 0.1)
    cv: int = 3
    n_control: int = 10
    novel_names: int = (
        0  # invented names for the novel-creature test (0: skip; the profiles set it); novel.py
    )
    novel_layers: int = 5
    novel_C: float = 0.01
    novel_frames: int = 1  # neutral frames per real name
    intensity_words: int = 0  # VADER words for the polarity/intensity probes (0: skip); intensity.py
    negation_pairs: int = 0  # CondaQA minimal pairs for the negation probe (0: skip); intensity.py


def load_probe_dataset(dataset, n_train: int, n_test: int, seed: int):
    """``(train, test)`` lists of ``(text, label)``.

    ``dataset``: ``"sst2"`` (train -> test split); ``"persona:<trait>"`` with a shipped trait or
    ``"persona:<path>"`` to a JSONL of Anthropic-style persona items (``question``,
    ``answer_matching_behavior``, ...; label 1 = the statement's matching answer is "Yes"); or your own
    labelled texts ``{text, label}`` as a JSONL path, a ``datasets.Dataset`` or a list of dicts. Persona
    items and your own texts get a seed-fixed half/half split.
    """
    from vsteer.data import user

    if isinstance(dataset, str) and dataset == "sst2":
        from vsteer.data import sst2

        train, test = sst2("train"), sst2("test")
    else:
        if isinstance(dataset, str) and dataset.startswith("persona:"):
            from vsteer.data import persona_ab

            name = dataset[8:]
            try:
                from vsteer.data import PERSONA_TRAITS

                own = user.is_data_file(name) and name not in PERSONA_TRAITS
                rows = user.ab_items(name) if own else persona_ab(name)
            except DataError as err:
                raise DataError(f"{err}; or give persona:<path to a JSONL of persona items>") from None
            items = [(_statement(it.question), int(it.matching.strip().lower() == "yes")) for it in rows]
        elif isinstance(dataset, str) and not user.is_data_file(dataset):
            raise DataError(
                f"unknown probe dataset {dataset!r}; expected 'sst2', 'persona:<trait or path>' or a JSONL "
                f"file of {{text, label}} rows"
            )
        else:
            items = user.labelled_texts(dataset)
        order = rng(seed).permutation(len(items))
        cut = len(items) // 2
        train, test = [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]
    train, test = subsample(train, n_train, seed), subsample(test, n_test, seed + 1)
    label = dataset if isinstance(dataset, str) else type(dataset).__name__
    require_items(train, f"{label} training set")
    require_items(test, f"{label} test set")
    return train, test


def _statement(question: str) -> str:
    m = re.search(r'"(.*)"\s*$', question, flags=re.S)
    return m.group(1) if m else question


def run_probes(
    model: nn.Module,
    tokenizer,
    config: ProbeConfig | None = None,
    train: list[tuple[str, int]] | None = None,
    test: list[tuple[str, int]] | None = None,
    seed: int = 0,
    progress_bar: bool | None = None,
) -> ExperimentResult:
    """Probe every site and layer; accuracy with 95% intervals, control accuracy, selectivity."""
    config = config or ProbeConfig()
    arch = get_arch(model)
    if train is None or test is None:
        train, test = load_probe_dataset(config.dataset, config.n_train, config.n_test, seed)
    else:  # your own (text, label) lists, {text, label} JSONL paths or datasets
        from pathlib import Path

        from vsteer.data.user import labelled_texts

        train, test = (
            labelled_texts(x if isinstance(x, str | Path) else require_items(x, f"probe {what} set"))
            for x, what in ((train, "training"), (test, "test"))
        )
    require_items(train, "probe training set")
    require_items(test, "probe test set")
    last, middle = arch.n_layers - 1, arch.n_layers // 2
    if config.layers is None:
        chosen = np.linspace(0, arch.n_layers - 1, min(config.n_layers, arch.n_layers)).round().astype(int)
        chosen = [int(x) for x in chosen]
    else:
        chosen = parse_layers(config.layers, arch.n_layers)
    layers = sorted(set(chosen) | {last, middle})
    texts = [t for t, _ in train] + [t for t, _ in test]
    feats = collect_features(
        model,
        tokenizer,
        texts,
        config.sites,
        layers,
        config.position,
        config.batch_size,
        config.max_length,
        progress_bar,
    )
    y_train = np.array([y for _, y in train])
    y_test = np.array([y for _, y in test])
    n = len(train)
    records, fits = [], {}
    for key in progress(list(feats), "probes", progress_bar):
        x = feats[key]
        fit = fit_probe(x[:n], y_train, x[n:], y_test, config.Cs, config.cv, seed, config.n_control)
        fits[key] = fit
        lo, hi = wilson_interval(int(fit.correct.sum()), len(y_test))
        sel = selectivity(fit.correct, fit.control_correct, seed=seed, n_boot=500)
        records.append(
            {
                "site": key[0],
                "layer": key[1],
                "dim": int(x.shape[1]),
                "accuracy": fit.accuracy,
                "ci_low": lo,
                "ci_high": hi,
                "control_accuracy": fit.control_accuracy,
                "control_sd": float(fit.control_accuracies.std(ddof=1)) if config.n_control > 1 else 0.0,
                "selectivity": sel.value,
                "sel_ci_low": sel.low,
                "sel_ci_high": sel.high,
                "C": fit.C,
            }
        )
    verdicts = _verdicts(fits, config, last, middle, seed)
    novel_notes, novel_meta = [], {}
    novel_sites = [s for s in ("v", "k", "q", "resid") if s in config.sites]
    if config.novel_names and novel_sites:
        from vsteer.experiments.novel import run_novel

        picks = np.linspace(0, arch.n_layers - 1, min(config.novel_layers, arch.n_layers)).round().astype(int)
        _, found, novel_notes, novel_meta = run_novel(
            model, tokenizer, novel_sites, sorted({int(x) for x in picks}), config.novel_names, config.novel_C,
            seed, config.batch_size, config.max_length, progress_bar, config.novel_frames,
        )  # fmt: skip
        verdicts += found
    if config.intensity_words:
        from vsteer.experiments.intensity import run_intensity

        found, more, more_meta = run_intensity(
            model, tokenizer, middle, config.intensity_words, config, seed, progress_bar
        )
        verdicts += found
        novel_notes += ["", *more]
        novel_meta.update(more_meta)
    if config.negation_pairs:
        from vsteer.experiments.intensity import run_negation

        found, more, more_meta = run_negation(
            model, tokenizer, middle, config.negation_pairs, config, seed, progress_bar
        )
        verdicts += found
        novel_notes += ["", *more]
        novel_meta.update(more_meta)
    majority = max(y_test.mean(), 1 - y_test.mean())
    notes = [
        f"{config.dataset}: {len(train)} train / {len(test)} test items, features at the {config.position} "
        f"token, layers {layers[0]}..{layers[-1]} ({len(layers)}); majority-class test accuracy {majority:.3f}. "
        "Accuracy CIs: Wilson (table), bootstrap over test items (verdicts). Control: same probe on "
        f"random training labels balanced within each true class (independent of the labels), mean of "
        f"{config.n_control} draws (control_sd: their spread); selectivity CIs bootstrap over test items "
        "and control draws."
    ]
    if novel_notes:
        notes += ["", *novel_notes]
    meta = {
        "config": asdict(config),
        "seed": seed,
        "layers": layers,
        "n_train": len(train),
        "n_test": len(test),
        "majority_accuracy": float(majority),
        **novel_meta,
    }
    return ExperimentResult(
        name="probing",
        title=f"Claim (b): linear probes per site and layer ({config.dataset})",
        records=records,
        findings=verdicts,
        meta=meta,
        columns=[
            "site",
            "layer",
            "dim",
            "accuracy",
            "ci_low",
            "ci_high",
            "control_accuracy",
            "control_sd",
            "selectivity",
            "C",
        ],
        notes=notes,
        plotter=_plot,
    )


def _acc(fit: ProbeFit, seed: int):
    return bootstrap(fit.correct.astype(float), seed=seed)


def _verdicts(fits, config, last, middle, seed) -> list[Finding]:
    out, cmd = [], f"vsteer probe --dataset {config.dataset}"
    if ("v", last) in fits:
        e = _acc(fits[("v", last)], seed)
        out.append(
            finding(
                "probing.v_last_85",
                claim=f"a linear probe on the last layer's values (v.{last}) reaches 85%+",
                measured="test accuracy",
                effect=e,
                command=cmd,
            )
        )
    for site in ("k", "q"):
        if (site, last) in fits:
            e = _acc(fits[(site, last)], seed)
            out.append(
                finding(
                    "probing.kq_last_under_60",
                    claim=f"a probe on the last layer's {'keys' if site == 'k' else 'queries'} ({site}.{last}) stays under 60%",
                    measured="test accuracy",
                    effect=e,
                    command=cmd,
                )
            )
    if ("v", middle) in fits:
        e = _acc(fits[("v", middle)], seed)
        out.append(
            finding(
                "probing.v_middle_85",
                claim=f"middle-layer values (v.{middle}) already carry the semantics (85%+)",
                measured="test accuracy",
                effect=e,
                command=cmd,
            )
        )
        fit = fits[("v", middle)]
        sel = selectivity(fit.correct, fit.control_correct, seed=seed)
        out.append(
            finding(
                "probing.selectivity",
                claim=f"the v.{middle} probe reads the labels, not the site's capacity (selectivity > 0)",
                measured="accuracy − control (random-label) accuracy",
                effect=sel,
                command=cmd,
            )
        )
    return out


def _plot(records, path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for site in dict.fromkeys(r["site"] for r in records):
        rows = sorted((r for r in records if r["site"] == site), key=lambda r: r["layer"])
        x = [r["layer"] for r in rows]
        line = ax.plot(x, [r["accuracy"] for r in rows], marker=".", label=site)[0]
        ax.fill_between(
            x, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], alpha=0.15, color=line.get_color()
        )
        ax.plot(x, [r["control_accuracy"] for r in rows], ls=":", color=line.get_color(), lw=1)
    ax.axhline(V_THRESHOLD, color="k", lw=0.6, ls="--")
    ax.axhline(KQ_THRESHOLD, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("layer")
    ax.set_ylabel("test accuracy (dotted: random-label control)")
    ax.set_title("Per-site linear probes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
