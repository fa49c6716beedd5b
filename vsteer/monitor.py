"""Monitors: a linear probe on one site's activations that flags a request or a generation.

A :class:`Monitor` is data, like a :class:`~vsteer.vectors.SteeringVector`: per layer a weight
tensor with the per-token shape of its site, one bias, a threshold, and where it came from. Its
score for a text is a logit, ``sum_l <w_l, x_l> + bias`` with ``x_l`` the site's activation at
layer ``l`` read by the position rule; the text is *flagged* when the score exceeds the threshold.

``position`` rules (as in :mod:`vsteer.extraction`):

``"last"``        the last token (left padding puts it at the last index of every row)
``"mean"``        mean over the real tokens
``"completion"``  mean over the completion tokens of ``(prompt, completion)`` items (a final
                  ``assistant`` chat message, or :class:`~vsteer.extraction.Example`); under
                  :func:`watch` these are the generated tokens

::

    mon = vsteer.monitor.fit(model, tok, harmful, harmless, site="v", layers=[10], fpr=0.01)
    mon.save("harm.v10.safetensors")
    scores = mon.score(model, tok, prompts)                # [batch] logits
    with vsteer.watch(model, mon) as flags:
        model.generate(**batch, max_new_tokens=20)
    flags.scores                                           # [batch, 1 + generated steps]
    with vsteer.steer(model, refusal, scale=4.0, when=mon):   # only rows whose prompt fires
        model.generate(**batch, max_new_tokens=20)

Fitting: items are split into a training and a calibration part (by item, with ``seed``) before
anything is fitted; a standardised L2 logistic regression is fitted on the training part (the
standardisation is folded into the weights), and the threshold is the smallest score that at most
``fpr`` of the calibration negatives exceed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vsteer.encoding import to_numpy
from vsteer.errors import VsteerError
from vsteer.evaluate import wilson_interval
from vsteer.files import load_layer_tensors, save_layer_tensors
from vsteer.hooks import Operation
from vsteer.sites import SITE_NAMES

FORMAT = "vsteer.monitor/1"
POSITIONS = ("last", "mean", "completion")


class MonitorError(VsteerError):
    """Monitor from another model or site, NaN threshold, empty or too small data."""


def _finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise MonitorError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise MonitorError(f"{what} must be a finite number, got {value!r}")
    return value


@dataclass
class Monitor:
    """A linear probe at one site. ``weights[layer]``: the site's per-token shape
    (``[n_kv_heads, head_dim]`` for v/k, ``[n_heads, head_dim]`` for q/z, ``[d_model]`` otherwise).

    ``threshold``: a row is flagged when its score (a logit) exceeds it. ``fpr``: the false-positive
    rate it was calibrated to (``None``: set by hand). ``data``: ``[{"role", "n", "sha256"}]`` of the
    training and calibration items, plus any source files.
    """

    weights: dict[int, torch.Tensor]
    bias: float
    threshold: float
    site: str = "v"
    position: str = "last"
    fpr: float | None = None
    model_name: str | None = None
    fingerprint: str | None = None
    n_layers: int | None = None
    data: list[dict] = field(default_factory=list)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    version: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.site not in SITE_NAMES:
            raise MonitorError(f"unknown site {self.site!r}; expected one of {', '.join(SITE_NAMES)}")
        if self.position not in POSITIONS:
            raise MonitorError(
                f"unknown position rule {self.position!r}; expected one of {', '.join(POSITIONS)}"
            )
        self.bias = _finite(self.bias, "monitor bias")
        self.threshold = _finite(self.threshold, "monitor threshold")
        if not isinstance(self.weights, dict) or not self.weights:
            raise MonitorError("a monitor needs at least one layer: weights={layer: tensor}")
        clean, shape = {}, None
        for layer, t in sorted(self.weights.items()):
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise MonitorError(f"layer keys must be non-negative ints, got {layer!r}")
            t = torch.as_tensor(t).float()
            if not torch.isfinite(t).all():
                raise MonitorError(f"monitor weights at {self.site}.{layer} contain NaN or inf")
            if shape is not None and tuple(t.shape) != shape:
                raise MonitorError(f"layer {layer} has shape {tuple(t.shape)}, other layers {shape}")
            shape = tuple(t.shape)
            clean[layer] = t
        self.weights = clean
        if not self.version:
            from vsteer import __version__

            self.version = __version__

    @property
    def layers(self) -> list[int]:
        return list(self.weights)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(next(iter(self.weights.values())).shape)

    @property
    def sites(self) -> list[tuple[str, int]]:
        return [(self.site, layer) for layer in self.layers]

    def __repr__(self) -> str:
        return (
            f"Monitor(site={self.site!r}, layers={self.layers}, position={self.position!r}, "
            f"threshold={self.threshold:.4g}, fpr={self.fpr}, model={self.model_name!r})"
        )

    # --- checking -----------------------------------------------------------------------------
    def check(self, model, site: str | None = None) -> Monitor:
        """Raise :class:`MonitorError` (one line) unless this monitor fits ``model`` (and reads
        ``site``, when given); return self."""
        from vsteer.arch import get_arch
        from vsteer.hooks import site_shape
        from vsteer.models import config_fingerprint

        if site is not None and site != self.site:
            raise MonitorError(f"monitor reads site {self.site!r}; expected a monitor at site {site!r}")
        arch = get_arch(model)
        if self.fingerprint is not None:
            theirs = config_fingerprint(model.config)
            if theirs != self.fingerprint:
                raise MonitorError(
                    f"monitor was fitted on model {self.model_name!r} (config fingerprint {self.fingerprint}); "
                    f"this model has fingerprint {theirs}"
                )
        bad = [layer for layer in self.layers if layer >= arch.n_layers]
        if bad:
            raise MonitorError(f"monitor has layers {bad} but the model has {arch.n_layers} layers")
        expected = site_shape(arch, self.site)
        if self.shape != tuple(expected):
            raise MonitorError(
                f"monitor at site {self.site!r} has weights of shape {self.shape} per layer; this model's "
                f"{self.site!r} site has shape {tuple(expected)}"
            )
        return self

    # --- scoring ------------------------------------------------------------------------------
    def score_features(self, feats: torch.Tensor) -> torch.Tensor:
        """``[n, n_layers, *shape]`` features (from :func:`features`) -> ``[n]`` scores (float64)."""
        w = torch.stack([self.weights[layer] for layer in self.layers]).double()
        return (feats.double().flatten(1) @ w.flatten()) + self.bias

    def score(self, model, tokenizer, items: Sequence, batch_size: int = 16, max_length: int | None = None):
        """``[len(items)]`` scores (NumPy float64) of texts, chat messages or ``(prompt, completion)``
        items, in left-padded batches; each row's score does not depend on its batch."""
        self.check(model)
        feats = features(
            model, tokenizer, items, self.site, self.layers, self.position, batch_size, max_length
        )
        return to_numpy(self.score_features(feats))

    def flag(self, model, tokenizer, items: Sequence, **kw) -> np.ndarray:
        """``[len(items)]`` bool: score above the threshold."""
        return self.score(model, tokenizer, items, **kw) > self.threshold

    # --- files --------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "site": self.site,
            "layers": self.layers,
            "shape": list(self.shape),
            "position": self.position,
            "bias": self.bias,
            "threshold": self.threshold,
            "fpr": self.fpr,
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "n_layers": self.n_layers,
            "data": self.data,
            "created": self.created,
            "version": self.version,
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (safetensors, tensors ``layer.N``, JSON metadata under ``vsteer``), atomically."""
        return save_layer_tensors(path, self.weights, self.metadata())

    save_pretrained = save

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, site: str | None = None) -> Monitor:
        """Read a monitor written by :meth:`save`; with ``model`` (and ``site``), check that it fits."""
        weights, meta = load_layer_tensors(path, "monitor", FORMAT, MonitorError)
        threshold = meta.get("threshold")
        mon = cls(
            weights=weights,
            bias=meta.get("bias"),
            threshold=float("nan") if threshold is None else threshold,
            site=meta.get("site"),
            position=meta.get("position", "last"),
            fpr=meta.get("fpr"),
            model_name=meta.get("model_name"),
            fingerprint=meta.get("fingerprint"),
            n_layers=meta.get("n_layers"),
            data=list(meta.get("data") or []),
            created=meta.get("created", ""),
            version=meta.get("version", ""),
            extra=dict(meta.get("extra") or {}),
        )
        if model is not None or site is not None:
            if model is None:
                if site != mon.site:
                    raise MonitorError(
                        f"monitor reads site {mon.site!r}; expected a monitor at site {site!r}"
                    )
            else:
                mon.check(model, site)
        return mon

    from_pretrained = load


# ----------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------
def _encode(tokenizer, item) -> tuple[list[int], int]:
    """``(token ids, number of prompt tokens)`` of a text, token ids, chat messages, an
    :class:`~vsteer.extraction.Example` or a ``(prompt, completion)`` tuple of strings."""
    from vsteer.encoding import token_ids
    from vsteer.extraction import Example, encode

    if isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
        item = Example(*item)
    if isinstance(item, torch.Tensor) or (
        isinstance(item, list | tuple) and item and all(isinstance(t, int | np.integer) for t in item)
    ):
        ids = token_ids(tokenizer, item)
        return ids, len(ids)
    return encode(tokenizer, item)


def _weights(position: str, length: int, n_prompt: int) -> torch.Tensor:
    w = torch.zeros(length)
    if position == "last":
        w[-1] = 1.0
    elif position == "mean":
        w[:] = 1.0 / length
    else:
        if length == n_prompt:
            raise MonitorError(
                "position 'completion' needs (prompt, completion) items (a final assistant message or an "
                "Example); use 'last' or 'mean' for plain texts"
            )
        w[n_prompt:] = 1.0 / (length - n_prompt)
    return w


@torch.no_grad()
def features(
    model,
    tokenizer,
    items: Sequence,
    site: str | Sequence[str],
    layers: Sequence[int],
    position: str = "last",
    batch_size: int = 16,
    max_length: int | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """``[len(items), len(layers), *site_shape]`` float32 activations read by ``position``
    (``{site: ...}`` when ``site`` is a list: all sites captured in the same passes).

    Batches are left-padded by :func:`vsteer.encoding.pad_batch` (with position ids), sorted by
    length; each forward stops after the deepest layer. ``max_length`` keeps the last tokens.
    """
    from vsteer.encoding import pad_token_id

    if position not in POSITIONS:
        raise MonitorError(f"unknown position rule {position!r}; expected one of {', '.join(POSITIONS)}")
    items = list(items)
    if not items:
        raise MonitorError("no items to score")
    encoded = [_encode(tokenizer, item) for item in items]
    return encoded_features(
        model, encoded, site, layers, position, batch_size, max_length, pad_token_id(tokenizer)
    )


@torch.no_grad()
def encoded_features(
    model,
    encoded: Sequence[tuple[list[int], int]],
    site: str | Sequence[str],
    layers: Sequence[int],
    position: str = "last",
    batch_size: int = 16,
    max_length: int | None = None,
    pad_id: int = 0,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """:func:`features` of already tokenised items: ``encoded[i] = (token ids, n_prompt)``; with
    ``position="completion"`` the tokens after the first ``n_prompt`` are averaged."""
    from vsteer.encoding import pad_batch
    from vsteer.hooks import captured_forward
    from vsteer.models import model_device

    if not encoded:
        raise MonitorError("no items to score")
    clipped = []
    for ids, n_prompt in encoded:
        if max_length is not None and len(ids) > max_length:  # keep the end: what the position reads
            cut = len(ids) - max_length
            ids, n_prompt = ids[cut:], max(0, n_prompt - cut)
        clipped.append((list(ids), n_prompt))
    encoded = clipped
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    pad, device = pad_id, model_device(model)
    names = [site] if isinstance(site, str) else list(site)
    sites = [(name, layer) for name in names for layer in layers]
    out: dict = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = pad_batch([encoded[i][0] for i in chunk], pad, "left", device=device)
            width = batch["input_ids"].shape[1]
            w = torch.zeros(len(chunk), width)
            for row, i in enumerate(chunk):
                ids, n_prompt = encoded[i]
                w[row, width - len(ids) :] = _weights(position, len(ids), n_prompt)
            acts = captured_forward(model, sites, stop=True, use_cache=False, **batch)
            for name in names:
                stacked = torch.stack(
                    [acts[(name, layer)].float() for layer in layers], dim=2
                )  # [b, seq, L, *shape]
                ww = w.to(stacked.device).reshape(w.shape + (1,) * (stacked.dim() - 2))
                feats = (stacked * ww).sum(1).cpu()
                if name not in out:
                    out[name] = torch.empty((len(encoded),) + tuple(feats.shape[1:]))
                out[name][torch.tensor(chunk)] = feats
    finally:
        model.train(was_training)
    return out[site] if isinstance(site, str) else out


# ----------------------------------------------------------------------------------------------
# fitting
# ----------------------------------------------------------------------------------------------
def items_sha256(items: Sequence) -> str:
    """SHA-256 of a list of items (texts, messages, examples) as canonical JSON."""
    from dataclasses import asdict, is_dataclass

    def plain(x):
        return asdict(x) if is_dataclass(x) else x

    return hashlib.sha256(json.dumps([plain(i) for i in items], sort_keys=True).encode()).hexdigest()


def calibrated_threshold(negative_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold that at most ``floor(fpr * n)`` of ``n`` negative scores exceed."""
    s = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    need = math.ceil(1.0 / fpr - 1e-9)
    if len(s) < need:
        raise MonitorError(
            f"calibration split has {len(s)} negatives; a false-positive rate of {fpr:g} needs at least "
            f"{need} (give more negatives, a larger calibration fraction, or a larger fpr)"
        )
    return float(s[int(math.floor(fpr * len(s) + 1e-9))])


def split_items(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, calibration)`` of ``n`` items, ``round(fraction * n)`` in calibration."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(fraction * n))
    return np.sort(perm[k:]), np.sort(perm[:k])


def fit_linear(x: np.ndarray, y: np.ndarray, C: float = 0.1, seed: int = 0) -> tuple[np.ndarray, float]:
    """Standardised L2 logistic regression on ``x`` ``[n, d]``; returns ``(w [d], b)`` with the
    standardisation folded in, so that the logit is ``x @ w + b``."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float64)
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    lr = LogisticRegression(C=C, max_iter=1000, random_state=seed).fit((x - mu) / sd, y)
    w = lr.coef_[0] / sd
    return w, float(lr.intercept_[0] - w @ mu)


def fit(
    model,
    tokenizer,
    positive: Sequence,
    negative: Sequence,
    site: str = "v",
    layers=None,
    position: str = "last",
    fpr: float | None = 0.01,
    calibration: float = 0.25,
    C: float = 0.1,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int | None = None,
    sources: list[dict] | None = None,
) -> Monitor:
    """Fit a :class:`Monitor` separating ``positive`` items (flagged) from ``negative`` ones.

    ``layers``: an int, a list, or text like ``"8,12"`` (one probe on the concatenated layers);
    ``None``: the middle layer. ``fpr``: the false-positive rate the threshold is calibrated to on
    ``calibration`` (a fraction) of the items, split off by item before fitting; ``fpr=None`` fits
    on everything and sets the threshold to 0 (probability 1/2). ``sources``: ``[{"path", "sha256"}]``
    of the files the items came from, kept in the metadata.
    """
    from vsteer.arch import get_arch
    from vsteer.models import config_fingerprint, resolve_model_name
    from vsteer.sites import check_site_name, parse_layers

    positive, negative = list(positive), list(negative)
    if not positive:
        raise MonitorError("fit needs positive items (those to flag); got none")
    if not negative:
        raise MonitorError("fit needs negative items (those to pass); got none")
    check_site_name(site)
    if position not in POSITIONS:
        raise MonitorError(f"unknown position rule {position!r}; expected one of {', '.join(POSITIONS)}")
    arch = get_arch(model)
    layer_list = [arch.n_layers // 2] if layers is None else parse_layers(layers, arch.n_layers)
    if fpr is not None:
        fpr = _finite(fpr, "fpr")
        if not 0 < fpr < 1:
            raise MonitorError(f"fpr must lie in (0, 1), got {fpr}")
        if not 0 < calibration < 1:
            raise MonitorError(f"calibration must be a fraction in (0, 1), got {calibration}")
        pos_tr, pos_cal = split_items(len(positive), calibration, seed)
        neg_tr, neg_cal = split_items(len(negative), calibration, seed + 1)
        need = math.ceil(1.0 / fpr - 1e-9)
        if len(neg_cal) < need:  # refuse before the expensive forward passes
            calibrated_threshold(np.zeros(len(neg_cal)), fpr)
    else:
        pos_tr, pos_cal = np.arange(len(positive)), np.arange(0)
        neg_tr, neg_cal = np.arange(len(negative)), np.arange(0)
    if len(pos_tr) < 1 or len(neg_tr) < 1:
        raise MonitorError(
            f"training split has {len(pos_tr)} positives and {len(neg_tr)} negatives; need at least one of each"
        )
    items = positive + negative
    feats = features(model, tokenizer, items, site, layer_list, position, batch_size, max_length)
    fp, fn = feats[: len(positive)], feats[len(positive) :]
    x = to_numpy(torch.cat([fp[pos_tr], fn[neg_tr]]).flatten(1))
    y = np.r_[np.ones(len(pos_tr)), np.zeros(len(neg_tr))]
    w, b = fit_linear(x, y, C=C, seed=seed)
    shape = tuple(feats.shape[2:])
    weights = {
        layer: torch.from_numpy(part.reshape(shape)).float()
        for layer, part in zip(layer_list, np.split(w, len(layer_list)), strict=True)
    }
    data = [
        {"role": "positive", "n": len(positive), "sha256": items_sha256(positive)},
        {"role": "negative", "n": len(negative), "sha256": items_sha256(negative)},
        *(sources or []),
    ]
    mon = Monitor(
        weights=weights,
        bias=b,
        threshold=0.0,
        site=site,
        position=position,
        fpr=fpr,
        model_name=resolve_model_name(model),
        fingerprint=config_fingerprint(model.config),
        n_layers=arch.n_layers,
        data=data,
        extra={
            "C": C,
            "seed": seed,
            "calibration": calibration if fpr is not None else 0.0,
            "n_train": [len(pos_tr), len(neg_tr)],
            "n_calibration": [len(pos_cal), len(neg_cal)],
        },
    )
    if fpr is not None:
        neg_scores = to_numpy(mon.score_features(fn[neg_cal]))
        mon.threshold = calibrated_threshold(neg_scores, fpr)
        if len(pos_cal):
            mon.extra["calibration_tpr"] = float(
                (to_numpy(mon.score_features(fp[pos_cal])) > mon.threshold).mean()
            )
        false_pos = int((neg_scores > mon.threshold).sum())
        mon.extra["calibration_fpr"] = false_pos / len(neg_scores)
        # what the calibration split can vouch for: the Wilson 95% upper bound of the false-positive
        # rate (1 of 10 negatives above the threshold: up to 0.40; a held-out rate near the target
        # needs hundreds of calibration negatives)
        mon.extra["calibration_fpr_upper"] = wilson_interval(false_pos, len(neg_scores))[1]
    return mon


load = Monitor.load


# ----------------------------------------------------------------------------------------------
# scoring during generate
# ----------------------------------------------------------------------------------------------
class Flags:
    """What :func:`watch` saw: one score per row per forward call.

    ``steps[0]`` is the prompt (``[batch]``), ``steps[t]`` the ``t``-th generated token. A new
    call at offset 0 (a new ``generate``) starts over. A row that has ended (its end-of-sequence
    token, from the model's ``generation_config``, was fed back while other rows of the batch go
    on) scores NaN from that step on, so it gets the scores and flags it would get alone.
    """

    def __init__(self, monitor: Monitor):
        self.monitor = monitor
        self.steps: list[torch.Tensor] = []

    @property
    def scores(self) -> torch.Tensor:
        """``[batch, n_steps]`` float32 scores (NaN where a ``completion`` monitor has no tokens yet)."""
        if not self.steps:
            return torch.empty(0, 0)
        return torch.stack(self.steps, dim=1)

    @property
    def flags(self) -> torch.Tensor:
        """``[batch, n_steps]`` bool: score above the threshold."""
        return self.scores > self.monitor.threshold

    @property
    def prompt(self) -> torch.Tensor | None:
        """``[batch]`` bool: the prompt alone fires (None before the first forward)."""
        return self.flags[:, 0] if self.steps else None

    @property
    def fired(self) -> torch.Tensor:
        """``[batch]`` bool: any step fired."""
        return self.flags.any(dim=1)

    def __repr__(self) -> str:
        return f"Flags(steps={len(self.steps)}, fired={self.fired.tolist() if self.steps else []})"


class _WatchState:
    """Per-layer partial scores of the current forward call, summed when the last layer reports."""

    def __init__(self, monitor: Monitor, flags: Flags, on_prompt=None, on_step=None, eos=None):
        self.monitor, self.flags, self.on_prompt, self.on_step = monitor, flags, on_prompt, on_step
        self.eos = None if eos is None else torch.as_tensor(eos, dtype=torch.long).reshape(-1)
        self.ended: torch.Tensor | None = None  # [batch] bool: rows past their end-of-sequence token
        self.parts: dict[int, torch.Tensor] = {}
        self.sums: dict[int, torch.Tensor] = {}
        self.count: torch.Tensor | None = None
        self.step = None

    def op(self, layer: int):
        from vsteer.hooks import apply

        mon = self.monitor
        weight = mon.weights[layer].flatten()
        cache: dict = {}

        def fn(x, step):
            w = cache.get(x.device)
            if w is None:
                w = cache[x.device] = weight.to(x.device)
            partial = x.flatten(2).float() @ w  # [batch, seq]
            mask = step.token_mask
            real = torch.ones_like(partial) if mask is None else mask.to(partial.device).float()
            if mon.position == "last":
                if mask is None:
                    value = partial[:, -1]
                else:  # the last real token of each row (left padding: the last index)
                    idx = torch.arange(partial.shape[1], device=partial.device).expand_as(partial)
                    last = torch.where(mask.to(partial.device), idx, -1).max(dim=1).values.clamp(min=0)
                    value = partial.gather(1, last[:, None])[:, 0]
            else:
                if mon.position == "completion" and step.offset == 0:
                    real = torch.zeros_like(partial)  # the prompt has no completion tokens
                prev = self.sums.get(layer) if step.offset > 0 else None
                total = (partial * real).sum(1) + (0 if prev is None else prev)
                self.sums[layer] = total
                if layer == mon.layers[0]:
                    add = real.sum(1)
                    self.count = add if step.offset == 0 or self.count is None else self.count + add
                value = total  # divided by the token count when the step is complete
            self.parts[layer] = value
            if len(self.parts) == len(mon.layers):
                self._finish(step)
            return None

        return apply(fn)

    def _finish(self, step):
        mon = self.monitor
        score = torch.stack([self.parts[layer] for layer in mon.layers]).sum(0)
        if mon.position != "last":
            score = score / self.count  # NaN (0/0) while a completion monitor has seen no tokens
        score = (score + mon.bias).float().cpu()
        self.parts = {}
        if step.offset == 0:
            self.flags.steps = []
            self.ended = None
        elif self.eos is not None and step.input_ids is not None:
            fed = torch.isin(step.input_ids[:, -1].cpu(), self.eos)
            self.ended = fed if self.ended is None or self.ended.shape != fed.shape else self.ended | fed
            score = torch.where(self.ended, torch.nan, score)
        self.flags.steps.append(score)
        self.step = step  # the forward call the latest score belongs to
        if step.offset == 0 and self.on_prompt is not None:
            self.on_prompt(score > mon.threshold)
        elif step.offset > 0 and self.on_step is not None:
            self.on_step(len(self.flags.steps) - 1, score > mon.threshold)

    def ops(self) -> dict:
        return {(self.monitor.site, layer): self.op(layer) for layer in self.monitor.layers}


WatchState = _WatchState  # public for vsteer.serve, which runs one per forward of its batch


@contextmanager
def watch(model, monitor: Monitor):
    """Score every row at the prompt and at each decoding step of the forwards run inside::

        with vsteer.watch(model, mon) as flags:
            model.generate(**batch, max_new_tokens=20)
        flags.scores   # [batch, 1 + steps]; flags.fired: [batch] bool

    Works with left padding and the KV cache; each step costs one dot product per token and layer.
    """
    from vsteer.hooks import intervene

    if not isinstance(monitor, Monitor):
        raise MonitorError(f"watch needs a Monitor, got {type(monitor).__name__}")
    monitor.check(model)
    flags = Flags(monitor)
    state = _WatchState(monitor, flags, eos=_eos_ids(model))
    with intervene(model, state.ops()):
        yield flags


def _eos_ids(model) -> list[int] | None:
    """The end-of-sequence ids ``generate`` stops a row at, or None."""
    from vsteer.models import eos_ids

    return sorted(eos_ids(model)) or None


# ----------------------------------------------------------------------------------------------
# conditional steering (vsteer.steer(..., when=monitor))
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recheck:
    """``when=Recheck(monitor, every=k)``: decide at the prompt as ``when=monitor`` does, and again
    every ``k`` decoding steps; a row whose score exceeds the threshold at a check is steered from
    then on (a row once steered stays steered). Each check reads the row's own score at that step
    (``last``: the token just fed back; ``mean``/``completion``: the text so far), so the decision
    stays per row and independent of the batch."""

    monitor: Monitor
    every: int = 1

    def __post_init__(self):
        if not isinstance(self.monitor, Monitor):
            raise MonitorError(f"Recheck needs a Monitor, got {type(self.monitor).__name__}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise MonitorError(
                f"Recheck every must be a positive number of decoding steps, got {self.every!r}"
            )


def recheck(monitor: Monitor, every: int = 1) -> Recheck:
    """``vsteer.steer(model, vec, scale, when=vsteer.monitor.recheck(mon, every=4))``."""
    return Recheck(monitor, every)


class Gated(Operation):
    """A steering operation applied only to the rows whose prompt fired: a per-row select between
    the steered and the unsteered tensor, so a row that does not fire is bit-identical to no steering.

    ``gate["rows"]``: ``[batch]`` bool, set by the monitor at the prompt (absent: steer no row).
    """

    def __init__(self, op: Operation, gate: dict):
        self.op, self.gate = op, gate

    def bind(self, site, shape):
        inner, gate = self.op.bind(site, shape), self.gate

        def fn(x, step):
            rows = gate.get("rows")
            if step.offset == 0 and "step" in gate and gate["step"] is not step:
                # gated(): a prompt pass the monitor has not decided yet, the gate is a past call's
                # (vsteer.serve sets its gates anew for every forward and records no step)
                return None
            if rows is None or not bool(rows.any()):
                return None
            new = inner(x, step)
            if new is None:
                return None
            m = rows.to(x.device).reshape((-1,) + (1,) * (x.dim() - 1))
            return torch.where(m, new, x)

        return fn


@contextmanager
def gated(model, monitor: Monitor | Recheck, ops: dict, positions="all"):
    """Install steering ``ops`` (from :func:`vsteer.steering.steering_ops`) on the rows whose prompt
    the monitor flags; yields the :class:`Flags` of the monitor. With a :class:`Recheck`, rows whose
    score fires at every ``k``-th decoding step join them from that step on.

    The decision is read from the prompt, unsteered: a row steers from the first site after the
    monitor's deepest layer in the prompt pass, and at every generated token. Steering the prompt
    (``positions`` other than ``"generated"``) therefore needs every steered site to run after the
    monitor's sites; otherwise this raises.
    """
    from vsteer.hooks import intervene
    from vsteer.sites import as_site, exec_key

    every = None
    if isinstance(monitor, Recheck):
        monitor, every = monitor.monitor, monitor.every
    if not isinstance(monitor, Monitor):
        raise MonitorError(f"when= needs a Monitor or a Recheck, got {type(monitor).__name__}")
    monitor.check(model)
    if monitor.position == "completion" and every is None:
        raise MonitorError(
            "when= decides from the prompt; a 'completion' monitor has no prompt score "
            "(use when=vsteer.monitor.recheck(monitor, every=k) to decide during generation)"
        )
    last = max(exec_key(as_site(s)) for s in monitor.sites)
    if positions != "generated":
        early = [str(as_site(k)) for k in ops if exec_key(as_site(k)) <= last]
        if early:
            raise MonitorError(
                f"when= decides after {monitor.site}.{max(monitor.layers)}, so steering at {', '.join(early)} "
                "cannot reach the prompt; steer later layers or use positions='generated'"
            )
    gate: dict = {}
    flags = Flags(monitor)

    def on_step(step: int, fired: torch.Tensor) -> None:
        if step % every == 0:
            rows = gate.get("rows")
            gate["rows"] = fired if rows is None else rows | fired

    state = _WatchState(
        monitor,
        flags,
        on_prompt=lambda rows: gate.update(rows=rows, step=state.step),
        on_step=None if every is None else on_step,
        eos=_eos_ids(model),
    )

    # each prompt pass decides anew: a steered site that runs in it before the monitor has decided
    # (possible only with positions='generated', which masks the prompt) ignores a past call's
    # gate, whose rows may not even match this batch
    merged: dict = {}
    for key, op in state.ops().items():
        merged.setdefault(key, []).append(op)
    for key, op in ops.items():
        merged.setdefault(as_site(key), []).append(Gated(op, gate))
    with intervene(model, merged):
        yield flags
