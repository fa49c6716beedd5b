"""The one hook layer: sites plus operations become forward hooks inside a context manager.

Everything that touches activations (capture, steering, patching, activation swaps, probes)
goes through :func:`intervene` (or :func:`capture`, built on it). Hooks are removed when the
context exits, also on exceptions; hooks that were on the model before (transformers installs
its own) are left alone.

Positions are absolute token indices in the (left-padded) sequence, counting tokens already in
the KV cache, so an operation restricted to positions stays on the right tokens when
``generate`` feeds one token at a time. The index is tracked by a pre-hook on the decoder
stack that reads the cache length (or the length of the 2-D attention mask), independent of
the keyword names a transformers version uses inside decoder layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vsteer.arch import ModelArch, get_arch, unwrap
from vsteer.errors import SiteError
from vsteer.sites import HEAD_SITES, Site, as_site, exec_key

PositionSpec = None | str | int | slice | range | Iterable[int] | torch.Tensor


# --------------------------------------------------------------------------------------------
# where we are in the sequence
# --------------------------------------------------------------------------------------------
@dataclass
class Step:
    """The forward call being run: which absolute positions its tokens have.

    ``offset``: tokens already in the KV cache. ``seq_len``: tokens in this call.
    ``prompt_len``: length of the first (offset 0) call, i.e. the padded prompt.
    ``token_mask``: ``[batch, seq_len]`` bool, False at padding; ``None`` when there is none.
    ``module_input``: while a forward hook runs, the hooked module's first input (for q/k/v the
    ``[batch, seq, d_model]`` hidden state the projection reads, for ``resid`` the block's input;
    ``None`` elsewhere): what a context-conditioned operation reads (vsteer.interventions).
    """

    offset: int = 0
    seq_len: int = 0
    prompt_len: int = 0
    token_mask: torch.Tensor | None = None
    module_input: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None  # ``[batch, seq_len]`` token ids of the call (None: embeddings)

    def positions(self, device) -> torch.Tensor:
        return torch.arange(self.offset, self.offset + self.seq_len, device=device)


class _Tracker:
    """Reads the position offset of each forward call of the decoder stack."""

    def __init__(self):
        self.step = Step()
        self._prompt_ids = None  # input ids of the last offset-0 call

    def _continues(self, ids: torch.Tensor) -> bool:
        """Whether an offset-0 call re-feeds the last one's tokens plus new ones: ``generate``
        without a KV cache, whose prompt is still the first call's."""
        prev = self._prompt_ids
        return (
            prev is not None
            and ids.dim() == 2
            and ids.shape[0] == prev.shape[0]
            and ids.shape[1] > prev.shape[1]
            and ids.device == prev.device
            and torch.equal(ids[:, : prev.shape[1]], prev)
        )

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return None
        seq = ids.shape[1]
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        offset = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            offset = int(cache.get_seq_length())
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            offset = mask.shape[1] - seq
        token_mask = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask[:, -seq:].all()):
            token_mask = mask[:, -seq:].bool()
        prompt_len = seq if offset == 0 else self.step.prompt_len
        token_ids = None if kwargs.get("inputs_embeds") is not None or torch.is_floating_point(ids) else ids
        if offset == 0 and token_ids is not None:
            if self._continues(token_ids):
                prompt_len = self.step.prompt_len
            self._prompt_ids = token_ids
        self.step = Step(
            offset=offset, seq_len=seq, prompt_len=prompt_len, token_mask=token_mask, input_ids=token_ids
        )
        return None


def position_mask(positions: PositionSpec, step: Step, batch: int, device) -> torch.Tensor | None:
    """``[batch or 1, seq_len]`` bool mask of the positions an operation applies to (None = all).

    ``positions``: ``None``/``"all"``; ``"prompt"``; ``"generated"`` (tokens after the prompt: the
    block's first offset-0 call; a block whose first call continues a KV cache filled before it
    counts every token it sees as generated, which is how a server steers one decoding step at a time);
    an int or ints (absolute indices; negative ones count back from the end of the prompt);
    a ``slice``/``range``; or a bool tensor ``[batch, total_len]`` for per-row positions.
    """
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return None
    pos = step.positions(device)
    if isinstance(positions, str):
        if positions == "prompt":
            return (pos < step.prompt_len)[None]
        if positions == "generated":
            return (pos >= step.prompt_len)[None]
        raise SiteError(
            f"unknown positions {positions!r}; expected 'all', 'prompt', 'generated', ints or a slice"
        )
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        total = step.offset + step.seq_len
        mask = positions.to(device)
        if mask.dim() == 1:
            mask = mask[None]
        if mask.shape[1] < total:
            mask = torch.cat([mask, mask.new_zeros(mask.shape[0], total - mask.shape[1])], dim=1)
        return mask[:, step.offset : total]
    if isinstance(positions, slice):
        start = 0 if positions.start is None else positions.start
        stop = None if positions.stop is None else positions.stop
        start = start + step.prompt_len if start < 0 else start
        keep = pos >= start
        if stop is not None:
            keep &= pos < (stop + step.prompt_len if stop < 0 else stop)
        if positions.step not in (None, 1):  # check_positions refused steps below 1
            keep &= (pos - start) % positions.step == 0
        return keep[None]
    if isinstance(positions, int | torch.Tensor):
        positions = (
            [int(positions)] if isinstance(positions, int) or positions.dim() == 0 else positions.tolist()
        )
    idx = torch.tensor(
        [p + step.prompt_len if p < 0 else p for p in positions], dtype=torch.long, device=device
    )
    return torch.isin(pos, idx)[None]


def _combine(mask: torch.Tensor | None, other: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return other
    if other is None:
        return mask
    return mask & other


def check_positions(positions: PositionSpec) -> PositionSpec:
    """``positions`` checked; a one-shot iterable comes back as a list (use the returned value)."""
    if isinstance(positions, slice):
        for part in (positions.start, positions.stop, positions.step):
            if part is not None and (isinstance(part, bool) or not isinstance(part, int)):
                raise SiteError(f"a positions slice takes ints, got {positions!r}")
        if positions.step is not None and positions.step < 1:
            raise SiteError(f"a positions slice needs a step of 1 or more, got {positions!r}")
        return positions
    if positions is None or isinstance(positions, range | int | torch.Tensor):
        return positions
    if isinstance(positions, str):
        if positions not in ("all", "prompt", "generated"):
            raise SiteError(
                f"unknown positions {positions!r}; expected 'all', 'prompt', 'generated', ints or a slice"
            )
        return positions
    try:
        items = list(positions)
    except TypeError:
        raise SiteError(f"cannot use {positions!r} as positions") from None
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in items):
        raise SiteError(f"positions must be ints, got {items!r}")
    return items


# --------------------------------------------------------------------------------------------
# operations
# --------------------------------------------------------------------------------------------
class Operation:
    """An operation on a site tensor ``x`` (``[batch, seq, heads, head_dim]`` or ``[batch, seq, d]``).

    ``bind`` validates the operation against a site's shape where the operation enters, and
    returns the function the hook calls: ``fn(x, step) -> new x`` (or ``None``: unchanged).
    """

    def bind(self, site: Site, shape: tuple[int, ...]) -> Callable[[torch.Tensor, Step], torch.Tensor | None]:
        raise NotImplementedError


class _Positioned:
    """A one-shot iterable of positions becomes a list where the operation is made, so an
    operation bound at several sites (or twice) applies at the same positions; ``bind`` checks."""

    def __post_init__(self):
        try:
            self.positions = check_positions(self.positions)
        except SiteError:
            pass  # bind raises it, where the site is known


def _check_heads(heads, site: Site, shape) -> list[int] | None:
    if heads is None:
        return None
    if site.name not in HEAD_SITES:
        raise SiteError(f"heads= applies to per-head sites (q, k, v, z), not {site.name!r}")
    heads = [heads] if isinstance(heads, int) else list(heads)
    for h in heads:
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < shape[0]:
            raise SiteError(
                f"head {h!r} is out of range for site {site}: it has {shape[0]} heads (0..{shape[0] - 1})"
            )
    return heads


def _feature(x: torch.Tensor, heads: list[int] | None) -> tuple[torch.Tensor, Callable]:
    """The part of ``x`` an op works on and a function writing a new part back."""
    if heads is None:
        return x, lambda new: new
    idx = torch.tensor(heads, device=x.device)

    def put(new):
        return x.index_copy(2, idx, new)

    return x.index_select(2, idx), put


def _masked(x: torch.Tensor, new: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return new
    m = mask.reshape(mask.shape + (1,) * (x.dim() - 2))
    return torch.where(m, new, x)


@dataclass
class Add(_Positioned, Operation):
    vector: torch.Tensor
    heads: object = None
    positions: PositionSpec = None
    include_padding: bool = False

    def bind(self, site, shape):
        heads = _check_heads(self.heads, site, shape)
        positions = check_positions(self.positions)
        vec = torch.as_tensor(self.vector)
        if not torch.is_floating_point(vec):
            vec = vec.float()
        if not torch.isfinite(vec).all():
            raise SiteError(f"vector for site {site} contains NaN or inf")
        feat = (len(heads),) + shape[1:] if heads is not None else shape
        vec = fit_vector(vec, feat, shape, site, heads)
        per_row = vec.dim() == len(feat) + 1
        cache: dict = {}
        include_padding = self.include_padding

        def fn(x, step):
            v = cache.get((x.dtype, x.device))
            if v is None:
                v = cache[(x.dtype, x.device)] = vec.to(device=x.device, dtype=x.dtype)
            if per_row:
                if v.shape[0] != x.shape[0]:
                    raise SiteError(
                        f"per-row vector for site {site} has {v.shape[0]} rows but the batch has {x.shape[0]}"
                    )
                v = v[:, None]
            part, put = _feature(x, heads)
            mask = position_mask(positions, step, x.shape[0], x.device)
            if not include_padding:
                mask = _combine(mask, step.token_mask)
            return put(_masked(part, part + v, mask))

        if heads is None and positions is None and not per_row:
            flat_vec = vec.reshape(-1)

            def flat(t, step):
                # the common steering case, on the module's own [batch, seq, features] output:
                # no reshapes, one add (the generation hot path)
                if step.token_mask is not None and not include_padding:
                    return None
                v = cache.get(("flat", t.dtype, t.device))
                if v is None:
                    v = cache[("flat", t.dtype, t.device)] = flat_vec.to(device=t.device, dtype=t.dtype)
                return t + v

            fn.flat = flat
        return fn


def fit_vector(
    vec: torch.Tensor, feat: tuple[int, ...], shape: tuple[int, ...], site: Site, heads
) -> torch.Tensor:
    """Bring a vector to ``feat`` (or ``[rows, *feat]``): accepts flattened heads and one-head vectors."""
    if tuple(vec.shape) == feat or (vec.dim() == len(feat) + 1 and tuple(vec.shape[1:]) == feat):
        return vec
    if len(feat) == 2:
        n, d = feat
        if tuple(vec.shape) == (n * d,):
            return vec.reshape(n, d)
        if tuple(vec.shape) == (d,):
            return vec.expand(n, d)
        if vec.dim() == 2 and vec.shape[1] == n * d:
            return vec.reshape(vec.shape[0], n, d)
        if heads is not None and tuple(vec.shape[-2:]) == tuple(shape):
            return vec[..., heads, :]
    raise SiteError(
        f"vector of shape {tuple(vec.shape)} does not fit site {site} of shape {tuple(shape)} per token"
    )


def add(vector, heads=None, positions: PositionSpec = None, include_padding: bool = False) -> Add:
    """Add ``vector`` to a site: shape ``[heads, head_dim]`` / ``[d]`` per token, or with a leading
    batch dimension for one vector per batch row. Padding tokens are skipped by default."""
    return Add(vector, heads, positions, include_padding)


@dataclass
class Replace(_Positioned, Operation):
    tensor: torch.Tensor
    positions: PositionSpec = None
    heads: object = None

    def bind(self, site, shape):
        heads = _check_heads(self.heads, site, shape)
        positions = check_positions(self.positions)
        src = self.tensor
        if src.dim() == len(shape) + 1:
            src = src[None]
        if src.dim() != len(shape) + 2 or tuple(src.shape[2:]) != tuple(shape):
            raise SiteError(
                f"replacement for site {site} has shape {tuple(self.tensor.shape)}; expected [batch, seq, {', '.join(map(str, shape))}]"
            )

        def fn(x, step):
            end = step.offset + step.seq_len
            if src.shape[1] < end:
                if positions is None:
                    raise SiteError(
                        f"replacement for site {site} covers {src.shape[1]} positions, the input has {end}"
                    )
                s = torch.cat([src, src.new_zeros((src.shape[0], end - src.shape[1]) + src.shape[2:])], 1)
            else:
                s = src
            s = s[:, step.offset : end].to(device=x.device, dtype=x.dtype)
            part, put = _feature(x, heads)
            if heads is not None:
                s = s[:, :, heads]
            mask = position_mask(positions, step, x.shape[0], x.device)
            return put(_masked(part, s.expand_as(part), mask))

        return fn


def replace(tensor: torch.Tensor, positions: PositionSpec = None, heads=None) -> Replace:
    """Replace a site with a donor capture ``[batch or 1, seq, ...]`` at ``positions`` (all if None)."""
    return Replace(tensor, positions, heads)


@dataclass
class Scale(_Positioned, Operation):
    factor: float
    heads: object = None
    positions: PositionSpec = None

    def bind(self, site, shape):
        heads = _check_heads(self.heads, site, shape)
        positions = check_positions(self.positions)
        factor = self.factor
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            raise SiteError(f"scale factor must be a number, got {factor!r}")

        def fn(x, step):
            part, put = _feature(x, heads)
            mask = position_mask(positions, step, x.shape[0], x.device)
            return put(_masked(part, part * factor, mask))

        return fn


def scale(factor: float, heads=None, positions: PositionSpec = None) -> Scale:
    """Multiply a site (or some of its heads) by ``factor``."""
    return Scale(factor, heads, positions)


@dataclass
class Apply(Operation):
    fn: Callable[[torch.Tensor, Step], torch.Tensor | None]

    def bind(self, site, shape):
        return self.fn


def apply(fn: Callable[[torch.Tensor, Step], torch.Tensor | None]) -> Apply:
    """A custom operation ``fn(x, step) -> new x or None``."""
    return Apply(fn)


class _Capture(Operation):
    def __init__(self, store: dict, stop_token=None, detach: bool = True):
        self.store, self.stop_token, self.detach = store, stop_token, detach

    def bind(self, site, shape):
        store, detach = self.store, self.detach

        def fn(x, step):
            t = x.detach() if detach else x
            prev = store.get(site)
            # a call at offset 0 starts a new sequence; cached decoding steps extend it
            store[site] = t if step.offset == 0 or prev is None else torch.cat([prev, t], dim=1)
            return None

        return fn


class _StopForward(Exception):
    def __init__(self, token):
        super().__init__("forward stopped after the deepest captured site")
        self.token = token


# --------------------------------------------------------------------------------------------
# sites -> modules and hooks
# --------------------------------------------------------------------------------------------
def site_shape(arch: ModelArch, name: str) -> tuple[int, ...]:
    return arch.site_shape(name)


def _site_module(arch: ModelArch, site: Site) -> tuple[str, nn.Module]:
    """(hook kind, module) for a site: 'out' forward hook or 'in' forward pre-hook."""
    if site.name in ("q", "k", "v"):
        return "out", arch.projection(site.layer, site.name)
    if site.name == "z":
        return "in", arch.projection(site.layer, "o")
    if site.name == "attn":
        return "out", arch.attention(site.layer)
    if site.name == "mlp":
        return "out", arch.mlp(site.layer)
    return "out", arch.layer(site.layer)


def _make_hook(arch: ModelArch, kind: str, entries: list[tuple[Site, Callable]], tracker: _Tracker, stop):
    """One hook for all operations on one module; ``entries`` are in execution order."""
    shapes = {site: site_shape(arch, site.name) for site, _ in entries}
    rows = {site: arch.rows(site.name) for site, _ in entries if site.name in ("q", "k", "v")}
    rows = {s: r for s, r in rows.items() if r is not None}
    row_cache: dict = {}
    # one fast path per operation (not per site): several operations on one site each keep
    # their own, and run in list order
    ops = [(site, fn, None if site in rows else getattr(fn, "flat", None)) for site, fn in entries]

    def transform(t: torch.Tensor, module_input=None) -> torch.Tensor:
        step = tracker.step
        step.module_input = module_input if isinstance(module_input, torch.Tensor) else None
        for site, fn, flat in ops:
            if flat is not None:
                new = flat(t, step)
                if new is not None:
                    t = new
                    continue
            shape = shapes[site]
            r = rows.get(site)
            if r is not None:
                key = (site, t.device)
                if key not in row_cache:
                    row_cache[key] = r.to(t.device)
                r = row_cache[key]
                x = t.index_select(-1, r).unflatten(-1, shape)
            elif len(shape) == 2:
                x = t.unflatten(-1, shape)
            else:
                x = t
            new = fn(x, step)
            if new is not None:
                new = new.flatten(-2) if len(shape) == 2 else new
                t = t.index_copy(-1, r, new) if r is not None else new
        step.module_input = None  # hold no reference past the hook
        if stop is not None:
            raise _StopForward(stop)
        return t

    if kind == "in":

        def pre_hook(module, args, kwargs):
            if args:
                return (transform(args[0]),) + tuple(args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: transform(kwargs[key])}

        return pre_hook

    def hook(module, args, output):
        inp = args[0] if args else None
        if isinstance(output, tuple):
            return (transform(output[0], inp),) + tuple(output[1:])
        return transform(output, inp)

    return hook


def _token_major(hook, tracker: _Tracker):
    """Some layers (OPT) run their MLP on ``[batch * seq, d]``: show the site as ``[batch, seq, d]``."""

    def wrapped(module, args, output):
        t = output[0] if isinstance(output, tuple) else output
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or tracker.step.seq_len == 0:
            return hook(module, args, output)
        new = hook(module, args, t.unflatten(0, (-1, tracker.step.seq_len)))
        new = t if new is None else new.flatten(0, 1)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    return wrapped


def _drop_unit_axis(hook):
    """Latent attention (DeepSeek) runs kv_b_proj on ``[batch, 1, seq, rank]``: show ``[batch, seq, ...]``."""

    def wrapped(module, args, output):
        if not isinstance(output, torch.Tensor) or output.dim() != 4 or output.shape[1] != 1:
            return hook(module, args, output)
        new = hook(module, args, output.squeeze(1))
        return None if new is None else new.unsqueeze(1)

    return wrapped


def _list_output(hook):
    """Some blocks (OpenAI GPT) return a list, not a tuple: treat it as one."""

    def wrapped(module, args, output):
        if not isinstance(output, list):
            return hook(module, args, output)
        new = hook(module, args, tuple(output))
        return None if new is None else list(new) if isinstance(new, tuple) else [new, *output[1:]]

    return wrapped


def _decoder_stack(arch: ModelArch) -> nn.Module:
    path = arch._layers_path.rpartition(".")[0]
    return arch.model.get_submodule(path) if path else arch.model


@contextmanager
def _hooked(model: nn.Module, ops: Mapping, stop_token=None):
    arch = get_arch(model)
    bound: dict[tuple[str, nn.Module], list[tuple[Site, Callable]]] = {}
    sites = []
    for key, op_or_ops in ops.items():
        site = as_site(key, arch.n_layers)
        shape = site_shape(arch, site.name)
        op_list = op_or_ops if isinstance(op_or_ops, list | tuple) else [op_or_ops]
        for op in op_list:
            if not isinstance(op, Operation):
                raise SiteError(
                    f"operation for site {site} must be vsteer.add/replace/scale/apply, got {op!r}"
                )
            kind, module = _site_module(arch, site)
            bound.setdefault((kind, module), []).append((site, op.bind(site, shape)))
            sites.append(site)
    last = max(sites, key=exec_key) if (sites and stop_token is not None) else None
    tracker = _Tracker()
    handles = []
    try:
        handles.append(_decoder_stack(arch).register_forward_pre_hook(tracker, with_kwargs=True))
        # fused q/k/v of one module: apply in q, k, v order
        for (kind, module), entries in bound.items():
            entries = sorted(entries, key=lambda e: exec_key(e[0]))
            is_last = last is not None and any(s == last for s, _ in entries)
            hook = _make_hook(arch, kind, entries, tracker, stop_token if is_last else None)
            if kind == "out" and any(s.name == "mlp" for s, _ in entries):
                hook = _token_major(hook, tracker)
            if kind == "out" and arch.spec.q and arch.spec.qkv:
                hook = _drop_unit_axis(hook)
            if kind == "out" and any(s.name in ("resid", "attn") for s, _ in entries):
                hook = _list_output(hook)
            if kind == "in":
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook))
        yield arch
    except _StopForward as stop:
        if stop.token is not stop_token or stop_token is None:
            raise
    finally:
        for h in handles:
            h.remove()


@contextmanager
def intervene(model: nn.Module, ops: Mapping):
    """Apply operations at sites for the duration of the context.

    ``ops`` maps a site (``("v", 3)`` or ``"v.3"``) to an operation or a list of operations::

        with vsteer.intervene(model, {("v", 3): vsteer.add(vec), ("k", 5): vsteer.scale(0.0)}):
            model.generate(...)
    """
    with _hooked(model, ops):
        yield


class Activations(dict):
    """Captured tensors keyed by :class:`~vsteer.sites.Site` (``acts[("v", 3)]`` works too)."""

    def __getitem__(self, key):
        return super().__getitem__(Site(*key) if isinstance(key, tuple) else key)


_stop_counter = itertools.count()


@contextmanager
def capture(model: nn.Module, sites: Iterable, stop: bool = False, detach: bool = True):
    """Capture site tensors during the forward passes run inside the context.

    After the forward, ``acts[(name, layer)]`` is ``[batch, seq, heads, head_dim]`` for q/k/v/z
    and ``[batch, seq, d_model]`` otherwise. KV-cached decoding steps are appended along
    ``seq``; a new call at offset 0 starts over. With ``stop=True`` the forward pass ends right
    after the deepest site is captured (the rest of the model is not run; the context swallows
    that early exit, so code after the forward inside the ``with`` block does not run).
    """
    acts = Activations()
    token = object() if stop else None
    op = _Capture(acts, token, detach)
    site_list = list(sites)
    if not site_list:
        raise SiteError("capture needs at least one site")
    arch = get_arch(model)
    normalized = {as_site(s, arch.n_layers): op for s in site_list}
    with _hooked(model, normalized, stop_token=token):
        yield acts


def captured_forward(model: nn.Module, sites: Iterable, stop: bool = True, **inputs) -> Activations:
    """Run one forward pass and return the captured sites (stopping early by default)."""
    with torch.no_grad(), capture(model, sites, stop=stop) as acts:
        unwrap(model)(**inputs)
    return acts


def hook_count(model: nn.Module) -> int:
    """Number of forward hooks and pre-hooks on all modules (for tests: contexts leave none)."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return n
