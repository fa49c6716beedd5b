"""The architecture matrix: every causal-LM family of transformers, a tiny config, and the checks.

Shared by ``tests/test_architectures.py`` and ``scripts/gen_architectures.py`` (which writes
``docs/architectures.md``). The family list is transformers' own
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``; a tiny config is the family's config class with the
sizes in ``SIZES`` (applied to every field of that name, also in sub-configs) and the family's
entry in ``OVERRIDES``.

A family that builds and runs a forward is either

* ``supported``: every check in :func:`check_family` passes, or
* ``unsupported``: :func:`vsteer.get_arch` refuses it with a one-line reason (no attention,
  latent attention without a per-head value, ...).

``fails`` (a check fails on a family vsteer resolves) and ``does not build`` are the other
outcomes; the test fails on ``fails``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field

import torch

SEED = 0
BATCH, SEQ = 2, 7

SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=128,
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=128,
    n_ctx=128,
    d_model=64,
    n_inner=128,
    ffn_dim=128,
    decoder_layers=2,
    decoder_attention_heads=4,
    decoder_ffn_dim=128,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=128,
    num_layers=2,
    n_heads=4,
    d_ff=128,
    dim=64,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_routed_experts=4,
    n_shared_experts=1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# per-family changes to the tiny config (nested dicts go to sub-configs)
_MLA = dict(
    num_key_value_heads=4,
    n_group=1,
    topk_group=1,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    kv_lora_rank=16,
    q_lora_rank=32,
    head_dim=8,
)
_MLA_FAMILIES = (
    "axk1",
    "axk2",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "glm4_moe_lite",
    "glm_moe_dsa",
    "minicpm3",
    "sarvam_mla",
    "youtu",
    "longcat_flash",
)
_MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8, mamba_chunk_size=8)
# hybrids whose first attention layer comes after a few linear-attention/recurrent layers
_FOUR_LAYERS = ("lfm3", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next", "recurrent_gemma")
OVERRIDES: dict[str, dict] = {
    **{name: _MLA for name in _MLA_FAMILIES},
    **{name: dict(num_hidden_layers=4) for name in _FOUR_LAYERS},
    "qwen3_5": dict(text_config=dict(num_hidden_layers=4)),
    "qwen3_5_moe": dict(text_config=dict(num_hidden_layers=4)),
    "jamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1),
    "bamba": dict(_MAMBA2, attn_layer_indices=[1]),
    "granitemoehybrid": dict(_MAMBA2, layer_types=["mamba", "attention"]),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"]),
    "kimi_linear": dict(
        _MLA, layer_types=["linear_attention", "full_attention"], linear_num_heads=4, linear_head_dim=16
    ),
    "bailing_hybrid": dict(_MLA, layer_types=["linear_attention", "full_attention"]),
    "codegen": dict(rotary_dim=8),
    "falcon_h1": dict(_MAMBA2, mamba_d_ssm=64, mamba_d_head=16),
    "xlm": dict(emb_dim=64, n_words=128, n_layers=2, n_heads=4),
    "gptj": dict(rotary_dim=8),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=16),
}

# families not built in the test: their default sub-configs (vision/audio towers the tiny sizes do
# not reach) allocate gigabytes, or building takes minutes; the reason goes to the doc
NOT_BUILT = {
    "fuyu": "default vision patch embedding allocates over 6 GiB (tiny sizes do not reach it)",
    "got_ocr2": "default vision tower allocates over 6 GiB (tiny sizes do not reach it)",
    "moss_transcribe_diarize": "default audio tower allocates over 6 GiB (tiny sizes do not reach it)",
    "gemma4_unified_assistant": "default sub-configs allocate over 6 GiB (tiny sizes do not reach it)",
    "blt": "AttributeError: 'BltConfig' object has no attribute 'num_hidden_layers' (after 25 s of building)",
}

# families the issue names: each must be supported
MUST_SUPPORT = (
    "llama",
    "qwen2",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
    "opt",
    "phi",
    "gpt_bigcode",
    "mpt",
    "persimmon",
    "xglm",
    "biogpt",
    "gpt_neox_japanese",
    "bert",
    "roberta",
    "bloom",
    "falcon",
)
TARGET_SHARE = 0.85
# families vsteer resolves where a check fails for a reason not fixed yet: the test expects the
# failure (so a fix shows up), the doc lists them as failing
KNOWN_FAILS = {
    "nemotron_h": "the MLP lives in `mixer` like attention and Mamba do; no mlp site is found",
}


def families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _fields(cls) -> set[str]:
    try:
        return {f.name for f in dataclasses.fields(cls)}
    except TypeError:
        return set()


def _kwargs(cls, overrides: dict, depth: int = 0) -> dict:
    names = _fields(cls)
    kw = {k: v for k, v in SIZES.items() if k in names}
    for name, sub in (getattr(cls, "sub_configs", None) or {}).items():
        if depth < 2 and isinstance(sub, type):
            kw[name] = _kwargs(
                sub, overrides.get(name, {}) if isinstance(overrides.get(name), dict) else {}, depth + 1
            )
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(kw.get(k), dict):
            continue  # merged above
        kw[k] = v
    return kw


def tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    config = cls(**_kwargs(cls, OVERRIDES.get(model_type, {})))
    config._attn_implementation = "eager"
    if hasattr(config, "is_decoder"):
        config.is_decoder = True  # encoder-style blocks used as a causal LM
    return config


def build(model_type: str):
    """A tiny random causal LM of ``model_type`` in eval mode, fp32, with non-zero biases."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    if hasattr(model, "set_default_language"):  # X-MOD: one adapter per language, pick the first
        model.set_default_language(model.config.languages[0])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # biases start at zero; make them matter in the checks
    return model.eval()


def input_ids(model) -> torch.Tensor:
    vocab = int(model.get_input_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, min(vocab, 100), (BATCH, SEQ), generator=g)


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out[0]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class Result:
    model_type: str
    status: str  # supported | unsupported | fails | does not build
    reason: str = ""
    layout: str = ""
    checks: dict[str, str] = field(default_factory=dict)  # check -> "ok" or what went wrong


def layout_text(arch) -> str:
    s = arch.spec
    if s.qkv is not None:
        extra = f", {s.qkv_groups} groups" if s.qkv_groups else ""
        order = f", order {s.qkv_order}" if s.qkv_order != "qkv" else ""
        proj = f"fused `{s.attn}.{s.qkv}` [{s.qkv_layout}{extra}{order}]"
    else:
        proj = f"`{s.attn}.{{{s.q},{s.k},{s.v}}}`"
    hybrid = (
        ""
        if len(arch.attention_layers) == arch.n_layers
        else f", attention in layers {list(arch.attention_layers)}"
    )
    return (
        f"{proj} -> `{s.o}`; {arch.n_heads} q / {arch.n_kv_heads} kv heads x {arch.head_dim}"
        f"{', Conv1D' if s.conv1d else ''}{hybrid}"
    )


@functools.cache
def check_family(model_type: str) -> Result:
    """Build the tiny model and run every check (cached: one build per family per process)."""
    import vsteer
    from vsteer.errors import ModelError

    if model_type in NOT_BUILT:
        return Result(model_type, "does not build", NOT_BUILT[model_type])
    try:
        model = build(model_type)
        ids = input_ids(model)
        base = _logits(model, ids)
    except Exception as e:  # noqa: BLE001 - any build failure is reported, not raised
        return Result(model_type, "does not build", _first_line(e))
    try:
        arch = vsteer.get_arch(model)
    except ModelError as e:
        line = str(e)
        if line.startswith("unsupported architecture: "):
            reason = line.removeprefix("unsupported architecture: ")
            return Result(model_type, "unsupported", reason.removeprefix(f"model_type={model_type!r}: "))
        return Result(model_type, "fails", _first_line(e))
    except Exception as e:  # noqa: BLE001 - discovery must fail with a ModelError, not crash
        return Result(model_type, "fails", f"get_arch crashed: {_first_line(e)}")
    result = Result(model_type, "supported", layout=layout_text(arch))
    for name, fn in CHECKS:
        try:
            fn(model, arch, ids, base)
            result.checks[name] = "ok"
        except Exception as e:  # noqa: BLE001 - a failing check is recorded with its message
            result.checks[name] = _first_line(e)
    if any(v != "ok" for v in result.checks.values()):
        result.status = "fails"
        result.reason = "; ".join(f"{k}: {v}" for k, v in result.checks.items() if v != "ok")
    return result


# --------------------------------------------------------------------------------------------
# the checks: fn(model, arch, ids, base_logits) raises AssertionError on a failure
# --------------------------------------------------------------------------------------------
def _layer(arch) -> int:
    return arch.attention_layers[-1]


def check_capture_shapes(model, arch, ids, base):
    import vsteer

    layer = _layer(arch)
    # hybrids (Nemotron-H) can keep the MLP in a layer of its own
    mlp_layer = next(i for i in range(arch.n_layers) if _has_mlp(arch, i))
    sites = [(name, layer) for name in ("q", "k", "v", "z", "attn", "resid")] + [("mlp", mlp_layer)]
    with torch.no_grad(), vsteer.capture(model, sites) as acts:
        model(input_ids=ids)
    want = {
        "q": (arch.n_heads, arch.head_dims["q"]),
        "k": (arch.n_kv_heads, arch.head_dims["k"]),
        "v": (arch.n_kv_heads, arch.head_dim),
        "z": (arch.n_heads, arch.head_dim),
    }
    for name, layer in sites:
        got = tuple(acts[(name, layer)].shape)
        expected = (BATCH, SEQ, *want.get(name, (arch.d_model,)))
        assert got == expected, f"{name}.{layer}: captured {got}, expected {expected}"


def _has_mlp(arch, layer: int) -> bool:
    try:
        arch.mlp(layer)
    except Exception:  # noqa: BLE001 - SiteError: no MLP in this layer
        return False
    return True


def check_zero_add_identical(model, arch, ids, base):
    import vsteer

    zero = torch.zeros(arch.n_kv_heads, arch.head_dim)
    with vsteer.intervene(model, {("v", _layer(arch)): vsteer.add(zero)}):
        out = _logits(model, ids)
    assert torch.equal(out, base), f"zero add at v changed logits by {float((out - base).abs().max()):.3g}"


def check_v_by_hand(model, arch, ids, base):
    """v = x W_V^T + b from the weights (x: the input of the value projection)."""
    import vsteer

    layer = _layer(arch)
    seen = {}

    def keep_input(module, args, kwargs):
        seen.setdefault("x", args[0] if args else next(iter(kwargs.values())))

    handle = arch.projection(layer, "v").register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with torch.no_grad(), vsteer.capture(model, [("v", layer)]) as acts:
            model(input_ids=ids)
    finally:
        handle.remove()
    w, b = arch.weight(layer, "v"), arch.bias(layer, "v")
    x = seen["x"]
    if x.dim() == 4 and x.shape[1] == 1:  # latent attention: kv_b_proj sees [batch, 1, seq, rank]
        x = x.squeeze(1)
    v = x @ w.T + (0 if b is None else b)
    v = v.unflatten(-1, (arch.n_kv_heads, arch.head_dim))
    got = acts[("v", layer)]
    assert torch.allclose(got, v, atol=1e-5, rtol=1e-4), (
        f"captured v differs from x W_V^T + b by {float((got - v).abs().max()):.3g}"
    )


def check_v_heads_reach_their_query_heads(model, arch, ids, base):
    """A shift of one value head moves only the z of the query heads that read it (head layout)."""
    import vsteer

    layer = _layer(arch)
    j = arch.n_kv_heads - 1
    delta = torch.zeros(arch.n_kv_heads, arch.head_dim)
    delta[j] = torch.linspace(-1, 1, arch.head_dim)
    with torch.no_grad(), vsteer.capture(model, [("z", layer)]) as before:
        model(input_ids=ids)
    with torch.no_grad(), vsteer.intervene(model, {("v", layer): vsteer.add(delta)}):
        with vsteer.capture(model, [("z", layer)]) as after:
            model(input_ids=ids)
    change = (after[("z", layer)] - before[("z", layer)]).abs().amax(dim=(0, 1, 3))  # [n_heads]
    group = arch.n_heads // arch.n_kv_heads
    reads = torch.zeros(arch.n_heads, dtype=torch.bool)
    reads[j * group : (j + 1) * group] = True
    assert bool((change[reads] > 1e-4).all()), (
        f"shifting v head {j} did not reach query heads {reads.nonzero().flatten().tolist()}: {change.tolist()}"
    )
    assert bool((change[~reads] < 1e-6).all()), (
        f"shifting v head {j} moved z of other query heads: {change.tolist()}"
    )


def check_v_lora_keeps_qk(model, arch, ids, base):
    """A v-only LoRA after a training-like update: q/k of the first attention layer stay bit-exact
    (deeper q/k see the changed residual stream), and no layer's LoRA moves a Q or K row."""
    import vsteer

    layer = arch.attention_layers[0]
    sites = [("q", layer), ("k", layer), ("v", layer)]
    work = copy.deepcopy(model)
    work.__dict__.pop("_vsteer_arch", None)
    peft_model = vsteer.add_adapter(work, "v", r=2)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = peft_model(input_ids=ids)
        logits = out.logits if hasattr(out, "logits") else out[0]
        logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    # the same call path with and without the adapter (PEFT's wrapper passes its own kwargs)
    with torch.no_grad(), peft_model.disable_adapter(), vsteer.capture(peft_model, sites) as before:
        peft_model(input_ids=ids)
    with torch.no_grad(), vsteer.capture(peft_model, sites) as after:
        peft_model(input_ids=ids)
    for name in ("q", "k"):
        assert torch.equal(after[(name, layer)], before[(name, layer)]), f"v-only LoRA changed {name}"
    base_model = peft_model.get_base_model()
    for i in arch.attention_layers:
        for role in ("q", "k"):
            module = base_model.get_submodule(arch.module_path(i, role))
            lora_b = getattr(module, "lora_B", None)
            if not arch.is_fused(role):
                assert lora_b is None, f"v-only LoRA put an adapter on the {role} projection of layer {i}"
                continue
            delta = lora_b["default"].weight @ module.lora_A["default"].weight  # [out, in]
            rows = arch.rows(role)
            assert bool((delta[rows] == 0).all()), f"v-only LoRA moved {role} rows of layer {i}"
    assert not torch.equal(after[("v", layer)], before[("v", layer)]), "v-only LoRA did not change v"


# families where a legitimate part of the block sits between the heads and the output projection,
# so a shift of one value head reaches every z; the other checks still run
LAYOUT_CHECK_EXEMPT = {
    "bitnet": "a sub-norm over all heads (attn_sub_norm) sits before o_proj",
    "diffllama": "differential attention subtracts pairs of heads and normalises them before o_proj",
}


def check_v_heads(model, arch, ids, base):
    if model.config.model_type in LAYOUT_CHECK_EXEMPT:
        return
    check_v_heads_reach_their_query_heads(model, arch, ids, base)


CHECKS = (
    ("capture shapes", check_capture_shapes),
    ("zero add bit-identical", check_zero_add_identical),
    ("v by hand", check_v_by_hand),
    ("v head layout", check_v_heads),
    ("v-only LoRA keeps q/k", check_v_lora_keeps_qk),
)


def matrix() -> list[Result]:
    return [check_family(mt) for mt in families()]


def summary(results: list[Result]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------
# docs/architectures.md
# --------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: list[Result]) -> str:
    """The Markdown of ``docs/architectures.md`` (deterministic: no timings, no paths)."""
    import transformers

    counts = summary(results)
    buildable = [r for r in results if r.status != "does not build"]
    supported = counts.get("supported", 0)
    share = supported / len(buildable) if buildable else 0.0
    lines = [
        "# Architectures",
        "",
        "<!-- generated by scripts/gen_architectures.py from tests/arch_matrix.py; do not edit -->",
        "",
        f"Every entry of transformers {transformers.__version__}' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` "
        f"({len(results)} model types), built from a tiny random config (hidden 64, 2 layers, 4 heads, "
        "2 key/value heads where the family has them; per-family overrides in `tests/arch_matrix.py`) "
        "and run forward. A family is **supported** when all of these pass on it "
        "(`tests/test_architectures.py`):",
        "",
        "- capture of `q`, `k`, `v`, `z`, `attn`, `resid`, `mlp` has the documented shapes;",
        "- a zero `vsteer.add` at `v` leaves the logits bit-identical;",
        "- `v` computed by hand from the weights (input of the value projection times `W_V^T` plus the "
        "bias, rows taken from the fused layout) equals the captured `v`;",
        "- shifting one value head moves `z` only for the query heads that read that head (the head layout);",
        "- a v-only LoRA from `vsteer.add_adapter`, after two AdamW steps, leaves `q`/`k` of the first "
        "attention layer bit-exact and every Q/K row of fused projections exactly unchanged.",
        "",
        "Otherwise `vsteer.get_arch` refuses it with the one-line reason shown (**unsupported**). "
        "Families that do not build from a tiny config here are listed with the exception's first line "
        "(an optional package missing, a config validator or default sub-config the tiny sizes do not "
        "satisfy). They are left out of the share below because there is no model to check, but most "
        "are *not* proven unbuildable: a per-family override in `tests/arch_matrix.py` would likely "
        "build them. Counting every one of them as unsupported, the share would be "
        f"{supported} of {len(results)} ({supported / len(results):.1%}).",
        "",
        f"**{supported} of {len(buildable)} buildable families supported ({share:.1%})**; "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + ".",
        "",
        "| model type | status | layout | reason |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        reason = r.reason
        if r.status == "fails" and r.model_type in KNOWN_FAILS:
            reason = f"known: {KNOWN_FAILS[r.model_type]} ({r.reason})"
        elif r.status == "supported" and r.model_type in LAYOUT_CHECK_EXEMPT:
            reason = f"head-layout check skipped: {LAYOUT_CHECK_EXEMPT[r.model_type]}"
        lines.append(f"| `{r.model_type}` | {r.status} | {_cell(r.layout)} | {_cell(reason)} |")
    lines.append("")
    return "\n".join(lines)
