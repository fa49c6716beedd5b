"""Injection of steering vectors at inference, as a context manager around any forward or ``generate``.

::

    with vsteer.steer(model, happy, scale=4.0, positions="generated"):
        model.generate(**batch)

``vectors``: one :class:`~vsteer.vectors.SteeringVector`, a list of them (all added), or
``(vector, scale)`` pairs. A scale is a number or one number per batch row, so each row can
get its own vector and strength (:func:`per_row` builds that from one vector per row).
``positions``: ``"all"``, ``"prompt"``, ``"generated"``, absolute indices, a slice, or a bool
tensor ``[batch, total_len]``; these are tracked by the hook layer, so they stay on the right
tokens under KV-cached generation with left padding. Padding tokens are never steered.

Scale 0 registers nothing, so logits are bit-identical to an unsteered run.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from vsteer.errors import VectorError
from vsteer.vectors import SteeringVector, check_scale

Scale = float | Sequence[float] | torch.Tensor


def _row_scales(scale, what: str = "scale") -> float | torch.Tensor:
    """A number, or a ``[batch]`` float tensor of per-row scales."""
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        if scale.dim() != 1 or scale.dtype == torch.bool or torch.is_complex(scale):
            raise VectorError(
                f"per-row {what} must be a 1-D tensor of numbers, got shape {tuple(scale.shape)}"
            )
        if scale.numel() == 0:
            raise VectorError(f"per-row {what} is empty")
        if not torch.isfinite(scale.float()).all():
            raise VectorError(f"per-row {what} contains NaN or inf: {scale.tolist()}")
        return scale.detach().float().cpu()
    if isinstance(scale, list | tuple):
        if not scale:
            raise VectorError(f"per-row {what} is empty")
        return torch.tensor([check_scale(s, what) for s in scale], dtype=torch.float32)
    return check_scale(scale, what)


def _entries(vectors) -> list[tuple[SteeringVector, object]]:
    if isinstance(vectors, SteeringVector):
        return [(vectors, 1.0)]
    if isinstance(vectors, tuple) and len(vectors) == 2 and isinstance(vectors[0], SteeringVector):
        return [vectors]
    if isinstance(vectors, list | tuple):
        out = []
        for item in vectors:
            if isinstance(item, SteeringVector):
                out.append((item, 1.0))
            elif isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], SteeringVector):
                out.append((item[0], item[1]))
            else:
                raise VectorError(
                    f"expected a SteeringVector or (SteeringVector, scale), got {type(item).__name__}: {item!r:.80}"
                )
        if not out and not isinstance(vectors, PerRow):  # per_row([None, None]): no row steered
            raise VectorError("steer needs at least one vector")
        return out
    raise VectorError(f"expected a SteeringVector or a list of them, got {type(vectors).__name__}")


class PerRow(list):
    """What :func:`per_row` returns: ``(vector, per-row scales)`` entries, empty when no row is
    steered (``steer`` then changes nothing, where an empty plain list is refused as a mistake)."""


def per_row(vectors: Sequence[SteeringVector | None], scale: Scale = 1.0) -> PerRow:
    """One vector per batch row (``None``: no steering for that row) -> ``(vector, per-row scales)``.

    ``scale``: one number or one per row. Rows sharing a vector share one entry.
    """
    n = len(vectors)
    scales = _row_scales(scale)
    if isinstance(scales, torch.Tensor) and len(scales) != n:
        raise VectorError(f"per-row scale has {len(scales)} values for {n} rows")
    scales = scales if isinstance(scales, torch.Tensor) else torch.full((n,), scales)
    out = PerRow()
    for row, vec in enumerate(vectors):
        if vec is None:
            continue
        if not isinstance(vec, SteeringVector):
            raise VectorError(f"row {row}: expected a SteeringVector or None, got {type(vec).__name__}")
        entry = next((e for e in out if e[0] is vec), None)
        if entry is None:
            entry = (vec, torch.zeros(n))
            out.append(entry)
        entry[1][row] = scales[row]
    return out


def steering_ops(model, vectors, scale: Scale = 1.0, positions="all", include_padding: bool = False) -> dict:
    """The hook-layer operations that :func:`steer` installs: ``{(site, layer): add(...)}``.

    Vectors at the same site and layer are summed into one addition.
    """
    from vsteer.hooks import add, check_positions

    positions = check_positions(positions)  # a one-shot iterable comes back as a list
    totals = _totals(model, vectors, scale)
    return {key: add(t, positions=positions, include_padding=include_padding) for key, t in totals.items()}


def _totals(model, vectors, scale: Scale) -> dict[tuple[str, int], torch.Tensor]:
    """``{(site, layer): scaled sum of the vectors there}`` (with a leading row axis for per-row scales)."""
    base = _row_scales(scale)
    totals: dict[tuple[str, int], torch.Tensor] = {}
    rows = len(base) if isinstance(base, torch.Tensor) else None
    for vec, own in _entries(vectors):
        vec.check(model)
        s = _row_scales(own)
        if isinstance(s, torch.Tensor):  # every per-row entry speaks of the same rows
            if rows is not None and len(s) != rows:
                raise VectorError(f"per-row scales disagree in length: {len(s)} and {rows}")
            rows = len(s)
        s = s * base
        if (isinstance(s, float) and s == 0.0) or (isinstance(s, torch.Tensor) and not s.any()):
            continue
        for layer, t in vec.directions.items():
            t = t.float()
            if isinstance(s, torch.Tensor):
                contrib = s.to(t.device).reshape((-1,) + (1,) * t.dim()) * t
            else:
                contrib = s * t
            key = (vec.site, layer)
            prev = totals.get(key)
            if prev is None:
                totals[key] = contrib
            else:
                if prev.dim() != contrib.dim():
                    prev, contrib = torch.broadcast_tensors(prev, contrib)
                totals[key] = prev + contrib
    return totals


# sites whose module output is an affine projection: a constant added there is a bias
_BIAS_SITES = ("q", "k", "v")


def _as_bias(arch, site: str, layer: int, vector: torch.Tensor):
    """(linear module, the addition to its bias that puts ``vector`` at the site's rows), or
    ``None`` where adding the vector to the module's bias is not exactly the hook's addition."""
    from transformers.pytorch_utils import Conv1D

    from vsteer.hooks import fit_vector, site_shape
    from vsteer.sites import as_site

    if site not in _BIAS_SITES:
        return None
    module = arch.projection(layer, site)
    # exactly Linear/Conv1D (a PEFT or quantised wrapper computes more than x W + b)
    if type(module) not in (nn.Linear, Conv1D) or hasattr(module, "_hf_hook"):
        return None  # accelerate's offload hooks reload parameters by name at each forward
    if module._forward_hooks or module._forward_pre_hooks:
        return None  # a reader or editor already on the projection (capture, watch) sees what hooks see
    bias = module.bias
    if isinstance(bias, nn.Parameter) and bias.requires_grad and torch.is_grad_enabled():
        return None  # a bias being trained: a constant computed once would hide its updates
    shape = tuple(site_shape(arch, site))
    fitted = fit_vector(vector, shape, shape, as_site((site, layer)), None)
    if tuple(fitted.shape) != shape:  # one vector per row: only a hook can do that
        return None
    flat = fitted.reshape(-1)
    weight = module.weight
    out_features = weight.shape[1] if isinstance(module, Conv1D) else weight.shape[0]
    rows = arch.rows(site)
    delta = flat.to(device=weight.device, dtype=weight.dtype)
    if rows is not None:
        delta = torch.zeros(out_features, dtype=weight.dtype, device=weight.device).index_add(
            0, rows.to(weight.device), delta
        )
    return module, delta


def _steered_biases(changes) -> list:
    """``[(module, its bias plus every delta aimed at it)]``: the sites of one fused projection
    (q and v of ``qkv_proj``) add into one bias instead of the last one replacing the others."""
    by_module: dict[int, list] = {}
    for module, delta in changes:
        entry = by_module.setdefault(id(module), [module, None])
        entry[1] = delta if entry[1] is None else entry[1] + delta
    out = []
    for module, delta in by_module.values():
        old = module.bias  # inside an outer steer block: the outer steered bias
        out.append((module, delta if old is None else old + delta))
    return out


_ABSENT = object()


@contextmanager
def _biases(changes: list):
    """Put the steered biases in place of the projections' own for the duration of the context.

    The steered bias is a plain tensor attribute (``original + vector``), not a parameter; the
    projection's bias exactly as it was (its parameter, None, or an outer block's steered tensor)
    comes back on exit, also on exceptions, so blocks nest. Inside the context the projection's
    ``state_dict`` and ``parameters()`` do not list its bias.
    """
    saved = []
    try:
        for module, bias in changes:
            saved.append(
                (module, module._parameters.pop("bias", _ABSENT), module.__dict__.pop("bias", _ABSENT))
            )
            object.__setattr__(module, "bias", bias)
        yield
    finally:
        for module, param, plain in reversed(saved):
            module.__dict__.pop("bias", None)
            if param is not _ABSENT:
                module._parameters["bias"] = param
            if plain is not _ABSENT:
                object.__setattr__(module, "bias", plain)


@contextmanager
def steer(
    model,
    vectors,
    scale: Scale = 1.0,
    positions="all",
    include_padding: bool = False,
    when=None,
    as_bias: bool = True,
):
    """Add steering vectors for the duration of the context.

    ``vectors``: a :class:`SteeringVector`, a list of them, or ``(vector, scale)`` pairs (each
    vector is checked against ``model``). ``scale``: multiplies every vector; a number or one
    number per batch row. ``positions``: see the module docstring. ``when``: a
    :class:`~vsteer.monitor.Monitor`; only rows whose prompt it flags are steered (the others
    get scale 0), and the context yields its :class:`~vsteer.monitor.Flags`
    (see :func:`vsteer.monitor.gated`).

    ``as_bias``: a vector at ``q``/``k``/``v`` with one scale for every row at ``positions="all"``
    is added to the projection's bias (created for the duration if the projection has none)
    instead of through a hook: no Python runs per token. It equals the hook's addition on every
    real token; padding tokens get it too, but attention masks padded keys and values out of
    every real token's result, and a padded query only makes its own padded output (see
    tests/test_steer.py). Projections that are not a plain ``Linear``/``Conv1D`` (PEFT, quantised,
    offloaded), that already carry a forward hook (an enclosing ``capture`` or ``watch``, which
    then sees what it would see with hooks) or whose bias requires grad while gradients are
    enabled where the block is entered (it may be trained inside it) keep the hook. Several
    sites of one fused projection add into its one bias. ``False`` always uses hooks.
    """
    from vsteer.hooks import intervene

    if as_bias and when is None and isinstance(positions, str) and positions == "all":
        from vsteer.arch import get_arch

        totals = _totals(model, vectors, scale)
        arch = get_arch(model)
        changes = {key: _as_bias(arch, *key, t) for key, t in totals.items()}
        if any(c is not None for c in changes.values()):
            from vsteer.hooks import add

            rest = {
                key: add(totals[key], positions=positions, include_padding=include_padding)
                for key, c in changes.items()
                if c is None
            }
            with _biases(_steered_biases(c for c in changes.values() if c is not None)):
                if rest:
                    with intervene(model, rest):
                        yield
                else:
                    yield
            return
    ops = steering_ops(model, vectors, scale, positions, include_padding)
    if when is not None:
        from vsteer.monitor import gated

        with gated(model, when, ops, positions) as flags:
            yield flags
        return
    if not ops:  # every scale is zero: nothing to add, logits stay bit-identical
        yield
        return
    with intervene(model, ops):
        yield


def attention_norms(arch, layer: int):
    """``(input norm of attention, norm between the attention output and the residual add)``.

    The second exists in Gemma 2/3 (``post_attention_layernorm`` beside
    ``pre_feedforward_layernorm``); elsewhere ``post_attention_layernorm`` is the MLP's input norm
    and does not sit on the value path, so it is ``None``.
    """
    block = arch.layer(layer)
    children = dict(block.named_children())
    norms = [m for n, m in children.items() if "norm" in type(m).__name__.lower() or n.startswith("ln")]
    inp = children.get("input_layernorm") or children.get("ln_1") or (norms[0] if norms else None)
    out = children.get("post_attention_layernorm") if "pre_feedforward_layernorm" in children else None
    return inp, out


def post_norm(arch, layer: int, site: str):
    """The norm between ``site``'s output and the residual add at ``layer``, or None: Gemma 2/3's
    ``post_attention_layernorm`` for the attention sites (``v``, ``z``, ``attn``) and
    ``post_feedforward_layernorm`` for ``mlp``; never for ``resid``."""
    if site in ("v", "z", "attn"):
        return attention_norms(arch, layer)[1]
    if site == "mlp":
        return dict(arch.layer(layer).named_children()).get("post_feedforward_layernorm")
    return None


def attention_output_change(model, vector: SteeringVector) -> SteeringVector:
    """The ``attn``-site vector that adding ``vector`` at every position is exactly equal to.

    For a ``v`` vector ``c`` at layer L this is ``W_O @ concat_h c[kv(h)]`` (each key/value
    head's vector feeds its group of query heads under GQA): every head's attention output is
    ``sum_j a_hj (v_j + c) = sum_j a_hj v_j + c`` because the attention weights ``a_hj`` sum to
    one over the keys ``j``. For ``z`` it is ``W_O @ concat_h c_h``; for ``attn``, ``mlp`` and
    ``resid`` the vector itself. Returns a vector at site ``attn`` (``[d_model]`` per layer).
    """
    from dataclasses import replace

    from vsteer.arch import get_arch

    arch = get_arch(model)
    vector.check(model)
    if vector.site in ("attn", "mlp", "resid"):
        out = {layer: t.float().clone() for layer, t in vector.directions.items()}
    elif vector.site in ("v", "z"):
        out = {}
        for layer, t in vector.directions.items():
            t = t.float()
            if vector.site == "v":
                t = t.repeat_interleave(arch.n_heads // arch.n_kv_heads, dim=0)
            w_o = arch.weight(layer, "o").detach().float().cpu()
            out[layer] = w_o @ t.reshape(-1).cpu()
    else:
        raise VectorError(
            f"residual_change is defined for sites v, z, attn, mlp, resid; {vector.site!r} enters "
            f"attention non-linearly"
        )
    return replace(vector, directions=out, site="attn", method=f"residual_change({vector.method})")


def residual_change(model, vector: SteeringVector) -> SteeringVector:
    """What ``vector`` adds to the residual stream, as an ``attn``-site vector ``[d_model]`` per layer.

    Exact where the attention output enters the residual stream directly (then it equals
    :func:`attention_output_change`). Where a norm sits between them (Gemma 2/3's
    ``post_attention_layernorm``) the change depends on the input: this raises, and
    :func:`residual_change_norms` measures the size on calibration inputs instead.
    """
    from vsteer.arch import get_arch

    arch = get_arch(model)
    normed = [layer for layer in vector.directions if post_norm(arch, layer, vector.site) is not None]
    if normed:
        what = "MLP" if vector.site == "mlp" else "attention"
        raise VectorError(
            f"on {arch.family} the {what} output of layers {normed} passes a norm before the residual "
            f"add, so the residual change of a {vector.site} vector depends on the input; use "
            "attention_output_change() for the exact attn-site equivalent or residual_change_norms(..., "
            "inputs=...) for its size in the residual stream"
        )
    return attention_output_change(model, vector)


@torch.no_grad()
def residual_change_norms(model, vector: SteeringVector, inputs: dict | None = None) -> dict[int, float]:
    """Per layer, the norm of what ``vector`` (added at every position) adds to the residual stream.

    Closed form (``||W_O c||``) where the attention output enters the residual stream directly.
    Where a norm sits in between (Gemma 2/3), it is measured on ``inputs`` (a batch dict with
    ``input_ids`` and ``attention_mask``, e.g. from :func:`vsteer.encoding.encode_batch`): the mean over
    real tokens of ``||norm(a + W_O c) - norm(a)||``, with ``a`` the captured attention output.
    """
    from vsteer.arch import get_arch
    from vsteer.hooks import capture

    arch = get_arch(model)
    change = attention_output_change(model, vector)
    out: dict[int, float] = {}
    for layer, t in change.directions.items():
        post = post_norm(arch, layer, vector.site)
        if post is None:
            out[layer] = float(t.norm())
            continue
        if inputs is None:
            raise VectorError(
                f"layer {layer} of {arch.family} normalises the {'MLP' if vector.site == 'mlp' else 'attention'} "
                "output before the residual add: pass inputs= (a tokenized batch) to measure the residual change"
            )
        where = ("mlp" if vector.site == "mlp" else "attn", layer)
        with capture(model, [where], stop=True) as acts:
            model(**inputs)
        a = acts[where]
        delta = t.to(device=a.device, dtype=a.dtype)
        moved = (post(a + delta) - post(a)).float().norm(dim=-1)
        mask = inputs.get("attention_mask")
        if mask is not None:
            keep = mask.to(moved.device).bool()
            moved = moved[keep]
        out[layer] = float(moved.mean())
    return out
