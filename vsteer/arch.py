"""Architecture specs: where each site lives in a model family.

A spec is data. Adding a family means adding one :class:`ArchSpec` entry to
``SPECS``; families whose decoder layers hold separate ``q_proj/k_proj/v_proj/o_proj``
work without an entry through :func:`discover_spec`.

Fused projections are described by ``qkv`` (module name) and ``qkv_layout``:

``"blocks"``
    rows ``[Q | K | V]``, Q has ``n_heads * head_dim`` rows, K and V ``n_kv_heads * head_dim``
    (GPT-2 ``c_attn``, Phi-3 ``qkv_proj`` with unequal blocks under GQA).
``"per_head"``
    rows interleaved per head: ``[q_h0 k_h0 v_h0 | q_h1 k_h1 v_h1 | ...]`` (GPT-NeoX
    ``query_key_value``, which views its output as ``[heads, 3 * head_dim]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import nn

from vsteer.errors import ModelError, SiteError

ROLES = ("q", "k", "v", "o")


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one model family (module paths are dotted, relative).

    ``layers``: candidate paths from the causal-LM module to the decoder-layer ``ModuleList``.
    ``attn``/``mlp``: relative to a decoder layer. ``q``/``k``/``v``/``o``/``qkv``: relative to
    the attention module. ``mlp_targets``: LoRA target names inside the MLP.
    ``conv1d``: weights are stored ``[in, out]`` (GPT-2 ``Conv1D``).
    """

    family: str
    model_types: tuple[str, ...]
    layers: tuple[str, ...] = ("model.layers",)
    attn: str = "self_attn"
    mlp: str = "mlp"
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    o: str = "o_proj"
    qkv: str | None = None
    qkv_layout: str | None = None
    mlp_targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    conv1d: bool = False
    final_norm: tuple[str, ...] = ("model.norm",)
    unembed: str = "lm_head"


SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama", "mistral", "smollm3", "olmo", "olmo2", "granite")),
    ArchSpec("qwen2", ("qwen2", "qwen3")),
    ArchSpec("gemma", ("gemma", "gemma2", "gemma3_text", "gemma3")),
    ArchSpec(
        "phi3",
        ("phi3",),
        q=None,
        k=None,
        v=None,
        qkv="qkv_proj",
        qkv_layout="blocks",
        mlp_targets=("gate_up_proj", "down_proj"),
    ),
    ArchSpec(
        "gpt2",
        ("gpt2",),
        layers=("transformer.h",),
        attn="attn",
        q=None,
        k=None,
        v=None,
        o="c_proj",
        qkv="c_attn",
        qkv_layout="blocks",
        mlp_targets=("c_fc", "c_proj"),
        conv1d=True,
        final_norm=("transformer.ln_f",),
    ),
    ArchSpec(
        "gpt_neox",
        ("gpt_neox",),
        layers=("gpt_neox.layers",),
        attn="attention",
        q=None,
        k=None,
        v=None,
        o="dense",
        qkv="query_key_value",
        qkv_layout="per_head",
        mlp_targets=("dense_h_to_4h", "dense_4h_to_h"),
        final_norm=("gpt_neox.final_layer_norm",),
        unembed="embed_out",
    ),
)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under a PEFT wrapper (module paths are the same)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def spec_for(model: nn.Module) -> ArchSpec:
    """The spec for ``model``, chosen by ``config.model_type`` (not the class name)."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    model_type = getattr(_text_config(config), "model_type", None) if config is not None else None
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    return discover_spec(model, model_type)


def discover_spec(model: nn.Module, model_type: str | None) -> ArchSpec:
    """Find the layout of a family with separate ``q/k/v/o_proj`` projections structurally."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        first = module[0]
        for attn_name, attn in first.named_modules():
            if attn_name and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
                mlp = next((n for n in ("mlp", "feed_forward", "ffn") if hasattr(first, n)), "mlp")
                return ArchSpec(
                    family=f"discovered:{model_type}",
                    model_types=(model_type or "",),
                    layers=(name,),
                    attn=attn_name,
                    mlp=mlp,
                    final_norm=("model.norm", "model.final_layernorm", "transformer.ln_f"),
                )
    raise ModelError(
        f"unsupported architecture: model_type={model_type!r} has no value projection vsteer can find "
        f"(no decoder layers with q_proj/k_proj/v_proj/o_proj); add an ArchSpec for it in vsteer/arch.py"
    )


@dataclass
class ModelArch:
    """A spec resolved against one model instance: head counts, modules, fused row indices.

    Shapes: ``weight(layer, "v")`` is ``[n_kv_heads * head_dim, d_model]`` in ``nn.Linear``
    convention whatever the storage; ``weight(layer, "o")`` is ``[d_model, n_heads * head_dim]``.
    """

    model: nn.Module
    spec: ArchSpec
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    layer_modules: nn.ModuleList = field(repr=False)

    @property
    def family(self) -> str:
        return self.spec.family

    # modules -------------------------------------------------------------------------------
    def check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise SiteError(f"layer must be an int, got {layer!r}")
        if not -self.n_layers <= layer < self.n_layers:
            raise SiteError(
                f"layer {layer} is out of range: this model has {self.n_layers} layers (0..{self.n_layers - 1})"
            )
        return layer % self.n_layers

    def layer(self, layer: int) -> nn.Module:
        return self.layer_modules[self.check_layer(layer)]

    def attention(self, layer: int) -> nn.Module:
        return self.layer(layer).get_submodule(self.spec.attn)

    def mlp(self, layer: int) -> nn.Module:
        return self.layer(layer).get_submodule(self.spec.mlp)

    def is_fused(self, role: str) -> bool:
        return role in ("q", "k", "v") and getattr(self.spec, role) is None

    def projection_name(self, role: str) -> str:
        """Module path of a role's projection relative to the attention module."""
        if role not in ROLES:
            raise SiteError(f"unknown projection role {role!r}; expected one of {ROLES}")
        return self.spec.qkv if self.is_fused(role) else getattr(self.spec, role)

    def projection(self, layer: int, role: str) -> nn.Module:
        return self.attention(layer).get_submodule(self.projection_name(role))

    def module_path(self, layer: int, role: str) -> str:
        """Full dotted path (from the causal-LM module) of a role's projection."""
        layers_path = self._layers_path
        return f"{layers_path}.{self.check_layer(layer)}.{self.spec.attn}.{self.projection_name(role)}"

    @cached_property
    def _layers_path(self) -> str:
        for path in self.spec.layers:
            if _get(self.model, path) is self.layer_modules:
                return path
        raise ModelError(f"cannot find the decoder layers of {self.family}")

    # rows of fused projections ---------------------------------------------------------------
    def n_heads_of(self, role: str) -> int:
        return self.n_kv_heads if role in ("k", "v") else self.n_heads

    def rows(self, role: str) -> torch.Tensor | None:
        """Output rows of the fused projection that belong to ``role`` (``None`` if not fused).

        Ordered head-major (``[head0 dims..., head1 dims...]``) so that ``out[..., rows]``
        views as ``[..., heads, head_dim]``.
        """
        if not self.is_fused(role):
            return None
        return self._rows[role]

    @cached_property
    def _rows(self) -> dict[str, torch.Tensor]:
        h, hk, d = self.n_heads, self.n_kv_heads, self.head_dim
        layout = self.spec.qkv_layout
        if layout == "blocks":
            q = torch.arange(h * d)
            k = torch.arange(h * d, h * d + hk * d)
            v = torch.arange(h * d + hk * d, h * d + 2 * hk * d)
        elif layout == "per_head":
            if h != hk:
                raise ModelError(f"{self.family}: per-head interleaved QKV needs n_heads == n_kv_heads")
            base = (torch.arange(h) * 3 * d)[:, None] + torch.arange(d)[None, :]
            q, k, v = base.flatten(), (base + d).flatten(), (base + 2 * d).flatten()
        else:
            raise ModelError(f"{self.family}: unknown fused QKV layout {layout!r}")
        return {"q": q, "k": k, "v": v}

    def fused_width(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    # weights in Linear convention -----------------------------------------------------------
    def weight(self, layer: int, role: str) -> torch.Tensor:
        """Weight of a role in ``nn.Linear`` convention ``[out, in]`` (a view where possible)."""
        w = _base_weight(self.projection(layer, role))
        if self.spec.conv1d:
            w = w.t()
        rows = self.rows(role)
        return w if rows is None else w[rows.to(w.device)]

    def bias(self, layer: int, role: str) -> torch.Tensor | None:
        b = getattr(base_layer(self.projection(layer, role)), "bias", None)
        if b is None:
            return None
        rows = self.rows(role)
        return b if rows is None else b[rows.to(b.device)]

    def site_table(self) -> dict[str, str]:
        """Where each site lives, as text (for ``vsteer model info``)."""
        lp = f"{self._layers_path}.{{i}}"
        a = f"{lp}.{self.spec.attn}"

        def proj(role: str) -> str:
            if self.is_fused(role):
                rows = self.rows(role)
                return f"{a}.{self.spec.qkv} output rows [{self.spec.qkv_layout}] ({len(rows)} of {self.fused_width()})"
            return f"{a}.{getattr(self.spec, role)} output"

        return {
            "q": proj("q"),
            "k": proj("k"),
            "v": proj("v"),
            "z": f"{a}.{self.spec.o} input",
            "attn": f"{a} output",
            "mlp": f"{lp}.{self.spec.mlp} output",
            "resid": f"{lp} output",
        }


def base_layer(module: nn.Module) -> nn.Module:
    """The original layer under a PEFT LoRA wrapper."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) else module


def _base_weight(module: nn.Module) -> torch.Tensor:
    return base_layer(module).weight


def _int_attr(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if default is None:
        raise ModelError(f"config of model_type={getattr(config, 'model_type', None)!r} lacks {names[0]}")
    return default


_ARCH_CACHE_ATTR = "_vsteer_arch"


def get_arch(model: nn.Module) -> ModelArch:
    """Resolve the architecture of ``model`` (a transformers causal LM or a PEFT wrapper of one).

    The result is cached on the model instance.
    """
    base = unwrap(model)
    cached = base.__dict__.get(_ARCH_CACHE_ATTR)
    if cached is not None:
        return cached
    spec = spec_for(base)
    config = _text_config(base.config)
    layers = next((m for p in spec.layers if isinstance(m := _get(base, p), nn.ModuleList)), None)
    if layers is None:
        raise ModelError(
            f"model_type={config.model_type!r} ({spec.family}): decoder layers not found at {list(spec.layers)}; "
            f"fix the ArchSpec in vsteer/arch.py"
        )
    n_heads = _int_attr(config, "num_attention_heads", "n_head")
    d_model = _int_attr(config, "hidden_size", "n_embd", "d_model")
    head_dim = _int_attr(config, "head_dim", default=d_model // n_heads)
    n_kv = _int_attr(config, "num_key_value_heads", "n_head_kv", default=n_heads)
    arch = ModelArch(
        model=base,
        spec=spec,
        n_layers=len(layers),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_model=d_model,
        layer_modules=layers,
    )
    _check_projections(arch)
    base.__dict__[_ARCH_CACHE_ATTR] = arch
    return arch


def _check_projections(arch: ModelArch) -> None:
    attn = arch.attention(0)
    for role in ROLES:
        name = arch.projection_name(role)
        if _get(attn, name) is None:
            raise ModelError(
                f"unsupported architecture: {arch.family} has no {role} projection at "
                f"{arch.spec.attn}.{name}; add or fix its ArchSpec in vsteer/arch.py"
            )


def with_overrides(spec: ArchSpec, **changes) -> ArchSpec:
    """A copy of a spec with some fields changed (for families that differ in one place)."""
    return replace(spec, **changes)
