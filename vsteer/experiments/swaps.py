"""Claim (a): swapping W_V between layers breaks a model, swapping W_K barely matters.

For sampled layer pairs ``(a, b)`` and each matrix (W_Q, W_K, W_V, W_O) the experiment swaps
the two layers' weights in place (:func:`swap_weights`) and, separately, the matching
activations (q, k, v, attn) through the hook layer: the clean run's activation of layer ``b``
replaces layer ``a``'s and vice versa. Metrics per pair: the increase of log-perplexity on
WikiText-2 raw windows, and the mean KL divergence from the base model's next-token
distribution on neutral prompts. The verdict compares V and K swaps over the same pairs.

A sample of pairs is drawn within two strata (pairs with and without one of the first layers,
whose V swaps are the worst and which a small simple sample over- or under-draws by chance) and
every mean weights the strata by their share of all pairs, so it estimates the mean over all pairs.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vsteer.arch import ROLES, base_layer, get_arch
from vsteer.encoding import encode_batch, pad_batch
from vsteer.errors import DataError, ModelError, SiteError
from vsteer.evaluate import Estimate, Finding, bootstrap, finding, stratified_bootstrap
from vsteer.experiments.common import progress, require_items, rng
from vsteer.experiments.result import ExperimentResult
from vsteer.hooks import capture, intervene, replace
from vsteer.models import model_device

MATRICES = ("v", "k", "q", "o")
# the activation a weight produces: W_O's output is the attention block output
ACTIVATION_OF = {"q": "q", "k": "k", "v": "v", "o": "attn"}


@contextmanager
def swap_weights(model: nn.Module, role: str, layer_a: int, layer_b: int):
    """Swap the ``role`` projection (weight and bias) of two layers in place for the context.

    For fused QKV projections only the role's output rows move. The original tensors are
    copied back on exit, also after an exception, so the parameters are bit-identical after.
    """
    arch = get_arch(model)
    if role not in ROLES:
        raise SiteError(f"unknown matrix {role!r} to swap; expected one of {', '.join(ROLES)}")
    a, b = _check_pair(arch, layer_a, layer_b)
    rows = arch.rows(role)
    moves = []
    for attr in ("weight", "bias"):
        pa = getattr(base_layer(arch.projection(a, role)), attr, None)
        pb = getattr(base_layer(arch.projection(b, role)), attr, None)
        if pa is None and pb is None:
            continue
        if pa is None or pb is None or pa.shape != pb.shape:
            raise ModelError(f"cannot swap {role}.{attr} of layers {a} and {b}: shapes differ")
        # Conv1D stores [in, out]: a role's output rows are columns there
        dim = 1 if (attr == "weight" and arch.spec.conv1d) else 0
        moves.append((pa, pb, dim))
    saved = [(p, p.detach().clone()) for pa, pb, _ in moves for p in (pa, pb)]
    try:
        with torch.no_grad():
            if a != b:
                for pa, pb, dim in moves:
                    if rows is None:
                        pa.copy_(saved_of(saved, pb))
                        pb.copy_(saved_of(saved, pa))
                    else:
                        r = rows.to(pa.device)
                        pa.index_copy_(dim, r, saved_of(saved, pb).index_select(dim, r))
                        pb.index_copy_(dim, r, saved_of(saved, pa).index_select(dim, r))
        yield
    finally:
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)


def saved_of(saved: list, param: torch.Tensor) -> torch.Tensor:
    return next(orig for p, orig in saved if p is param)


def _check_pair(arch, layer_a: int, layer_b: int) -> tuple[int, int]:
    for layer in (layer_a, layer_b):
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < arch.n_layers:
            raise SiteError(
                f"layer pair ({layer_a}, {layer_b}) is out of range: this model has {arch.n_layers} "
                f"layers (0..{arch.n_layers - 1})"
            )
    return layer_a, layer_b


def activation_swap_ops(site: str, layer_a: int, layer_b: int, acts) -> dict:
    """Hook operations putting layer ``b``'s captured ``site`` activation into layer ``a`` and back."""
    return {
        (site, layer_a): replace(acts[(site, layer_b)]),
        (site, layer_b): replace(acts[(site, layer_a)]),
    }


EARLY, LATER = "early", "later"


def stratum_of(pair: tuple[int, int], early_layers: int) -> str:
    """Layer pairs fall into two strata: those that include one of the first ``early_layers``
    layers and the others. The first layers sit in few pairs but in the worst V swaps (on SmolLM2,
    24 sampled pairs: V − K of 1.66 to 4.09 for every pair with layer 0 or 1, at most 0.31 for the
    20 others), so a small simple random sample rests on how many of them it happened to draw."""
    return EARLY if min(pair) < early_layers else LATER


def stratum_label(stratum: str, early_layers: int) -> str:
    first = "layer 0" if early_layers == 1 else f"layers 0-{early_layers - 1}"
    return f"with {first}" if stratum == EARLY else f"without {first}"


def population_weights(n_layers: int, early_layers: int) -> dict[str, float]:
    """Each stratum's share of all ``a < b`` layer pairs."""
    pairs = [(a, b) for a in range(n_layers) for b in range(a + 1, n_layers)]
    early = sum(stratum_of(p, early_layers) == EARLY for p in pairs) / len(pairs)
    return {EARLY: early, LATER: 1 - early}


def layer_pairs(
    n_layers: int,
    n_pairs: int | None,
    seed: int,
    early_layers: int = 2,
    early_pairs: int | None = None,
) -> tuple[list[tuple[int, int]], dict[str, float] | None]:
    """All pairs ``a < b`` or a seed-fixed sample of ``n_pairs`` of them, and the strata weights the
    estimates must use (None: the plain mean over the pairs returned is the estimate).

    ``early_layers`` > 0: draw the sample within the two strata of :func:`stratum_of`; the early
    stratum gets ``early_pairs`` of the ``n_pairs`` (None: its proportional share, but at least 2 so
    that its spread enters the interval). Any allocation keeps the estimates unbiased, since they
    weight each stratum by its population share (:func:`population_weights`), not by its share of
    the sample; a larger early share narrows them when the early pairs spread more (Neyman
    allocation: share proportional to population share x spread). 0, or a sample too small for 2
    pairs per stratum: one simple random sample."""
    pairs = [(a, b) for a in range(n_layers) for b in range(a + 1, n_layers)]
    if not pairs:
        raise SiteError(f"a swap needs two layers; this model has {n_layers}")
    if early_pairs is not None and early_pairs < 2:
        raise DataError(f"early_pairs must be >= 2 (a stratum's spread needs 2 pairs), got {early_pairs}")
    if n_pairs is None or n_pairs >= len(pairs):
        return pairs, None
    if n_pairs < 1:
        raise DataError(f"n_pairs must be >= 1, got {n_pairs}")
    if early_layers < 0:
        raise DataError(f"early_layers must be >= 0, got {early_layers}")
    g = rng(seed)
    groups = {h: [p for p in pairs if stratum_of(p, early_layers) == h] for h in (EARLY, LATER)}
    n_early_all, n_later_all = len(groups[EARLY]), len(groups[LATER])
    if early_pairs is None:
        n_early = min(n_early_all, max(2, round(n_pairs * n_early_all / len(pairs))))
    elif not early_layers:
        raise DataError("early_pairs needs strata: set early_layers > 0")
    else:
        # each stratum at least 2 pairs, and no more than it has
        low, high = max(2, n_pairs - n_later_all), min(n_pairs - 2, n_early_all)
        if not low <= early_pairs <= high:
            raise DataError(
                f"early_pairs must be between {low} and {high} for n_pairs {n_pairs} ({n_early_all} "
                f"pairs with one of layers 0-{early_layers - 1}, {n_later_all} without), got {early_pairs}"
            )
        n_early = early_pairs
    n_later = n_pairs - n_early
    if not early_layers or not n_later_all or n_later < 2 or n_later > n_later_all:
        idx = np.sort(g.choice(len(pairs), size=n_pairs, replace=False))
        return [pairs[i] for i in idx], None
    chosen = []
    for h, n in ((EARLY, n_early), (LATER, n_later)):
        chosen += [groups[h][i] for i in g.choice(len(groups[h]), size=n, replace=False)]
    return sorted(chosen), population_weights(n_layers, early_layers)


def wikitext_windows(tokenizer, text: str, n_windows: int, window: int) -> torch.Tensor:
    """``[n_windows, window]`` token ids taken at evenly spaced offsets of the tokenised text."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < window or n_windows < 1:
        raise DataError(
            f"perplexity text has {ids.numel()} tokens; {n_windows} windows of {window} tokens are needed"
        )
    starts = np.linspace(0, ids.numel() - window, n_windows).astype(int)
    return torch.stack([ids[s : s + window] for s in starts])


@dataclass
class _Batch:
    kind: str  # "ppl" or "kl"
    inputs: dict
    base_logp: torch.Tensor | None = None
    acts: dict | None = None


def _nll_sum(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None])[..., 0]
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    return float(nll[keep].sum()), int(keep.sum())


def _kl_sum(base_logp: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    logp = F.log_softmax(logits.float(), dim=-1)
    kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
    keep = mask.bool()
    return float(kl[keep].sum()), int(keep.sum())


@dataclass
class SwapConfig:
    """Sizes of the swap experiment. ``n_pairs=None``: all layer pairs. ``early_layers``: sample the
    pairs within the strata with and without one of the first ``early_layers`` layers and weight
    the estimates by population share (0: one simple sample; :func:`layer_pairs`). The default 2
    comes from a 24-pair pilot on SmolLM2 (docs/experiments.md (a)). ``early_pairs``: how many of the
    ``n_pairs`` come from the early stratum (None: its proportional share, at least 2)."""

    n_pairs: int | None = 10
    n_windows: int = 4
    window: int = 96
    n_prompts: int = 16
    matrices: tuple[str, ...] = MATRICES
    activations: bool = True
    batch_size: int = 8
    early_layers: int = 2
    early_pairs: int | None = None


def run_swaps(
    model: nn.Module,
    tokenizer,
    config: SwapConfig | None = None,
    text: str | None = None,
    prompts: list[str] | None = None,
    pairs: list[tuple[int, int]] | None = None,
    seed: int = 0,
    progress_bar: bool | None = None,
) -> ExperimentResult:
    """Swap each matrix (and activation) between layer pairs; perplexity and KL per pair.

    ``text`` defaults to WikiText-2 raw test, ``prompts`` to the package's neutral prompts.
    """
    config = config or SwapConfig()
    arch = get_arch(model)
    for m in config.matrices:
        if m not in MATRICES:
            raise SiteError(f"unknown matrix {m!r}; expected one of {', '.join(MATRICES)}")
    if config.early_layers < 0:
        raise DataError(f"early_layers must be >= 0, got {config.early_layers}")
    weights = None  # given pairs and the census: the plain mean over them is the estimate
    if pairs is None:
        pairs, weights = layer_pairs(
            arch.n_layers, config.n_pairs, seed, config.early_layers, config.early_pairs
        )
    else:
        pairs = [_check_pair(arch, a, b) for a, b in require_items(pairs, "layer pairs")]
    if text is None:
        from vsteer.data import wikitext2_raw

        text = "\n\n".join(wikitext2_raw())
    if prompts is None:
        from vsteer.data import neutral_prompts

        prompts = neutral_prompts(config.n_prompts)
    require_items(text, "perplexity text")
    require_items(prompts, "neutral prompts")

    windows = wikitext_windows(tokenizer, text, config.n_windows, config.window)
    device = model_device(model)
    batches = [_Batch("ppl", pad_batch(w.tolist(), device=device)) for w in windows.split(config.batch_size)]
    for i in range(0, len(prompts), config.batch_size):
        enc = encode_batch(tokenizer, prompts[i : i + config.batch_size], device=device)
        batches.append(_Batch("kl", enc))

    layers = sorted({layer for p in pairs for layer in p})
    sites = [(ACTIVATION_OF[m], layer) for m in config.matrices for layer in layers]
    base = {"ppl": [0.0, 0], "kl": [0.0, 0]}
    for batch in batches:
        with torch.no_grad():
            if config.activations:
                with capture(model, sites) as acts:
                    logits = model(**batch.inputs, use_cache=False).logits
                batch.acts = acts
            else:
                logits = model(**batch.inputs, use_cache=False).logits
        if batch.kind == "ppl":
            s, n = _nll_sum(logits, batch.inputs["input_ids"], batch.inputs["attention_mask"])
            base["ppl"][0] += s
            base["ppl"][1] += n
        else:
            batch.base_logp = F.log_softmax(logits.float(), dim=-1)
    base_logppl = base["ppl"][0] / base["ppl"][1]

    def evaluate(make_context) -> tuple[float, float]:
        nll, n_tok, kl, n_kl = 0.0, 0, 0.0, 0
        for batch in batches:
            with torch.no_grad(), make_context(batch):
                logits = model(**batch.inputs, use_cache=False).logits
            if batch.kind == "ppl":
                s, n = _nll_sum(logits, batch.inputs["input_ids"], batch.inputs["attention_mask"])
                nll, n_tok = nll + s, n_tok + n
            else:
                s, n = _kl_sum(batch.base_logp, logits, batch.inputs["attention_mask"])
                kl, n_kl = kl + s, n_kl + n
        return nll / n_tok - base_logppl, kl / n_kl

    kinds = ["weights"] + (["activations"] if config.activations else [])
    jobs = [(k, m, a, b) for a, b in pairs for m in config.matrices for k in kinds]
    records = []
    for kind, m, a, b in progress(jobs, "swaps", progress_bar):
        if kind == "weights":
            dlp, kl = evaluate(lambda _batch, m=m, a=a, b=b: swap_weights(model, m, a, b))
        else:
            site = ACTIVATION_OF[m]
            dlp, kl = evaluate(
                lambda batch, site=site, a=a, b=b: intervene(
                    model, activation_swap_ops(site, a, b, batch.acts)
                )
            )
        records.append(
            {
                "kind": kind,
                "matrix": m,
                "layer_a": a,
                "layer_b": b,
                "delta_log_ppl": dlp,
                "ppl_ratio": math.exp(dlp),
                "kl": kl,
            }
        )

    early = config.early_layers or 1  # the table splits by layer 0 when the sample is simple
    verdicts, notes = _verdicts(records, config, seed, weights)
    summary = _summary(records, seed, weights, early)
    strata = strata_table(records, early)
    meta = {
        "config": asdict(config),
        "seed": seed,
        "pairs": pairs,
        "strata_weights": weights,
        "base_perplexity": math.exp(base_logppl),
        "n_ppl_tokens": base["ppl"][1],
        "n_prompts": len(prompts),
        "summary": summary,
        "strata": strata,
        "model": getattr(getattr(model, "config", None), "name_or_path", ""),
    }
    notes = [
        f"Base perplexity {math.exp(base_logppl):.3g} on {base['ppl'][1]} WikiText-2 raw tokens; "
        f"{len(pairs)} layer pairs{_sampling_note(pairs, weights, early)}. Activation swaps put the clean run's activation of one layer into the "
        "other (q/k before rotary; W_O's activation is the attention output).",
        *notes,
        "",
        _summary_markdown(summary),
        *([] if not strata else ["", _strata_markdown(strata)]),
    ]
    return ExperimentResult(
        name="swaps",
        title="Claim (a): swapping W_V between layers breaks the model, swapping W_K barely matters",
        records=records,
        findings=verdicts,
        meta=meta,
        columns=["kind", "matrix", "layer_a", "layer_b", "delta_log_ppl", "ppl_ratio", "kl"],
        notes=notes,
        plotter=_plot,
    )


def _sampling_note(pairs, weights, early_layers) -> str:
    if weights is None:
        return ""
    n = sum(stratum_of(p, early_layers) == EARLY for p in pairs)
    return (
        f", sampled within strata ({n} {stratum_label(EARLY, early_layers)}, {len(pairs) - n} without); "
        f"means and intervals weight the strata by their shares of all pairs ({weights[EARLY]:.3f} and "
        f"{weights[LATER]:.3f})"
    )


def _values(records, kind, matrix, key):
    return np.array([r[key] for r in records if r["kind"] == kind and r["matrix"] == matrix])


def _pairs_of(records, kind, matrix):
    return [(r["layer_a"], r["layer_b"]) for r in records if r["kind"] == kind and r["matrix"] == matrix]


def _estimate(
    records, kind, matrix, key, seed, weights, early_layers=1, minus: str | None = None
) -> Estimate:
    """Mean over the layer pairs of ``key`` for ``matrix`` swaps (minus the same pair's ``minus``
    swap when given) with its interval: plain bootstrap, or stratified when ``weights``."""
    x, pairs = _values(records, kind, matrix, key), _pairs_of(records, kind, matrix)
    if minus is not None:
        if _pairs_of(records, kind, minus) != pairs:
            raise ValueError(f"{matrix} and {minus} swaps were not run over the same pairs")
        x = x - _values(records, kind, minus, key)
    if weights is None:
        return bootstrap(x, seed=seed)
    return stratified_bootstrap(x, [stratum_of(p, early_layers) for p in pairs], weights, seed=seed)


def _summary(records, seed, weights=None, early_layers=1) -> list[dict]:
    out = []
    for kind in dict.fromkeys(r["kind"] for r in records):
        for m in dict.fromkeys(r["matrix"] for r in records):
            d = _values(records, kind, m, "delta_log_ppl")
            if d.size == 0:
                continue
            e = _estimate(records, kind, m, "delta_log_ppl", seed, weights, early_layers)
            ek = _estimate(records, kind, m, "kl", seed, weights, early_layers)
            out.append(
                {
                    "kind": kind,
                    "matrix": m,
                    "n_pairs": int(d.size),
                    "mean_delta_log_ppl": e.value,
                    "ci": [e.low, e.high],
                    "median_ppl_ratio": float(np.exp(np.median(d))),
                    "mean_kl": ek.value,
                    "kl_ci": [ek.low, ek.high],
                }
            )
    return out


def strata_table(records, early_layers: int) -> list[dict]:
    """The paired V − K difference of Δlog-perplexity per kind, over pairs with one of the first
    ``early_layers`` layers and over the others: ``{kind, stratum, n_pairs, mean, median,
    v_worse}`` (``stratum``: a label such as "with layers 0-1"; ``v_worse``: the share of pairs
    where the V swap hurts more). Shows whether a mean rests on the early layers alone; [] when V
    or K was not swapped."""
    out = []
    for kind in dict.fromkeys(r["kind"] for r in records):
        pairs = _pairs_of(records, kind, "v")
        if not pairs or _pairs_of(records, kind, "k") != pairs:
            continue
        diff = _values(records, kind, "v", "delta_log_ppl") - _values(records, kind, "k", "delta_log_ppl")
        labels = np.array([stratum_of(p, early_layers) for p in pairs])
        for stratum in (EARLY, LATER):
            d = diff[labels == stratum]
            if d.size:
                out.append(
                    {
                        "kind": kind,
                        "stratum": stratum_label(stratum, early_layers),
                        "n_pairs": int(d.size),
                        "mean": float(d.mean()),
                        "median": float(np.median(d)),
                        "v_worse": float((d > 0).mean()),
                    }
                )
    return out


def _strata_markdown(strata) -> str:
    lines = [
        "V swap minus K swap, Δlog-ppl, by whether the pair includes one of the first layers (no verdict; "
        "it shows what the means rest on):",
        "",
        "| kind | pairs | n | mean | median | share where V hurts more |",
        "|---|---|---|---|---|---|",
    ]
    for s in strata:
        lines.append(
            f"| {s['kind']} | {s['stratum']} | {s['n_pairs']} | {s['mean']:.3g} | {s['median']:.3g} | "
            f"{s['v_worse']:.2f} |"
        )
    return "\n".join(lines)


def _summary_markdown(summary) -> str:
    lines = [
        "| kind | matrix | pairs | mean Δlog-ppl [95% CI] | median ppl ratio | mean KL [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['kind']} | W_{s['matrix'].upper()} | {s['n_pairs']} | {s['mean_delta_log_ppl']:.3g} "
            f"[{s['ci'][0]:.3g}, {s['ci'][1]:.3g}] | {s['median_ppl_ratio']:.3g} | {s['mean_kl']:.3g} "
            f"[{s['kl_ci'][0]:.3g}, {s['kl_ci'][1]:.3g}] |"
        )
    return "\n".join(lines)


# thresholds and ROPEs of the verdicts: vsteer/recipes/verdicts.yaml (swaps.*)


def _verdicts(records, config, seed, weights=None) -> tuple[list[Finding], list[str]]:
    if "v" not in config.matrices or "k" not in config.matrices:
        return [], ["No verdict: the claim compares W_V and W_K swaps; both must be run."]
    cmd = "vsteer swap"
    how = ", early-layer strata weighted by their share of all pairs" if weights else ""
    early = config.early_layers or 1
    out = []
    for kind in ("weights", "activations"):
        if not _pairs_of(records, kind, "v"):
            continue
        diff = _estimate(records, kind, "v", "delta_log_ppl", seed, weights, early, minus="k")
        out.append(
            finding(
                "swaps.v_vs_k_ppl",
                claim=f"swapping V {kind} between layers hurts more than swapping K {kind}",
                measured=f"mean over layer pairs of Δlog-perplexity(V swap) − Δlog-perplexity(K swap){how}",
                effect=diff,
                command=cmd,
            )
        )
        if kind == "weights":
            ev = _estimate(records, kind, "v", "delta_log_ppl", seed, weights, early)
            out.append(
                finding(
                    "swaps.wv_breaks",
                    claim="swapping W_V breaks the model (perplexity at least doubles on average)",
                    measured=f"mean Δlog-perplexity of W_V swaps{how}",
                    effect=ev,
                    command=cmd,
                )
            )
            ek = _estimate(records, kind, "k", "delta_log_ppl", seed, weights, early)
            out.append(
                finding(
                    "swaps.wk_barely",
                    claim="swapping W_K barely matters (perplexity changes by less than 10% on average)",
                    measured=f"mean Δlog-perplexity of W_K swaps{how}",
                    effect=ek,
                    command=cmd,
                )
            )
    dkl = _estimate(records, "weights", "v", "kl", seed, weights, early, minus="k")
    out.append(
        finding(
            "swaps.kl_v_vs_k",
            claim="swapping W_V moves the next-token distribution more than swapping W_K",
            measured=f"mean over layer pairs of KL(base‖V swap) − KL(base‖K swap) on neutral prompts{how}",
            effect=dkl,
            command=cmd,
        )
    )
    return out, []


def _plot(records, path) -> None:
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["kind"] for r in records))
    mats = list(dict.fromkeys(r["matrix"] for r in records))
    fig, axes = plt.subplots(1, 2 * len(kinds), figsize=(5 * len(kinds) * 2, 4))
    axes = np.atleast_1d(axes)
    for i, kind in enumerate(kinds):
        for j, (key, label) in enumerate((("delta_log_ppl", "Δ log-perplexity"), ("kl", "KL to base"))):
            ax = axes[2 * i + j]
            data = [_values(records, kind, m, key) for m in mats]
            ax.boxplot(data, showfliers=False)
            ax.set_xticks(range(1, len(mats) + 1), [f"W_{m.upper()}" for m in mats])
            for x, d in enumerate(data, 1):
                jitter = np.linspace(-0.15, 0.15, len(d)) if len(d) > 1 else [0.0]
                ax.scatter(x + np.asarray(jitter), d, s=10, alpha=0.6)
            ax.set_yscale("symlog", linthresh=0.01)
            ax.set_title(f"{kind} swap: {label}")
            ax.set_ylabel(label)
    fig.suptitle("Layer-pair swaps: distribution over pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
