"""Steering vectors as data: per layer one tensor at one site, plus where it came from.

A :class:`SteeringVector` holds ``directions[layer]`` with the per-token shape of its site:

========================== =====================================
site                       tensor per layer
========================== =====================================
``v``, ``k``               ``[n_kv_heads, head_dim]``
``q``, ``z``               ``[n_heads, head_dim]``
``attn``, ``resid``, ``mlp`` ``[d_model]``
========================== =====================================

Saved as safetensors (tensors ``layer.N``) with the metadata as JSON under the ``vsteer``
key; written atomically, never pickled. :meth:`SteeringVector.load` with a model checks the
metadata against it and refuses a vector made for another model, size or site.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from vsteer.errors import VectorError
from vsteer.files import load_layer_tensors, save_layer_tensors
from vsteer.sites import SITE_NAMES

FORMAT = "vsteer.steering_vector/1"


@dataclass
class SteeringVector:
    """Per-layer directions at one site, with their provenance.

    ``directions``: ``{layer: tensor}``, each the per-token shape of ``site`` (see module doc).
    ``model_name``/``fingerprint``: the model it was made for (``fingerprint`` is
    :func:`vsteer.models.config_fingerprint`; ``None`` for imported vectors of unknown origin).
    ``data``: ``[{"path": ..., "sha256": ...}]`` of the source files. ``position``: the token
    position rule used at extraction. ``extra``: anything else (e.g. counts of pairs).
    """

    directions: dict[int, torch.Tensor]
    site: str = "v"
    model_name: str | None = None
    fingerprint: str | None = None
    n_layers: int | None = None
    method: str = "unknown"
    position: str | None = None
    data: list[dict] = field(default_factory=list)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    version: str = field(default_factory=lambda: package_version())
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.site not in SITE_NAMES:
            raise VectorError(f"unknown site {self.site!r}; expected one of {', '.join(SITE_NAMES)}")
        if not isinstance(self.directions, dict) or not self.directions:
            raise VectorError("a steering vector needs at least one layer: directions={layer: tensor}")
        clean = {}
        shape = None
        for layer, t in sorted(self.directions.items()):
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise VectorError(f"layer keys must be non-negative ints, got {layer!r}")
            t = torch.as_tensor(t)
            if not torch.is_floating_point(t):
                t = t.float()
            if not torch.isfinite(t).all():
                raise VectorError(f"steering vector at {self.site}.{layer} contains NaN or inf")
            if shape is not None and tuple(t.shape) != shape:
                raise VectorError(
                    f"layer {layer} has shape {tuple(t.shape)}, other layers {shape}: one site has one shape"
                )
            shape = tuple(t.shape)
            clean[layer] = t
        self.directions = clean

    # --- basic facts --------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-token shape of the site (the same on every layer)."""
        return tuple(next(iter(self.directions.values())).shape)

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.directions[layer]

    def norms(self) -> dict[int, float]:
        return {layer: float(t.float().norm()) for layer, t in self.directions.items()}

    def __repr__(self) -> str:
        layers = _layer_text(self.layers)
        return (
            f"SteeringVector(site={self.site!r}, layers={layers}, shape={self.shape}, "
            f"method={self.method!r}, model={self.model_name!r})"
        )

    # --- arithmetic ---------------------------------------------------------------------------
    def _check_compatible(self, other: SteeringVector) -> None:
        if not isinstance(other, SteeringVector):
            raise VectorError(f"cannot combine a SteeringVector with {type(other).__name__}")
        if other.site != self.site:
            raise VectorError(f"cannot combine vectors at different sites: {self.site!r} and {other.site!r}")
        if other.shape != self.shape:
            raise VectorError(f"cannot combine vectors of shapes {self.shape} and {other.shape}")
        if self.fingerprint and other.fingerprint and self.fingerprint != other.fingerprint:
            raise VectorError(
                f"cannot combine vectors made for different models: {self.model_name!r} "
                f"(fingerprint {self.fingerprint}) and {other.model_name!r} (fingerprint {other.fingerprint})"
            )

    def _derived(self, directions: dict, method: str, other: SteeringVector | None = None) -> SteeringVector:
        return replace(
            self,
            directions=directions,
            method=method,
            fingerprint=self.fingerprint or (other.fingerprint if other else None),
            data=self.data + [d for d in (other.data if other else []) if d not in self.data],
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            extra=dict(self.extra),
        )

    def __add__(self, other: SteeringVector) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        self._check_compatible(other)
        out = {layer: t.clone() for layer, t in self.directions.items()}
        for layer, t in other.directions.items():
            # a layer that one vector lacks counts as zero there
            out[layer] = out[layer] + t.to(out[layer]) if layer in out else t.clone()
        return self._derived(out, f"({self.method}) + ({other.method})", other)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return self + (-1.0) * other

    def __mul__(self, factor) -> SteeringVector:
        factor = check_scale(factor)
        return self._derived(
            {layer: t * factor for layer, t in self.directions.items()}, f"{factor:g} * ({self.method})"
        )

    __rmul__ = __mul__

    def __truediv__(self, factor) -> SteeringVector:
        factor = check_scale(factor)
        if factor == 0:
            raise VectorError("cannot divide a steering vector by 0")
        return self * (1.0 / factor)

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def to(self, device=None, dtype=None) -> SteeringVector:
        """A copy with every tensor on ``device`` / in ``dtype``."""
        return replace(
            self,
            directions={
                layer: t.to(device=device, dtype=dtype, copy=True) for layer, t in self.directions.items()
            },
            data=list(self.data),
            extra=dict(self.extra),
        )

    def select_layers(self, layers) -> SteeringVector:
        """A copy restricted to ``layers`` (a list of ints or text like ``"8-16"``)."""
        from vsteer.sites import parse_layers

        n = self.n_layers or (max(self.layers) + 1)
        chosen = parse_layers(layers, n)
        missing = [layer for layer in chosen if layer not in self.directions]
        if missing:
            raise VectorError(f"vector has no layers {missing}; it has {_layer_text(self.layers)}")
        return replace(self, directions={layer: self.directions[layer].clone() for layer in chosen})

    # --- checking against a model -------------------------------------------------------------
    def check(self, model) -> SteeringVector:
        """Raise :class:`VectorError` (one line) unless this vector fits ``model``; return self."""
        from vsteer.arch import get_arch
        from vsteer.hooks import site_shape

        arch = get_arch(model)
        if self.fingerprint is not None:
            theirs = model_fingerprint(model)
            if theirs is not None and theirs != self.fingerprint:
                raise VectorError(
                    f"vector was made for model {self.model_name!r} (config fingerprint {self.fingerprint}); "
                    f"this model is {model_name_of(model)!r} (fingerprint {theirs})"
                )
        bad = [layer for layer in self.layers if layer >= arch.n_layers]
        if bad:
            raise VectorError(
                f"vector has layers {bad} but the model has {arch.n_layers} layers (0..{arch.n_layers - 1})"
            )
        expected = site_shape(arch, self.site)
        if self.shape != expected:
            raise VectorError(
                f"vector at site {self.site!r} has shape {self.shape} per layer; this model's {self.site!r} "
                f"site has shape {expected}"
            )
        return self

    # --- files --------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "site": self.site,
            "layers": self.layers,
            "shape": list(self.shape),
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "n_layers": self.n_layers,
            "method": self.method,
            "position": self.position,
            "data": self.data,
            "created": self.created,
            "version": self.version,
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (safetensors, float32 tensors ``layer.N``, JSON metadata), atomically."""
        return save_layer_tensors(path, self.directions, self.metadata())

    save_pretrained = save

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> SteeringVector:
        """Read a vector written by :meth:`save`; with ``model``, check that it fits (see :meth:`check`)."""
        directions, meta = load_layer_tensors(path, "steering vector", FORMAT, VectorError)
        vec = cls(
            directions=directions,
            site=meta.get("site", "v"),
            model_name=meta.get("model_name"),
            fingerprint=meta.get("fingerprint"),
            n_layers=meta.get("n_layers"),
            method=meta.get("method", "unknown"),
            position=meta.get("position"),
            data=list(meta.get("data") or []),
            created=meta.get("created", ""),
            version=meta.get("version", ""),
            extra=dict(meta.get("extra") or {}),
        )
        if model is not None:
            vec.check(model)
        return vec

    from_pretrained = load

    @classmethod
    def for_model(cls, model, directions: dict, site: str, **meta) -> SteeringVector:
        """A vector for ``model``, with its name, fingerprint and layer count filled in, checked."""
        from vsteer.arch import get_arch

        extra = dict(meta.pop("extra", None) or {})
        extra.setdefault("model_type", getattr(getattr(model, "config", None), "model_type", None))
        vec = cls(
            directions=directions,
            site=site,
            extra=extra,
            model_name=model_name_of(model),
            fingerprint=model_fingerprint(model),
            n_layers=get_arch(model).n_layers,
            **meta,
        )
        return vec.check(model)


def check_scale(value, what: str = "scale") -> float:
    """A finite real number, or :class:`VectorError` naming the value."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise VectorError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise VectorError(f"{what} must be a finite number, got {value!r}")
    return value


def package_version() -> str:
    try:
        from vsteer import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def model_fingerprint(model) -> str | None:
    try:
        from vsteer.models import config_fingerprint
    except ImportError:  # pragma: no cover - models.py is part of the package
        return None
    return config_fingerprint(model.config)


def model_name_of(model) -> str:
    try:
        from vsteer.models import resolve_model_name

        return resolve_model_name(model)
    except ImportError:  # pragma: no cover
        return getattr(model.config, "_name_or_path", "") or type(model).__name__


def _layer_text(layers: list[int]) -> str:
    if not layers:
        return "[]"
    runs, start, prev = [], layers[0], layers[0]
    for layer in layers[1:] + [None]:
        if layer is not None and layer == prev + 1:
            prev = layer
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if layer is not None:
            start = prev = layer
    return ",".join(runs)
