"""Sites: named places in a model, ``(name, layer)``.

====== ====================================================== ==================================
site   what it is                                             tensor shape
====== ====================================================== ==================================
``q``  query projection output, per query head                ``[batch, seq, n_heads, head_dim]``
``k``  key projection output, per key/value head              ``[batch, seq, n_kv_heads, head_dim]``
``v``  value projection output, per key/value head            ``[batch, seq, n_kv_heads, head_dim]``
``z``  per-head attention result (input of W_O)               ``[batch, seq, n_heads, head_dim]``
``attn`` attention block output (after W_O)                   ``[batch, seq, d_model]``
``mlp`` MLP block output                                      ``[batch, seq, d_model]``
``resid`` decoder block output (residual stream)              ``[batch, seq, d_model]``
====== ====================================================== ==================================

``q``/``k`` are taken before any rotary embedding or q/k norm: the projection's own output.
"""

from __future__ import annotations

from typing import NamedTuple

from vsteer.errors import SiteError

SITE_NAMES = ("q", "k", "v", "z", "attn", "mlp", "resid")
HEAD_SITES = frozenset({"q", "k", "v", "z"})
# order in which sites of one layer run during a forward pass
_EXEC_ORDER = {"q": 0, "k": 1, "v": 2, "z": 3, "attn": 4, "mlp": 5, "resid": 6}


class Site(NamedTuple):
    name: str
    layer: int

    def __str__(self) -> str:
        return f"{self.name}.{self.layer}"


def check_site_name(name: str) -> str:
    if name not in SITE_NAMES:
        raise SiteError(f"unknown site {name!r}; expected one of {', '.join(SITE_NAMES)}")
    return name


def as_site(key, n_layers: int | None = None) -> Site:
    """``("v", 3)``, ``Site("v", 3)`` or ``"v.3"`` -> ``Site``; negative layers count from the end."""
    if isinstance(key, str):
        name, sep, layer = key.rpartition(".")
        if not sep or not layer.lstrip("-").isdigit():
            raise SiteError(f"cannot parse site {key!r}; expected NAME.LAYER such as 'v.3'")
        key = (name, int(layer))
    if not isinstance(key, tuple) or len(key) != 2:
        raise SiteError(f"a site is (name, layer), got {key!r}")
    name, layer = key
    check_site_name(name)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SiteError(f"layer of site {name!r} must be an int, got {layer!r}")
    if n_layers is not None:
        if not -n_layers <= layer < n_layers:
            raise SiteError(
                f"layer {layer} is out of range: this model has {n_layers} layers (0..{n_layers - 1})"
            )
        layer %= n_layers
    return Site(name, layer)


def exec_key(site: Site) -> tuple[int, int]:
    """Sort key giving the order in which sites run in a forward pass."""
    return (site.layer, _EXEC_ORDER[site.name])


def parse_layers(text, n_layers: int) -> list[int]:
    """Layer selections: ``"all"``, ``"8"``, ``"8-16"`` (inclusive), ``"1,3,5-7"``, ints or lists."""
    if text is None or text == "all":
        return list(range(n_layers))
    if isinstance(text, int) and not isinstance(text, bool):
        items = [text]
    elif isinstance(text, range | list | tuple):
        items = list(text)
    elif isinstance(text, str):
        items = []
        for part in text.replace(" ", "").split(","):
            lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            try:
                items.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
            except ValueError:
                raise SiteError(
                    f"cannot parse layers {text!r}; expected e.g. 'all', '8', '8-16' or '1,3,5-7'"
                ) from None
    else:
        raise SiteError(f"cannot parse layers {text!r}; expected e.g. 'all', '8', '8-16' or a list of ints")
    out = []
    for layer in items:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise SiteError(f"layer must be an int, got {layer!r}")
        if not -n_layers <= layer < n_layers:
            raise SiteError(
                f"layer {layer} is out of range: this model has {n_layers} layers (0..{n_layers - 1})"
            )
        out.append(layer % n_layers)
    if not out:
        raise SiteError(f"no layers selected by {text!r}")
    return sorted(set(out))
