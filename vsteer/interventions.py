"""Trainable interventions at a site: small torch modules applied through the hook layer.

An :class:`Intervention` holds one edit per chosen layer of one site (``v``: the value projection's
output, all kv heads flattened to one vector of ``width = n_kv_heads * head_dim``; ``resid`` and
``z`` for comparison) and the positions it acts at (``all``, ``prompt``, ``generated``,
``last:K`` = the last K prompt tokens). ``h`` below is the site vector ``[batch, seq, width]``.

=========== ============================================== ============================================
kind        edit                                           parameters per layer
=========== ============================================== ============================================
``loreft``  ``h + R^T (W h + b - R h)``, R ``[rank, width]``  ``2 * rank * width + rank``
            with orthonormal rows (a torch parametrization:
            :class:`OrthonormalRows`), W ``[rank, width]``,
            b ``[rank]``
``bias``    ``h + c``, c ``[width]`` (a trained steering    ``width``
            vector)
``dynamic`` ``h + sigmoid(g . x + g0) * U silu(D x + d)``:  ``rank * d_in + rank + width * rank + d_in + 1``
            x ``[d_in]`` the layer input the site reads
            (v: the normed hidden state W_V reads, resid:
            the block's input, z: z itself), D ``[rank,
            d_in]``, U ``[width, rank]``, a scalar gate
=========== ============================================== ============================================

Every kind starts as the identity (LoReFT with ``W = R, b = 0``; ``c = 0``; ``U = 0``), so an
untrained intervention leaves the logits unchanged, like a LoRA adapter with ``B = 0``.

Applied per batch row like steering vectors (:func:`apply_intervention` with one intervention or
``None`` per row), skipping padding, on the right tokens under left padding and KV-cached
``generate`` (the hook layer tracks positions). Saved as safetensors with checked metadata
(:meth:`Intervention.save`, written atomically). :func:`merge` folds a ``v``-site ``loreft`` or
``bias`` edit at every position into W_V and the value bias, exactly; ``dynamic`` (non-linear in
the input) and position-restricted edits cannot be merged and are refused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vsteer.errors import VsteerError

KINDS = ("loreft", "bias", "dynamic")
SITES = ("v", "resid", "z")
FORMAT = "vsteer.intervention/1"
FILE_NAME = "intervention.safetensors"
# positions an intervention may act at (``last:K`` for the last K prompt tokens)
POSITIONS = ("all", "prompt", "generated", "last:K")


class InterventionError(VsteerError):
    """Intervention for another model or site, bad kind, rank or positions, unreadable file."""


# --------------------------------------------------------------------------------------------
# the edits (one per layer)
# --------------------------------------------------------------------------------------------
class OrthonormalRows(nn.Module):
    """A torch parametrization: ``X [rank, width]`` (full rank) -> ``R = Q^T`` of the reduced QR of
    ``X^T``, signs fixed so that ``diag(R_qr) > 0``: orthonormal rows, and ``R = X`` when ``X``'s rows
    already are (so :meth:`right_inverse` is the identity).

    Used instead of torch's ``orthogonal`` (Householder) map, which casts the diagonal of its
    parameter to int signs: weight decay (or any step) that moves a diagonal entry of 1 below 1
    turns it into 0 and zeroes a whole row of R. Here scaling ``X`` leaves ``R`` unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, r = torch.linalg.qr(x.t().float())
        sign = torch.where(torch.diagonal(r) >= 0, 1.0, -1.0)
        return (q * sign).t().to(x.dtype)

    def right_inverse(self, r: torch.Tensor) -> torch.Tensor:
        return r


class LoReFT(nn.Module):
    """``h + R^T (W h + b - R h)`` on ``h [..., width]``; R ``[rank, width]`` with orthonormal rows."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        from torch.nn.utils import parametrize

        self.rotate = nn.Linear(width, rank, bias=False)
        nn.init.orthogonal_(self.rotate.weight)
        parametrize.register_parametrization(self.rotate, "weight", OrthonormalRows())
        self.source = nn.Linear(width, rank)
        with torch.no_grad():  # W = R, b = 0: the edit starts as the identity
            self.source.weight.copy_(self.rotate.weight)
            self.source.bias.zero_()

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        r = self.rotate.weight
        # (W - R) h + b in one product: exactly zero at the start (W = R, b = 0)
        low = nn.functional.linear(h, self.source.weight - r, self.source.bias)
        return h + low @ r.to(low.dtype)

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [width, width], c [width])`` with ``edit(h) = A h + c``."""
        r = self.rotate.weight.float()
        w, b = self.source.weight.float(), self.source.bias.float()
        return torch.eye(r.shape[1]) + r.t() @ (w - r), r.t() @ b


class Bias(nn.Module):
    """``h + c``: a trained steering vector, ``c [width]``."""

    def __init__(self, width: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return h + self.bias.to(h.dtype)

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.eye(self.bias.numel()), self.bias.float().clone()


class DynamicValue(nn.Module):
    """``h + sigmoid(g . x + g0) * U silu(D x + d)``: a Δh produced from the layer input ``x [..., d_in]``."""

    def __init__(self, width: int, d_in: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_in, rank)
        self.up = nn.Linear(rank, width, bias=False)
        self.gate = nn.Linear(d_in, 1)
        nn.init.zeros_(self.up.weight)  # Δh = 0 at the start

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(h.dtype)
        delta = torch.sigmoid(self.gate(x)) * self.up(nn.functional.silu(self.down(x)))
        return h + delta.to(h.dtype)


def parameter_count(kind: str, width: int, rank: int = 1, d_in: int | None = None) -> int:
    """Trainable parameters of one layer's edit (see the module table)."""
    if kind == "loreft":
        return 2 * rank * width + rank
    if kind == "bias":
        return width
    if kind == "dynamic":
        d_in = width if d_in is None else d_in
        return rank * d_in + rank + width * rank + d_in + 1
    raise InterventionError(f"unknown intervention kind {kind!r}; expected one of {', '.join(KINDS)}")


def rank_for_budget(kind: str, width: int, n_layers: int, budget: int, d_in: int | None = None) -> int:
    """The largest rank whose parameters over ``n_layers`` layers stay within ``budget`` (>= 1)."""
    if kind == "bias":
        raise InterventionError("a bias intervention has no rank: its budget is width x layers")
    rank = 1
    while rank < width and parameter_count(kind, width, rank + 1, d_in) * n_layers <= budget:
        rank += 1
    return rank


@dataclass
class InterventionPlan:
    """The size of an intervention arm: ``rank`` on ``layers`` layers, ``trainable`` parameters
    (all of them count: an intervention has no frozen part, so effective = trainable)."""

    arm: str
    kind: str
    site: str
    rank: int
    layers: int
    trainable: int

    @property
    def effective(self) -> int:
        return self.trainable

    def summary(self) -> str:
        rank = " fixed size (width x layers)," if self.kind == "bias" else f" rank {self.rank}"
        return f"{self.arm}: {self.kind} at {self.site},{rank} on {self.layers} layers = {self.trainable:,} trainable"


def plan_intervention(
    model, kind: str, site: str = "v", budget: int | None = None, rank: int = 4, layers="all", arm=None
) -> InterventionPlan:
    """The rank (the largest within ``budget`` when given, else ``rank``) and parameter count of an
    intervention of ``kind`` at ``site`` on ``model``'s ``layers``."""
    from vsteer.arch import get_arch
    from vsteer.sites import parse_layers

    arch = get_arch(model)
    chosen = parse_layers(layers, arch.n_layers)
    if site in ("v", "z"):
        chosen = [layer for layer in chosen if arch.has_attention(layer)]
    width, d_in = _site_widths(arch, site)
    if budget is not None and kind != "bias":
        rank = rank_for_budget(kind, width, len(chosen), budget, d_in)
    rank = 1 if kind == "bias" else rank
    count = parameter_count(kind, width, rank, d_in) * len(chosen)
    return InterventionPlan(arm or f"{site}-{kind}", kind, site, rank, len(chosen), count)


def _check_positions(positions) -> object:
    """``all``/``prompt``/``generated``/``last:K`` or a list of ints -> the hook layer's positions."""
    if isinstance(positions, str):
        if positions in ("all", "prompt", "generated"):
            return positions
        head, _, k = positions.partition(":")
        if head == "last" and k.isdigit() and int(k) > 0:
            return list(range(-int(k), 0))
    elif isinstance(positions, list | tuple) and positions:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
            return list(positions)
    raise InterventionError(
        f"positions {positions!r}: expected 'all', 'prompt', 'generated', 'last:K' (K > 0) or a list of ints"
    )


# --------------------------------------------------------------------------------------------
# the intervention
# --------------------------------------------------------------------------------------------
class Intervention(nn.Module):
    """Trainable edits at one site: ``edits[str(layer)]`` is a :class:`LoReFT`, :class:`Bias` or
    :class:`DynamicValue` acting on the site vector ``[batch, seq, width]``.

    ``width``: the site's features per token (``v``: ``n_kv_heads * head_dim``; ``z``:
    ``n_heads * head_dim``; ``resid``: ``d_model``). ``d_in``: the width of the input a dynamic
    edit reads. Build one for a model with :meth:`for_model`.
    """

    def __init__(
        self,
        kind: str,
        site: str,
        layers: Sequence[int],
        width: int,
        rank: int = 4,
        positions="all",
        d_in: int | None = None,
        model_name: str | None = None,
        fingerprint: str | None = None,
        n_layers: int | None = None,
        created: str | None = None,
        extra: dict | None = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise InterventionError(f"unknown intervention kind {kind!r}; expected one of {', '.join(KINDS)}")
        if site not in SITES:
            raise InterventionError(f"interventions act at sites {', '.join(SITES)}, not {site!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise InterventionError(f"rank must be a positive int, got {rank!r}")
        if kind != "bias" and rank > width:
            raise InterventionError(
                f"rank {rank} is above the width of site {site!r} ({width} features per token)"
            )
        layers = sorted(set(layers))
        if not layers or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
            raise InterventionError(f"layers must be a non-empty list of non-negative ints, got {layers!r}")
        _check_positions(positions)
        self.kind, self.site, self.width, self.positions = kind, site, int(width), positions
        self.rank = rank if kind != "bias" else 1
        self.d_in = (int(d_in) if d_in is not None else int(width)) if kind == "dynamic" else None
        self.model_name, self.fingerprint, self.n_layers = model_name, fingerprint, n_layers
        self.created = created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.extra = dict(extra or {})
        self.edits = nn.ModuleDict({str(layer): self._edit() for layer in layers})

    def _edit(self) -> nn.Module:
        if self.kind == "loreft":
            return LoReFT(self.width, self.rank)
        if self.kind == "bias":
            return Bias(self.width)
        return DynamicValue(self.width, self.d_in, self.rank)

    @classmethod
    def for_model(
        cls,
        model,
        kind: str = "loreft",
        site: str = "v",
        layers="all",
        rank: int = 4,
        positions="all",
        seed=None,
    ) -> Intervention:
        """An identity-initialised intervention for ``model`` (``layers``: ``"all"``, ``"8-16"``, a list)."""
        from vsteer.arch import get_arch
        from vsteer.sites import parse_layers

        arch = get_arch(model)
        if site not in SITES:
            raise InterventionError(f"interventions act at sites {', '.join(SITES)}, not {site!r}")
        chosen = parse_layers(layers, arch.n_layers)
        if site in ("v", "z"):
            chosen = [layer for layer in chosen if arch.has_attention(layer)]
        width, d_in = _site_widths(arch, site)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            iv = cls(
                kind,
                site,
                chosen,
                width,
                rank,
                positions,
                d_in,
                model_name=_model_name(model),
                fingerprint=_fingerprint(model),
                n_layers=arch.n_layers,
            )
        return iv

    # --- facts ------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.edits)

    def num_parameters(self) -> int:
        """Trainable parameters in all layers (``parameter_count`` x layers)."""
        return sum(p.numel() for p in self.parameters())

    def __repr__(self) -> str:
        return (
            f"Intervention(kind={self.kind!r}, site={self.site!r}, layers={self.layers}, rank={self.rank}, "
            f"positions={self.positions!r}, params={self.num_parameters()})"
        )

    def check(self, model, site: str | None = None) -> Intervention:
        """Raise :class:`InterventionError` (one line) unless this intervention fits ``model``."""
        from vsteer.arch import get_arch

        if site is not None and site != self.site:
            raise InterventionError(f"intervention acts at site {self.site!r}; expected site {site!r}")
        theirs = _fingerprint(model)
        if self.fingerprint is not None and theirs is not None and theirs != self.fingerprint:
            raise InterventionError(
                f"intervention was made for model {self.model_name!r} (config fingerprint {self.fingerprint}); "
                f"this model is {_model_name(model)!r} (fingerprint {theirs})"
            )
        arch = get_arch(model)
        bad = [layer for layer in self.layers if layer >= arch.n_layers]
        if bad:
            raise InterventionError(
                f"intervention has layers {bad} but the model has {arch.n_layers} layers (0..{arch.n_layers - 1})"
            )
        width, d_in = _site_widths(arch, self.site)
        if self.rank > width and self.kind != "bias":
            raise InterventionError(
                f"rank {self.rank} is above the width of this model's site {self.site!r} ({width})"
            )
        if width != self.width or (self.kind == "dynamic" and d_in != self.d_in):
            raise InterventionError(
                f"intervention at site {self.site!r} has width {self.width} (input {self.d_in}); this model's "
                f"site has width {width} (input {d_in})"
            )
        return self

    # --- files ------------------------------------------------------------------------------
    def metadata(self) -> dict:
        from vsteer.vectors import package_version

        return {
            "format": FORMAT,
            "kind": self.kind,
            "site": self.site,
            "layers": self.layers,
            "positions": self.positions,
            "rank": self.rank,
            "width": self.width,
            "d_in": self.d_in,
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "n_layers": self.n_layers,
            "parameters": self.num_parameters(),
            "created": self.created,
            "version": package_version(),
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (safetensors, float32, tensors ``layer.N.<parameter>``; JSON metadata), atomically.
        A directory path gets ``intervention.safetensors`` inside it."""
        from safetensors.torch import save

        from vsteer.files import atomic_write

        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        blob = {
            f"layer.{name}": t.detach().float().cpu().contiguous()
            for name, t in self.edits.state_dict().items()
        }
        meta = json.dumps(self.metadata(), default=str)
        return atomic_write(path, save(blob, metadata={"vsteer": meta}))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``<directory>/intervention.safetensors``."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        return self.save(Path(directory) / FILE_NAME)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, site: str | None = None) -> Intervention:
        """Read a file written by :meth:`save` (or a directory holding one); with ``model`` (and
        ``site``), check that it fits (:meth:`check`). Any mismatch is one :class:`InterventionError`."""
        from vsteer.files import load_tensors

        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        tensors, meta = load_tensors(path, "intervention", FORMAT, InterventionError)
        try:
            iv = cls(
                meta["kind"],
                meta["site"],
                meta["layers"],
                meta["width"],
                meta["rank"],
                meta["positions"],
                meta.get("d_in"),
                model_name=meta.get("model_name"),
                fingerprint=meta.get("fingerprint"),
                n_layers=meta.get("n_layers"),
                created=meta.get("created"),
                extra=meta.get("extra"),
            )
        except KeyError as err:
            raise InterventionError(f"{str(path)!r}: metadata lacks {err}") from None
        state = {name.removeprefix("layer."): t for name, t in tensors.items()}
        expected = iv.edits.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise InterventionError(
                f"{str(path)!r}: tensors {sorted(tensors)} do not match a {iv.kind} intervention of rank "
                f"{iv.rank} at layers {iv.layers}"
            )
        iv.edits.load_state_dict(state)
        if site is not None and site != iv.site:
            raise InterventionError(f"intervention acts at site {iv.site!r}; expected site {site!r}")
        if model is not None:
            iv.check(model)
        return iv

    from_pretrained = load


def _site_widths(arch, site: str) -> tuple[int, int]:
    """``(width, d_in)``: the site's features per token and the width of the input a dynamic edit reads."""
    shape = arch.site_shape(site)
    width = int(torch.Size(shape).numel())
    if site == "v":
        return width, int(arch.weight(arch.attention_layers[0], "v").shape[1])
    if site == "resid":
        return width, arch.d_model
    return width, width  # z: the edit reads z itself (the input of W_O)


def _fingerprint(model) -> str | None:
    from vsteer.vectors import model_fingerprint as fp

    return fp(model)


def _model_name(model) -> str:
    from vsteer.vectors import model_name_of as name

    return name(model)


# --------------------------------------------------------------------------------------------
# applying
# --------------------------------------------------------------------------------------------
def _entries(interventions) -> list[tuple[Intervention, torch.Tensor | None]]:
    """``(intervention, rows)``: ``rows`` a ``[batch]`` bool mask, or ``None`` for every row."""
    if isinstance(interventions, Intervention):
        return [(interventions, None)]
    if not isinstance(interventions, list | tuple) or not interventions:
        raise InterventionError(
            "expected an Intervention or a list with one Intervention (or None) per batch row, "
            f"got {type(interventions).__name__}"
        )
    n, out = len(interventions), []
    for row, iv in enumerate(interventions):
        if iv is None:
            continue
        if not isinstance(iv, Intervention):
            raise InterventionError(f"row {row}: expected an Intervention or None, got {type(iv).__name__}")
        entry = next((e for e in out if e[0] is iv), None)
        if entry is None:
            entry = (iv, torch.zeros(n, dtype=torch.bool))
            out.append(entry)
        entry[1][row] = True
    return out


def _operation(iv: Intervention, layer: int, rows: torch.Tensor | None):
    from vsteer.hooks import apply, position_mask

    edit, positions = iv.edits[str(layer)], _check_positions(iv.positions)
    site, needs_input = iv.site, iv.kind == "dynamic"
    positions = None if positions == "all" else positions

    def fn(x: torch.Tensor, step) -> torch.Tensor:
        h = x.flatten(2) if x.dim() == 4 else x  # [batch, seq, width]
        dtype = next(edit.parameters()).dtype
        inp = None
        if needs_input:
            inp = h if site == "z" else step.module_input
            if inp is None or inp.shape[:2] != h.shape[:2]:
                raise InterventionError(
                    f"a dynamic intervention at {site}.{layer} needs the layer input, which this model's "
                    "hooked module does not receive as its first positional argument"
                )
            inp = inp.to(dtype)
        new = edit(h.to(dtype), inp).to(x.dtype).view_as(x)
        mask = position_mask(positions, step, x.shape[0], x.device)
        if step.token_mask is not None:  # padding is never edited
            mask = step.token_mask if mask is None else mask & step.token_mask
        if rows is not None:
            if rows.shape[0] != x.shape[0]:
                raise InterventionError(
                    f"per-row interventions: {rows.shape[0]} rows given but the batch has {x.shape[0]}"
                )
            r = rows.to(x.device)[:, None]
            mask = r if mask is None else mask & r
        if mask is None:
            return new
        return torch.where(mask.reshape(mask.shape + (1,) * (x.dim() - 2)), new, x)

    return apply(fn)


def intervention_ops(model, interventions) -> dict:
    """The hook-layer operations :func:`apply_intervention` installs: ``{(site, layer): [apply(...)]}``."""
    ops: dict = {}
    for iv, rows in _entries(interventions):
        iv.check(model)
        for layer in iv.layers:
            ops.setdefault((iv.site, layer), []).append(_operation(iv, layer, rows))
    return ops


@contextmanager
def apply_intervention(model, interventions):
    """Apply interventions for the duration of the context (around any forward or ``generate``).

    ``interventions``: one :class:`Intervention` (every row), or a list with one per batch row
    (``None``: that row is not edited). Each is checked against ``model``; its parameters must be
    on the model's device. Gradients flow into its parameters (train it inside the context).
    """
    from vsteer.hooks import intervene

    with intervene(model, intervention_ops(model, interventions)):
        yield


# --------------------------------------------------------------------------------------------
# merging
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def merge(model, intervention: Intervention):
    """Fold a ``v``-site ``loreft`` or ``bias`` intervention at every position into the weights,
    in place: ``v' = A v + c`` with ``v = W_V x + b_V`` is ``(A W_V) x + (A b_V + c)``. A value
    projection without a bias gets one; for fused QKV only the V rows change. Returns ``model``.

    Not mergeable (refused with one line): ``dynamic`` (Δv depends non-linearly on the input),
    positions other than ``all`` (weights act at every position), sites other than ``v``,
    per-row use, and a value projection under a LoRA adapter. Padding tokens, which the applied
    intervention skips, are edited by the merged weights (their outputs are masked anyway).
    """
    from vsteer.arch import base_layer, get_arch

    if not isinstance(intervention, Intervention):
        raise InterventionError(f"merge needs an Intervention, got {type(intervention).__name__}")
    iv = intervention.check(model)
    if iv.kind == "dynamic":
        raise InterventionError(
            "a dynamic intervention cannot be merged: its Δv is a non-linear function of the layer input; "
            "apply it with apply_intervention"
        )
    if iv.positions != "all":
        raise InterventionError(
            f"an intervention at positions {iv.positions!r} cannot be merged: weights act at every position"
        )
    if iv.site != "v":
        raise InterventionError(
            f"merge folds v-site interventions into W_V; this one acts at site {iv.site!r}"
        )
    arch = get_arch(model)
    for layer in iv.layers:
        module = arch.projection(layer, "v")
        proj = base_layer(module)
        if proj is not module:
            raise InterventionError(
                f"the value projection of layer {layer} carries a LoRA adapter; merge that first"
            )
        a, c = iv.edits[str(layer)].affine()
        w = proj.weight  # Linear [out, in]; GPT-2 Conv1D [in, out]
        w_lin = w.t() if arch.spec.conv1d else w
        rows = arch.rows("v")
        rows = torch.arange(w_lin.shape[0]) if rows is None else rows
        rows = rows.to(w.device)
        if proj.bias is None:
            proj.bias = nn.Parameter(torch.zeros(w_lin.shape[0], dtype=w.dtype, device=w.device))
        a, c = a.to(w.device), c.to(w.device)
        w_v, b_v = w_lin[rows].float(), proj.bias[rows].float()
        w_lin[rows] = (a @ w_v).to(w.dtype)  # writes through the Conv1D transpose view too
        proj.bias[rows] = (a @ b_v + c).to(w.dtype)
    return model


merge_intervention = merge
