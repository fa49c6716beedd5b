"""Architecture specs: where each site lives in a model family.

A spec is data. Families listed in ``SPECS`` use their entry; every other family is found by
structural discovery (:func:`discover_spec`): the decoder layers are the ``ModuleList`` whose
blocks hold an attention module with projections under one of the names in
``SEPARATE_NAMES``/``FUSED_NAMES``, and head counts and sizes are read from the projection
weights (``o`` input = ``n_heads * head_dim``; ``v`` output = ``n_kv_heads * head_dim``).
Adding a family is a data entry: a name pattern, a fused layout in ``FUSED_LAYOUTS``, or a
reason in ``UNSUPPORTED`` for families without a value projection.

Fused projections are described by ``qkv`` (module name) and ``qkv_layout``:

``"blocks"``
    rows ``[Q | K | V]``, Q has ``n_heads * head_dim`` rows, K and V ``n_kv_heads * head_dim``
    (GPT-2 ``c_attn``, Phi-3 ``qkv_proj`` with unequal blocks under GQA, MPT ``Wqkv``).
``"per_head"``
    rows interleaved per head: ``[q_h0 k_h0 v_h0 | q_h1 k_h1 v_h1 | ...]`` (GPT-NeoX, BLOOM,
    Persimmon ``query_key_value``, which view their output as ``[heads, 3 * head_dim]``).
``"grouped"``
    ``qkv_groups`` groups (default: one per key/value head), each ``[q heads of the group | k | v]``
    in ``qkv_order`` (Falcon: one group per KV head, so MQA is ``blocks`` and MHA is
    ``per_head``; CodeGen: 4 groups ordered ``q, v, k``).
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
    ``qkv_groups``/``qkv_order``: the ``"grouped"`` layout (see the module docstring).
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
    qkv_groups: int | None = None
    qkv_order: str = "qkv"


SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama", "mistral", "smollm3", "olmo", "olmo2", "granite")),
    ArchSpec("qwen2", ("qwen2", "qwen3")),
    ArchSpec(
        "gemma",
        ("gemma", "gemma2", "gemma3_text", "gemma3"),
        layers=("model.layers", "model.language_model.layers"),
        final_norm=("model.norm", "model.language_model.norm"),
    ),
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


# --------------------------------------------------------------------------------------------
# structural discovery: data tables
# --------------------------------------------------------------------------------------------
# (q, k, v, o) module names relative to the attention module, tried in order
SEPARATE_NAMES: tuple[tuple[str, str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # OPT, BART family, XGLM, BioGPT, GPT-Neo, GPT-J
    ("q_proj", "k_proj", "v_proj", "dense"),  # Phi-1/2
    ("q_proj", "k_proj", "v_proj", "c_proj"),
    ("q_proj", "k_proj", "v_proj", "Wo"),  # ModernBERT decoder
    ("self.query", "self.key", "self.value", "output.dense"),  # BERT family used as a causal LM
    ("query", "key", "value", "dense"),
    ("query_proj", "key_proj", "value_proj", "out_proj"),  # ProphetNet
    ("q_lin", "k_lin", "v_lin", "out_lin"),
    ("Wq", "Wk", "Wv", "dense"),  # CTRL
    ("wq", "wk", "wv", "wo"),
    ("project_q", "project_k", "project_v", "attention_out"),  # CPM-Ant
    ("q", "k", "v", "o"),
)
# (fused qkv, o) module names relative to the attention module
FUSED_NAMES: tuple[tuple[str, str], ...] = (
    ("qkv_proj", "o_proj"),
    ("c_attn", "c_proj"),  # GPT-2, GPT-BigCode, OpenAI GPT
    ("query_key_value", "dense"),  # GPT-NeoX, BLOOM, Falcon, Persimmon, GPT-NeoX-Japanese
    ("Wqkv", "out_proj"),  # MPT, DBRX
    ("qkv_proj", "out_proj"),  # CodeGen
    ("W_pack", "o_proj"),
    ("qkv", "proj"),
)
# (q, fused kv, o): multi-head latent attention decompresses per-head keys and values from a
# shared latent with one projection, ``[k_nope_h0 v_h0 | k_nope_h1 v_h1 | ...]``
FUSED_KV_NAMES: tuple[tuple[str, str, str], ...] = (
    ("q_b_proj", "kv_b_proj", "o_proj"),  # DeepSeek-V2/V3, MiniCPM3, GLM-4 MoE lite
    ("q_proj", "kv_b_proj", "o_proj"),
)
# fused layouts that are not [Q | K | V] blocks, by model_type
FUSED_LAYOUTS: dict[str, dict] = {
    "gpt_neox": {"qkv_layout": "per_head"},
    "bloom": {"qkv_layout": "per_head"},
    "persimmon": {"qkv_layout": "per_head"},
    "gpt_neox_japanese": {"qkv_layout": "per_head"},
    "falcon": {"qkv_layout": "grouped"},
    "codegen": {"qkv_layout": "grouped", "qkv_groups": 4, "qkv_order": "qvk"},
}
# MLP sites relative to a decoder layer: the module whose output is the MLP's contribution
MLP_NAMES = (
    "mlp",
    "feed_forward",
    "ffn",
    "block_sparse_moe",
    "moe",
    "ff",
    "feedforward",
    "output.dense",  # BERT family: the second FFN linear (before the residual and LayerNorm)
    "fc2",  # OPT, BART family, XGLM, BioGPT: the second FFN linear, directly in the layer
    "ffn.fc2",
    "mlp_block",  # RecurrentGemma
    "shared_transformer.feed_forward",  # Zamba2 hybrid layers
)
FINAL_NORM_NAMES = (
    "norm",
    "ln_f",
    "final_layer_norm",
    "final_layernorm",
    "layer_norm",
    "norm_f",
    "final_norm",
)
# families without a per-head value projection of the attention input, by model_type; the
# structural reasons below (latent attention, no attention) are found without an entry
UNSUPPORTED: dict[str, str] = {
    "cpmant": "prepends prompt-embedding tokens inside the model, so site positions are not input positions",
    "prophetnet": "n-gram attention runs the main and predicting streams in one tensor (positions x (1 + ngram))",
    "jetmoe": "mixture of attention heads: query and output projections are per-expert (JetMoeMoA), keys and values fused in kv_proj",
    "deepseek_v4": "keys and values are one tensor from a shared projection (kv_proj) with a grouped low-rank output",
    "hy_v4": "hyper-connections: the residual stream holds several streams per token, not one [d_model] vector",
    "hrm_text": "runs its layers several times per forward (recurrent cycles): a site has no single value per token",
    "xlnet": "two-stream relative attention keeps q/k/v as raw parameter tensors, not projection modules",
    "reformer": "LSH attention shares one query-key projection and chunks values; no per-head v of the input",
    "xlm": "no decoder-layer module: attentions and feed-forwards are separate lists, so there is no resid site",
}
_LATENT_NAMES = ("kv_b_proj", "kv_a_proj_with_mqa", "kv_a_proj")
_NO_ATTENTION_HINTS = {
    "mamba": "state-space model (Mamba): no attention",
    "rwkv": "recurrent model (RWKV): no attention",
    "xlstm": "recurrent model (xLSTM): no attention",
    "falcon_mamba": "state-space model (Mamba): no attention",
}


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


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(_text_config(config), "model_type", None) if config is not None else None


# blocks computing x + attn(norm(x)) + mlp(norm'(x)) whatever the config says
_PARALLEL_TYPES = frozenset({"gptj", "codegen", "phi", "cohere", "cohere2"})


def parallel_residual(model: nn.Module) -> bool:
    """Whether every block adds its attention and its MLP to the same input, ``x + attn(norm x) +
    mlp(norm' x)`` (GPT-J, CodeGen, Phi-1/2, Cohere; GPT-NeoX and StableLM with
    ``use_parallel_residual``; Falcon with ``parallel_attn`` or the new decoder architecture): then
    the MLP never sees the attention output, and a constant added to it moves the block output by
    exactly that constant."""
    config = _text_config(getattr(unwrap(model), "config", None))
    if config is None:
        return False
    if getattr(config, "model_type", None) == "falcon":
        return bool(
            getattr(config, "parallel_attn", False) or getattr(config, "new_decoder_architecture", False)
        )
    if hasattr(config, "use_parallel_residual"):
        return bool(config.use_parallel_residual)
    return getattr(config, "model_type", None) in _PARALLEL_TYPES


def spec_for(model: nn.Module) -> ArchSpec:
    """The spec for ``model``, chosen by ``config.model_type`` (not the class name)."""
    model = unwrap(model)
    model_type = model_type_of(model)
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    return discover_spec(model, model_type)


def _match_attention(module: nn.Module) -> dict | None:
    """Projection names of an attention module, or None if it has none of the known patterns."""
    for q, k, v, o in SEPARATE_NAMES:
        if all(_get(module, n) is not None for n in (q, k, v, o)):
            return {"q": q, "k": k, "v": v, "o": o, "qkv": None}
    for q, kv, o in FUSED_KV_NAMES:
        if all(_get(module, n) is not None for n in (q, kv, o)):
            return {"q": q, "k": None, "v": None, "o": o, "qkv": kv}
    for qkv, o in FUSED_NAMES:
        if _get(module, qkv) is not None and _get(module, o) is not None:
            return {"q": None, "k": None, "v": None, "o": o, "qkv": qkv}
    return None


def _find_attention(layer: nn.Module) -> tuple[str, dict] | None:
    for name, module in layer.named_modules():
        # linear attention (gated delta rule, lightning) also has q/k/v projections: not softmax heads
        if name and "linear" not in name and not isinstance(module, nn.ModuleList | nn.ModuleDict):
            names = _match_attention(module)
            if names is not None:
                return name, names
    return None


def _skip_tower(path: str) -> bool:
    return any(w in path for w in ("vision", "visual", "audio", "image", "speech"))


def discover_spec(model: nn.Module, model_type: str | None) -> ArchSpec:
    """Find where the sites live from the module tree (see the module docstring)."""
    if model_type in UNSUPPORTED:
        raise ModelError(f"unsupported architecture: model_type={model_type!r}: {UNSUPPORTED[model_type]}")
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        for layer in module:
            hit = _find_attention(layer)
            if hit is not None:
                found.append((_skip_tower(path), path, layer, hit))
                break
    if not found:
        raise ModelError(
            f"unsupported architecture: model_type={model_type!r}: {_no_value_reason(model, model_type)}"
        )
    _, path, layer, (attn, names) = min(found, key=lambda f: f[0])
    mlp = next((n for n in MLP_NAMES if _get(layer, n) is not None), "mlp")
    mlp_module = _get(layer, mlp)
    mlp_targets = tuple(
        n
        for n, m in (mlp_module.named_modules() if mlp_module is not None else ())
        if n and _is_projection(m)
    )
    parent = path.rpartition(".")[0]
    norm_prefix = f"{parent}." if parent else ""
    final_norm = tuple(
        f"{norm_prefix}{n}" for n in FINAL_NORM_NAMES if _get(model, f"{norm_prefix}{n}") is not None
    )
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    unembed = next((n for n, m in model.named_modules() if out_emb is not None and m is out_emb), "lm_head")
    probe = _get(layer, f"{attn}.{names['qkv'] or names['v']}")
    layout = dict(FUSED_LAYOUTS.get(model_type or "", {})) if names["qkv"] else {}
    if names["qkv"] and names["q"]:  # latent attention: K and V fused per head
        layout = {"qkv_layout": "grouped", "qkv_order": "kv"}
    return ArchSpec(
        family=f"discovered:{model_type}",
        model_types=(model_type or "",),
        layers=(path,),
        attn=attn,
        mlp=mlp,
        q=names["q"],
        k=names["k"],
        v=names["v"],
        o=names["o"],
        qkv=names["qkv"],
        qkv_layout=layout.pop("qkv_layout", "blocks") if names["qkv"] else None,
        mlp_targets=mlp_targets,
        conv1d=type(probe).__name__ == "Conv1D",
        final_norm=final_norm or ("model.norm",),
        unembed=unembed,
        **layout,
    )


def _is_projection(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and not isinstance(module, nn.Embedding)


def _no_value_reason(model: nn.Module, model_type: str | None) -> str:
    """One line saying why a model has no value projection vsteer can use."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if names & set(_LATENT_NAMES):
        return (
            "latent attention (kv_b_proj) without a query or output projection under a known name "
            "(vsteer.arch.FUSED_KV_NAMES)"
        )
    if model_type in _NO_ATTENTION_HINTS:
        return _NO_ATTENTION_HINTS[model_type]
    classes = " ".join(type(m).__name__.lower() for m in model.modules())
    if "attention" not in classes and "attn" not in classes:
        return "no attention modules (state-space or recurrent blocks only)"
    return (
        "no value projection vsteer can find (no decoder layers with one of the projection name "
        "patterns in vsteer.arch.SEPARATE_NAMES / FUSED_NAMES); add a pattern or an ArchSpec in vsteer/arch.py"
    )


# --------------------------------------------------------------------------------------------
# a spec resolved against a model
# --------------------------------------------------------------------------------------------
@dataclass
class ModelArch:
    """A spec resolved against one model instance: head counts, modules, fused row indices.

    Shapes: ``weight(layer, "v")`` is ``[n_kv_heads * head_dim, d_model]`` in ``nn.Linear``
    convention whatever the storage; ``weight(layer, "o")`` is ``[d_model, n_heads * head_dim]``.
    ``head_dim`` is the size of a value head (``v`` and ``z``); ``head_dims`` has the size per
    role (a query head can be wider, e.g. with an output gate folded into ``q_proj``).
    ``attention_layers``: layers that have attention (all of them except in hybrid models).
    """

    model: nn.Module
    spec: ArchSpec
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    layer_modules: nn.ModuleList = field(repr=False)
    head_dims: dict[str, int] = field(default_factory=dict)
    attention_layers: tuple[int, ...] = ()

    def __post_init__(self):
        for role in ("q", "k", "v", "z"):
            self.head_dims.setdefault(role, self.head_dim)
        if not self.attention_layers:
            self.attention_layers = tuple(range(self.n_layers))

    @property
    def family(self) -> str:
        return self.spec.family

    def site_shape(self, name: str) -> tuple[int, ...]:
        """Per-token shape of a site: ``[heads, head_dim]`` for q/k/v/z, ``[d_model]`` otherwise."""
        if name in ("q", "z"):
            return (self.n_heads, self.head_dims[name])
        if name in ("k", "v"):
            return (self.n_kv_heads, self.head_dims[name])
        return (self.d_model,)

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

    def has_attention(self, layer: int) -> bool:
        return self.check_layer(layer) in self.attention_layers

    def attention(self, layer: int) -> nn.Module:
        i = self.check_layer(layer)
        if i not in self.attention_layers:
            raise SiteError(
                f"layer {i} of {self.family} has no attention (a hybrid model); attention layers: "
                f"{list(self.attention_layers)}"
            )
        return self.layer_modules[i].get_submodule(self.spec.attn)

    def mlp(self, layer: int) -> nn.Module:
        module = _get(self.layer(layer), self.spec.mlp)
        if module is None:
            raise SiteError(
                f"layer {self.check_layer(layer)} of {self.family} has no MLP at {self.spec.mlp!r}"
            )
        return module

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
        h, hk = self.n_heads, self.n_kv_heads
        layout = self.spec.qkv_layout
        if layout == "blocks":
            groups, order = 1, "qkv"
        elif layout == "per_head":
            if h != hk:
                raise ModelError(f"{self.family}: per-head interleaved QKV needs n_heads == n_kv_heads")
            groups, order = h, "qkv"
        elif layout == "grouped":
            groups, order = self.spec.qkv_groups or hk, self.spec.qkv_order
        else:
            raise ModelError(f"{self.family}: unknown fused QKV layout {layout!r}")
        fused = [r for r in "qkv" if self.is_fused(r)]
        if h % groups or hk % groups or sorted(order) != sorted(fused):
            raise ModelError(
                f"{self.family}: fused QKV in {groups} groups of order {order!r} does not fit "
                f"{h} query and {hk} key/value heads"
            )
        # rows per group and role; a role's rows are its heads in order across the groups
        size = {r: self.n_heads_of(r) // groups * self.head_dims[r] for r in fused}
        group_width = sum(size.values())
        offset, start = 0, {}
        for r in order:
            start[r] = offset
            offset += size[r]
        return {
            r: (
                (torch.arange(groups) * group_width + start[r])[:, None] + torch.arange(size[r])[None, :]
            ).flatten()
            for r in fused
        }

    def fused_width(self) -> int:
        return sum(self.n_heads_of(r) * self.head_dims[r] for r in "qkv" if self.is_fused(r))

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


def _in_out(module: nn.Module, conv1d: bool) -> tuple[int, int]:
    """``(in_features, out_features)`` of a projection from its weight."""
    w = getattr(base_layer(module), "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ModelError(
            f"unsupported architecture: projection {type(module).__name__} has no [out, in] weight matrix "
            f"(a composite or custom projection)"
        )
    return (int(w.shape[0]), int(w.shape[1])) if conv1d else (int(w.shape[1]), int(w.shape[0]))


def _int_attr(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if default is None:
        raise ModelError(f"config of model_type={getattr(config, 'model_type', None)!r} lacks {names[0]}")
    return default


_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_attention_heads_per_partition")
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
    # hybrid models: layers whose mixer (same name or not) lacks the projections have no attention
    attn_layers = tuple(i for i, layer in enumerate(layers) if _has_projections(spec, _get(layer, spec.attn)))
    if not attn_layers:
        raise ModelError(
            f"unsupported architecture: {spec.family} has no attention at {spec.attn!r} in any decoder layer; "
            f"add or fix its ArchSpec in vsteer/arch.py"
        )
    _check_projections(spec, layers[attn_layers[0]].get_submodule(spec.attn))
    n_heads, head_dims, n_kv = _heads(spec, config, layers[attn_layers[0]].get_submodule(spec.attn))
    arch = ModelArch(
        model=base,
        spec=spec,
        n_layers=len(layers),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dims["v"],
        d_model=_int_attr(config, "hidden_size", "n_embd", "d_model"),
        layer_modules=layers,
        head_dims=head_dims,
        attention_layers=attn_layers,
    )
    _check_uniform(arch)
    base.__dict__[_ARCH_CACHE_ATTR] = arch
    return arch


def _heads(spec: ArchSpec, config, attn: nn.Module) -> tuple[int, dict[str, int], int]:
    """``(n_heads, head_dims per role, n_kv_heads)`` read from the projection weights.

    The number of query heads comes from the attention module (or the config); the rest from
    shapes: ``z`` (the input of ``o``) is ``n_heads * head_dim``, ``v`` is ``n_kv_heads * head_dim``.
    """
    holders = [attn] + [
        m for n in (spec.q, spec.v) if n and "." in n and (m := _get(attn, n.rpartition(".")[0])) is not None
    ]
    n_heads = next(
        (v for m in holders for a in _HEAD_ATTRS if isinstance(v := getattr(m, a, None), int) and v > 0), None
    )
    if n_heads is None:
        n_heads = _int_attr(config, "num_attention_heads", "n_head", "num_heads", "n_heads")
    o_in, _ = _in_out(attn.get_submodule(spec.o), spec.conv1d)
    if o_in % n_heads:
        raise ModelError(
            f"{spec.family}: output projection input {o_in} is not a multiple of {n_heads} heads"
        )
    d = o_in // n_heads
    if spec.qkv is not None and spec.q is not None:  # latent attention: one K and V head per query head
        _, width = _in_out(attn.get_submodule(spec.qkv), spec.conv1d)
        _, q_out = _in_out(attn.get_submodule(spec.q), spec.conv1d)
        if width % n_heads or width // n_heads <= d or q_out % n_heads:
            raise ModelError(
                f"{spec.family}: fused key/value width {width} does not split into {n_heads} heads"
            )
        return n_heads, {"q": q_out // n_heads, "k": width // n_heads - d, "v": d, "z": d}, n_heads
    if spec.qkv is not None:
        _, width = _in_out(attn.get_submodule(spec.qkv), spec.conv1d)
        hk2, rest = divmod(width // d - n_heads, 2) if width % d == 0 else (0, 1)
        if rest or hk2 < 1 or n_heads % hk2:
            raise ModelError(
                f"{spec.family}: fused projection width {width} does not split into {n_heads} query heads "
                f"and equal key/value heads of size {d}"
            )
        return n_heads, {"q": d, "k": d, "v": d, "z": d}, hk2
    _, v_out = _in_out(attn.get_submodule(spec.v), spec.conv1d)
    _, q_out = _in_out(attn.get_submodule(spec.q), spec.conv1d)
    _, k_out = _in_out(attn.get_submodule(spec.k), spec.conv1d)
    if v_out % d or q_out % n_heads:
        raise ModelError(
            f"{spec.family}: value projection width {v_out} / query width {q_out} do not split into heads of size {d}"
        )
    n_kv = v_out // d
    if k_out % n_kv:
        raise ModelError(f"{spec.family}: key projection width {k_out} does not split into {n_kv} heads")
    return n_heads, {"q": q_out // n_heads, "k": k_out // n_kv, "v": d, "z": d}, n_kv


def _has_projections(spec: ArchSpec, attn: nn.Module | None) -> bool:
    names = [n for n in (spec.o, spec.qkv, spec.q, spec.k, spec.v) if n]
    return attn is not None and all(_get(attn, n) is not None for n in names)


def _check_projections(spec: ArchSpec, attn: nn.Module) -> None:
    for role in ROLES:
        name = spec.qkv if (role != "o" and getattr(spec, role) is None) else getattr(spec, role)
        if name is None or _get(attn, name) is None:
            raise ModelError(
                f"unsupported architecture: {spec.family} has no {role} projection at "
                f"{spec.attn}.{name}; add or fix its ArchSpec in vsteer/arch.py"
            )


def _check_uniform(arch: ModelArch) -> None:
    """Sites have one shape per model: every attention layer must have the same head sizes."""
    first = None
    for i in arch.attention_layers:
        shapes = tuple(_in_out(arch.projection(i, r), arch.spec.conv1d) for r in ROLES)
        if first is not None and shapes != first:
            raise ModelError(
                f"unsupported architecture: {arch.family} has attention layers with different head sizes "
                f"(layer {arch.attention_layers[0]}: {first}, layer {i}: {shapes}); sites need one shape per model"
            )
        first = first or shapes


def with_overrides(spec: ArchSpec, **changes) -> ArchSpec:
    """A copy of a spec with some fields changed (for families that differ in one place)."""
    return replace(spec, **changes)
