"""Claim (d): W_V's column space is a "response semantic basis".

Two readouts and one test:

* OV circuits (Dar et al. 2022 style): per query head ``h`` (kv head ``g``) the map
  ``M_h = diag(g_out) W_O^h W_V^g diag(g_in)`` ``[d_model, d_model]`` (norm gains folded in; the
  norms' rescaling is left out). Its top singular output directions, both signs, are read through
  the final norm's gain and the unembedding as top vocabulary tokens.
* Steering vectors: a ``v``-site vector ``[n_kv_heads, head_dim]`` is written through W_O of the
  query heads that read that kv head; a ``resid`` vector ``[d_model]`` is read directly.
* Alignment: each named dimension's direction (mean resid difference of the two labels at the last
  token: sentiment from SST-2, factuality from true/false statements, domain from MMLU STEM vs
  humanities stems, behaviour from persona statements matching vs not matching the trait, formality
  from formal vs informal sentences paired by word count) per layer; which share of its squared norm lies in each head's OV
  output space (column space; write side), against (1) an isotropic random direction, whose
  expected share is ``rank / d_model``, and (2) directions from shuffled labels (same data, same
  anisotropy). Read side: the share of the previous layer's direction in the OV row space.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from vsteer.arch import get_arch
from vsteer.encoding import to_numpy
from vsteer.errors import DataError, VectorError
from vsteer.evaluate import Estimate, finding
from vsteer.experiments.common import final_norm, norm_gain, rng, subsample, token_strings, unembedding
from vsteer.experiments.result import ExperimentResult
from vsteer.steering import attention_norms


@torch.no_grad()
def ov_factors(model: nn.Module, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per query head ``(A [d_model, head_dim], B [head_dim, d_model])`` with ``M_h = A @ B``."""
    arch = get_arch(model)
    d, hd = arch.d_model, arch.head_dim
    wv = arch.weight(layer, "v").detach().float().cpu()
    wo = arch.weight(layer, "o").detach().float().cpu()
    inp, out = attention_norms(arch, layer)
    g_in = norm_gain(inp, d) if inp is not None else torch.ones(d)
    g_out = norm_gain(out, d) if out is not None else torch.ones(d)
    group = arch.n_heads // arch.n_kv_heads
    factors = []
    for h in range(arch.n_heads):
        g = h // group
        a = g_out[:, None] * wo[:, h * hd : (h + 1) * hd]
        b = wv[g * hd : (g + 1) * hd] * g_in[None, :]
        factors.append((a, b))
    return factors


def _orth(x: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(x.double())
    return q.float()


def ov_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``a @ b`` through the small factors: ``(U [d, r], S [r], V [d, r])``."""
    qa, ra = torch.linalg.qr(a.double())
    qb, rb = torch.linalg.qr(b.t().double())
    u, s, vh = torch.linalg.svd(ra @ rb.t())
    return (qa @ u).float(), s.float(), (qb @ vh.t()).float()


@torch.no_grad()
def unembed_top(model: nn.Module, tokenizer, directions: torch.Tensor, k: int = 8) -> list[list[str]]:
    """Top ``k`` tokens of each direction ``[n, d_model]`` through the final norm gain and unembedding."""
    arch = get_arch(model)
    w_u = unembedding(model).detach().float().cpu()
    gain = norm_gain(final_norm(model), arch.d_model)
    logits = (directions.float() * gain) @ w_u.t()
    top = logits.topk(k, dim=-1).indices
    return [token_strings(tokenizer, row) for row in top]


def ov_readout(model: nn.Module, tokenizer, layers=None, n_directions: int = 1, k: int = 8) -> list[dict]:
    """Per layer and query head: singular values and top tokens of the top OV output directions."""
    arch = get_arch(model)
    layers = range(arch.n_layers) if layers is None else layers
    rows, dirs = [], []
    for layer in layers:
        for h, (a, b) in enumerate(ov_factors(model, layer)):
            u, s, _ = ov_svd(a, b)
            for i in range(min(n_directions, s.numel())):
                rows.append({"layer": layer, "head": h, "direction": i, "singular_value": float(s[i])})
                dirs += [u[:, i], -u[:, i]]
    tops = unembed_top(model, tokenizer, torch.stack(dirs), k)
    for j, row in enumerate(rows):
        row["top_tokens_plus"] = " | ".join(t.strip() or repr(t) for t in tops[2 * j])
        row["top_tokens_minus"] = " | ".join(t.strip() or repr(t) for t in tops[2 * j + 1])
    return rows


def _vector_layers(vectors) -> dict[int, torch.Tensor]:
    for attr in ("directions", "tensors"):
        d = getattr(vectors, attr, None)
        if isinstance(d, dict):
            return {int(k): v for k, v in d.items()}
    if isinstance(vectors, dict):
        return {int(k): v for k, v in vectors.items()}
    if hasattr(vectors, "layers"):
        return {int(layer): vectors[layer] for layer in vectors.layers}
    raise VectorError(
        f"cannot read layers from {type(vectors).__name__}: expected a dict {{layer: tensor}} or an object "
        "with .directions/.tensors or .layers"
    )


@torch.no_grad()
def readout_steering_vector(
    model: nn.Module, tokenizer, vectors, site: str | None = None, k: int = 10
) -> list[dict]:
    """Top tokens of a steering vector per layer. ``v`` vectors ``[n_kv_heads, head_dim]`` go through
    W_O of the heads that read each kv head (the norm gain after attention folded in where there
    is one); ``resid``/``attn``/``mlp`` vectors ``[d_model]`` are read directly."""
    arch = get_arch(model)
    site = site or getattr(vectors, "site", "v")
    layers = _vector_layers(vectors)
    if not layers:
        raise VectorError("steering vector has no layers")
    rows, dirs = [], []
    for layer, vec in sorted(layers.items()):
        layer = arch.check_layer(layer)
        vec = torch.as_tensor(vec).detach().float()
        if site == "v":
            if vec.numel() != arch.n_kv_heads * arch.head_dim:
                raise VectorError(
                    f"v vector of layer {layer} has shape {tuple(vec.shape)}; expected "
                    f"[{arch.n_kv_heads}, {arch.head_dim}]"
                )
            vec = vec.reshape(arch.n_kv_heads, arch.head_dim)
            group = arch.n_heads // arch.n_kv_heads
            z = vec.repeat_interleave(group, dim=0).flatten()  # what each query head adds to z
            out = arch.weight(layer, "o").detach().float().cpu() @ z
            _, post = attention_norms(arch, layer)
            if post is not None:
                out = out * norm_gain(post, arch.d_model)
        elif site in ("resid", "attn", "mlp"):
            if vec.numel() != arch.d_model:
                raise VectorError(
                    f"{site} vector of layer {layer} has {vec.numel()} values; expected {arch.d_model}"
                )
            out = vec.flatten()
        else:
            raise VectorError(f"readout of {site!r} vectors is not defined; use v or resid vectors")
        rows.append({"layer": layer, "site": site, "norm": float(vec.norm())})
        dirs += [out, -out]
    tops = unembed_top(model, tokenizer, torch.stack(dirs), k)
    for j, row in enumerate(rows):
        row["top_tokens_plus"] = " | ".join(t.strip() or repr(t) for t in tops[2 * j])
        row["top_tokens_minus"] = " | ".join(t.strip() or repr(t) for t in tops[2 * j + 1])
    return rows


# named dimensions of the claim; each tested one has a real labelled contrast (readers: vsteer.data)
DIMENSIONS = ("sentiment", "factuality", "domain", "behaviour", "formality")
UNTESTED_DIMENSIONS: dict[str, str] = {}  # name -> why it has no data (every named one has some now)
DOMAIN_WORDS = 24  # MMLU stems are cut to their first words
_DIMENSION_TEXT = {
    "sentiment": "SST-2 train sentences, positive vs negative",
    "factuality": "RepE true vs false statements, after Azaria & Mitchell 2023",
    "domain": f"MMLU question stems (CAA A/B items, first {DOMAIN_WORDS} words), STEM vs humanities subjects",
    "behaviour": "Anthropic persona statements (Big Five), matching vs not matching the trait",
    "formality": "Pavlick & Tetreault's formal vs informal sentences, paired by word count",
}


@dataclass
class BasisConfig:
    """``n_items``: SST-2 sentences for the sentiment direction; ``n_dimension_items``: items (half per
    label) for each other dimension; ``dimensions``: which of :data:`DIMENSIONS` to test;
    ``n_shuffles``: shuffled-label directions for the data baseline; ``n_boot``: bootstrap resamples."""

    n_items: int = 400
    n_dimension_items: int = 200
    dimensions: tuple[str, ...] = DIMENSIONS
    n_shuffles: int = 100
    n_boot: int = 500
    n_directions: int = 1
    top_k: int = 8
    max_length: int = 64
    batch_size: int = 32


def dimension_items(name: str, n: int | None, seed: int) -> list[tuple[str, int]]:
    """``(text, label)`` items of a named dimension, ``n`` of them half per label (seed-fixed)."""
    from vsteer.data import contrasts, sst2

    readers = {
        "sentiment": lambda: sst2("train"),
        "factuality": contrasts.true_false_statements,
        "domain": contrasts.mmlu_domains,
        "behaviour": contrasts.persona_statements,
        "formality": contrasts.formality_statements,
    }
    if name not in readers:
        raise DataError(f"unknown basis dimension {name!r}; expected one of: {', '.join(readers)}")
    if name == "formality":  # draw whole pairs, so both labels keep the same word counts
        return contrasts.formality_statements(
            subsample(contrasts.formality_pairs(), None if n is None else n // 2, seed)
        )
    items = readers[name]()
    if name == "domain":  # the subject shows in a stem's opening; long passages cost CPU, not signal
        items = [(" ".join(t.split()[:DOMAIN_WORDS]), y) for t, y in items]
    if name == "sentiment":
        return subsample(items, n, seed)
    half = None if n is None else n // 2
    return [it for y in (1, 0) for it in subsample([it for it in items if it[1] == y], half, seed + y)]


def _shares(bases: list[torch.Tensor], dirs: torch.Tensor) -> torch.Tensor:
    """Mean over heads of the share of ``dirs`` ``[n, d]``'s squared norm in each orthonormal basis."""
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.stack([((dirs @ q) ** 2).sum(-1) for q in bases]).mean(0)


def _mean_diffs(x: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean difference pos - neg ``[B, d]`` for item weights ``[B, n]`` (bootstrap counts)."""
    wp, wn = weights * labels, weights * (1 - labels)
    return (wp @ x) / wp.sum(1, keepdim=True) - (wn @ x) / wn.sum(1, keepdim=True)


def ov_spaces(model: nn.Module) -> list[tuple[list[torch.Tensor], list[torch.Tensor], float, float]]:
    """Per layer ``(col, row, iso_col, iso_row)``: orthonormal bases ``[d_model, rank]`` of each query
    head's OV output space and each kv head's OV input space, and the share a random direction has."""
    arch = get_arch(model)
    spaces = []
    for layer in range(arch.n_layers):
        factors = ov_factors(model, layer)
        col = [_orth(a) for a, _ in factors]
        row = [_orth(b.t()) for _, b in factors[:: arch.n_heads // arch.n_kv_heads]]
        iso_col = float(np.mean([q.shape[1] for q in col])) / arch.d_model
        iso_row = float(np.mean([q.shape[1] for q in row])) / arch.d_model
        spaces.append((col, row, iso_col, iso_row))
    return spaces


_CLAIMS = {
    "write": (
        "the {d} direction lies in the span of the heads' OV (W_O W_V) output spaces more than a random direction",
        "share of its squared norm in each head's OV column space / the random-direction share, mean over heads and layers",
    ),
    "write_data": (
        "same, against directions from shuffled labels (controls for the residual stream's anisotropy)",
        "share / shuffled-label-direction share, mean over layers",
    ),
    "read": (
        "the {d} direction entering a layer lies in what W_V reads (OV row space) more than a random direction",
        "share in each kv head's OV row space / random share, mean over layers 1..L-1",
    ),
}


def _shuffle(labels: np.ndarray, groups: np.ndarray | None, g) -> np.ndarray:
    """A random permutation of ``labels``; with ``groups``, within each group (for a pair: its two
    labels swapped or not), the null that keeps a paired design's structure."""
    labels = np.asarray(labels)
    if groups is None:
        return g.permutation(labels)
    by_group = np.lexsort((np.arange(len(labels)), groups))
    shuffled = np.lexsort((g.random(len(labels)), groups))  # same group blocks, random order inside
    out = np.empty_like(labels)
    out[by_group] = labels[shuffled]
    return out


def direction_alignment(xs, labels, spaces, config, g, groups=None):
    """Per-layer records and bootstrap statistics of one dimension. ``xs``: per layer ``[n, d_model]``
    last-token resid; ``spaces``: per layer ``(col bases, row bases, iso_col, iso_row)``.
    ``groups``: ``[n]`` labels of items that belong together (a formal sentence and its informal
    pair): the bootstrap resamples whole groups."""
    n = len(labels)
    y = torch.tensor(labels, dtype=torch.float32)
    if groups is None:
        inverse, k = np.arange(n), n
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        k = int(inverse.max()) + 1
    boot_w = torch.tensor(
        np.stack([np.bincount(g.integers(0, k, k), minlength=k)[inverse] for _ in range(config.n_boot)]),
        dtype=torch.float32,
    )
    perm_y = torch.tensor(
        np.stack(
            [_shuffle(labels, inverse if groups is not None else None, g) for _ in range(config.n_shuffles)]
        ),
        dtype=torch.float32,
    )
    ones = torch.ones(1, n)
    records, prev = [], None
    per_layer = {"write": [], "write_data": [], "read": []}
    boot = {"write": [], "write_data": [], "read": []}
    for layer, (x, (col, row, iso_col, iso_row)) in enumerate(zip(xs, spaces)):
        share = float(_shares(col, _mean_diffs(x, ones, y[None]))[0])
        data_base = float(_shares(col, _mean_diffs(x, ones.expand(config.n_shuffles, n), perm_y)).mean())
        b_share = _shares(col, _mean_diffs(x, boot_w, y[None]))
        boot["write"].append(to_numpy(b_share / iso_col))
        boot["write_data"].append(to_numpy(b_share / data_base))
        rec = {
            "layer": layer,
            "write_share": share,
            "write_random": iso_col,
            "write_shuffled": data_base,
            "write_ratio": share / iso_col,
            "write_ratio_shuffled": share / data_base,
        }
        per_layer["write"].append(share / iso_col)
        per_layer["write_data"].append(share / data_base)
        if prev is not None:
            read = float(_shares(row, _mean_diffs(prev, ones, y[None]))[0])
            rec.update({"read_share": read, "read_random": iso_row, "read_ratio": read / iso_row})
            per_layer["read"].append(read / iso_row)
            boot["read"].append(to_numpy(_shares(row, _mean_diffs(prev, boot_w, y[None])) / iso_row))
        else:
            rec.update({"read_share": float("nan"), "read_random": iso_row, "read_ratio": float("nan")})
        records.append(rec)
        prev = x
    estimates = {}
    for key in per_layer:
        # bootstrap over items: each resample recomputes every layer's direction
        stats = np.stack(boot[key]).mean(0)
        lo, hi = np.quantile(stats, [0.025, 0.975])
        estimates[key] = Estimate(float(np.mean(per_layer[key])), float(lo), float(hi), n)
    return records, estimates


def run_basis(
    model: nn.Module,
    tokenizer,
    config: BasisConfig | None = None,
    items: list[tuple[str, int]] | None = None,
    vectors=None,
    seed: int = 0,
    progress_bar: bool | None = None,
    dimension_data: dict[str, list[tuple[str, int]]] | None = None,
) -> ExperimentResult:
    """OV readouts, an optional steering-vector readout, and the alignment test of each named
    dimension's direction (sentiment and the others of ``config.dimensions``).

    ``items``: your own sentiment items; ``dimension_data``: your own items for any dimension
    (``{name: [(text, label), ...]}``, any name), used instead of the shipped data."""
    from vsteer.experiments.probing import collect_features

    config = config or BasisConfig()
    arch = get_arch(model)
    own = dict(dimension_data or {})
    if items is not None:
        own["sentiment"] = items
    data, groups = {}, {}
    for name in config.dimensions:
        if name not in DIMENSIONS:
            raise DataError(f"unknown basis dimension {name!r}; expected some of: {', '.join(DIMENSIONS)}")
        if name not in own:  # your own items replace the shipped ones
            n = config.n_items if name == "sentiment" else config.n_dimension_items
            data[name] = dimension_items(name, n, seed)
            if name == "formality":  # pair by pair: a formal sentence, then its informal pair
                groups[name] = np.arange(len(data[name])) // 2
        else:
            data[name] = list(own.pop(name))
    data.update({k: list(v) for k, v in own.items()})
    for name, rows in data.items():
        labels = np.array([y for _, y in rows])
        if len(rows) < 4 or len(np.unique(labels)) < 2:
            raise DataError(f"the {name} direction needs items of both labels; got {len(rows)} items")
    texts = [t for rows in data.values() for t, _ in rows]
    feats = collect_features(
        model, tokenizer, texts, ("resid",), None, "last", config.batch_size, config.max_length, progress_bar
    )
    spaces = ov_spaces(model)

    g = rng(seed)
    records, verdicts, start = [], [], 0
    cmd = "vsteer basis"
    for name, rows in data.items():
        stop = start + len(rows)
        xs = [torch.tensor(feats[("resid", layer)][start:stop]) for layer in range(arch.n_layers)]
        start = stop
        labels = np.array([y for _, y in rows])
        recs, estimates = direction_alignment(xs, labels, spaces, config, g, groups.get(name))
        records += [{"dimension": name, **r} for r in recs]
        for key, (claim, measured) in _CLAIMS.items():
            if name != "sentiment":  # the sentiment rows keep their wording; the others name the dimension
                claim = claim.replace("same,", f"{name}: same,")
            verdicts.append(
                finding(
                    f"basis.{key}",
                    claim=claim.format(d=name),
                    measured=measured,
                    effect=estimates[key],
                    command=cmd,
                )
            )

    readout = ov_readout(model, tokenizer, n_directions=config.n_directions, k=config.top_k)
    vector_rows = (
        readout_steering_vector(model, tokenizer, vectors, k=config.top_k) if vectors is not None else []
    )
    sizes = ", ".join(
        f"{name} {len(rows)} ({_DIMENSION_TEXT.get(name, 'your items')})" for name, rows in data.items()
    )
    untested = [d for d in UNTESTED_DIMENSIONS if d not in data]
    paired_note = f" ({', '.join(groups)}: of the pairs)" if groups else ""
    notes = [
        f"Each dimension's direction: mean difference of the two labels' resid at the last token; items: {sizes}. "
        f"CIs by {config.n_boot} bootstrap resamples of the items{paired_note}. Random share = rank/d_model "
        f"({arch.head_dim}/{arch.d_model} per head); shuffled baseline from {config.n_shuffles} label permutations"
        f"{' (within pairs for the paired ones)' if groups else ''}.",
        *[f"Untested: {d}: {UNTESTED_DIMENSIONS[d]}." for d in untested],
        "",
        "OV readout, last layer (top tokens of each head's top singular output direction, + and − sign):",
        "",
        _readout_table([r for r in readout if r["layer"] == arch.n_layers - 1]),
    ]
    if vector_rows:
        notes += ["", "Steering-vector readout:", "", _readout_table(vector_rows)]
    meta = {
        "config": asdict(config),
        "seed": seed,
        "n_items": len(data.get("sentiment", [])),
        "dimensions": {name: len(rows) for name, rows in data.items()},
        "untested_dimensions": {d: UNTESTED_DIMENSIONS[d] for d in untested},
        "ov_readout": readout,
        "vector_readout": vector_rows,
    }
    return ExperimentResult(
        name="basis",
        title="Claim (d): W_V's column space as a response semantic basis",
        records=records,
        findings=verdicts,
        meta=meta,
        columns=[
            "dimension",
            "layer",
            "write_share",
            "write_random",
            "write_shuffled",
            "write_ratio",
            "write_ratio_shuffled",
            "read_share",
            "read_ratio",
        ],
        notes=notes,
        plotter=_plot,
    )


def _readout_table(rows: list[dict]) -> str:
    keys = [k for k in ("layer", "head", "site", "singular_value", "norm") if k in rows[0]] if rows else []
    lines = ["| " + " | ".join(keys) + " | top tokens (+) | top tokens (−) |", "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        vals = [f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append("| " + " | ".join(vals) + f" | {r['top_tokens_plus']} | {r['top_tokens_minus']} |")
    return "\n".join(lines)


def _plot(records, path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for dim in dict.fromkeys(r.get("dimension", "sentiment") for r in records):
        rows = [r for r in records if r.get("dimension", "sentiment") == dim]
        x = [r["layer"] for r in rows]
        line = ax.plot(
            x, [r["write_ratio_shuffled"] for r in rows], marker=".", label=f"{dim}: write / shuffled"
        )
        ax.plot(
            x,
            [r["read_ratio"] for r in rows],
            ls=":",
            color=line[0].get_color(),
            label=f"{dim}: read / random",
        )
    ax.axhline(1.0, color="k", lw=0.6, ls="--")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the direction in OV span (ratio to baseline)")
    ax.set_title("Dimension directions vs per-head OV subspaces")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
