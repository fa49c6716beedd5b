"""Export a value-only PEFT LoRA adapter as a llama.cpp LoRA GGUF (``--lora`` / ``--lora-scaled``).

What llama.cpp reads (``src/llama-adapter.cpp``, written the same way by its
``convert_lora_to_gguf.py``): ``general.type = "adapter"``, ``general.architecture`` equal to
the base model's (it refuses a mismatch), ``adapter.type = "lora"``, ``adapter.lora.alpha``
(one float for the whole file), and per adapted weight ``W`` a pair of tensors
``<W>.lora_a`` / ``<W>.lora_b``. Their numpy shapes are PEFT's, untransposed: ``lora_a``
``[r, in]`` (ggml ``ne = [in, r]``), ``lora_b`` ``[out, r]`` (ggml ``ne = [r, out]``). llama.cpp
adds ``scale * B (A x)`` with ``scale = lora_scale * alpha / r`` and ``r = lora_b.ne[0]`` read
from each tensor's shape.

PEFT scales each module by ``alpha_m / r_m`` (``alpha_m / sqrt(r_m)`` with rsLoRA), with
``r_m``/``alpha_m`` from ``rank_pattern``/``alpha_pattern``. One file-wide alpha cannot say
that for every module, so the module's factor is folded into its ``lora_b``:
``B'_m = B_m * s_m * r_m / alpha_file`` with ``alpha_file`` the config's ``lora_alpha``; then
llama.cpp's ``alpha_file / r_m * B'_m A_m = s_m B_m A_m`` is PEFT's update exactly (up to float32
rounding). Where ``s_m`` already equals ``alpha_file / r_m`` (plain LoRA, one rank), ``B`` is
written unchanged.

Value-only: every adapted module must be a value projection, ``blk.N.attn_v.weight``, or the
fused ``blk.N.attn_qkv.weight`` whose non-V rows of ``lora_B`` are exactly zero (what
:func:`vsteer.add_adapter` keeps). The value projection is never permuted by llama.cpp's
converter (only Llama's Q and K are), so its rows keep the Hugging Face order. Everything else
is refused with one line: biases (``bias != "none"``, ``lora_bias``), DoRA, ``modules_to_save``,
trainable tokens, embeddings, other roles, architectures not in :data:`LLAMA_CPP_ARCH`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vsteer.errors import ModelError, VsteerError

__all__ = ["LLAMA_CPP_ARCH", "GGUFLoraModule", "export_gguf_lora", "plan_gguf_lora"]

# Hugging Face ``model_type`` -> llama.cpp architecture name, for the families whose llama.cpp
# converter keeps the value projection as a plain tensor in Hugging Face row order (checked in
# convert_hf_to_gguf.py: Llama/Mistral permute only Q and K; Phi-3 keeps ``qkv_proj`` as
# ``attn_qkv`` in [Q | K | V] blocks).
LLAMA_CPP_ARCH: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
ADAPTER_FILE = "adapter.gguf"
_PEFT_PREFIX = "base_model.model."


class GGUFLoraError(VsteerError):
    """An adapter that llama.cpp cannot load as it is, or a file that would be overwritten."""


@dataclass(frozen=True)
class GGUFLoraModule:
    """One exported module: PEFT module path, llama.cpp weight name, rank and the two scales.

    ``peft_scale``: PEFT's ``alpha_m / r_m`` (or ``/ sqrt(r_m)``); ``b_factor``: what ``lora_B``
    is multiplied by so that llama.cpp's ``alpha_file / r_m`` gives ``peft_scale``.
    """

    module: str
    gguf_name: str
    rank: int
    alpha: float
    peft_scale: float
    b_factor: float


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise GGUFLoraError(f"{str(adapter_dir)!r} has no adapter_config.json: not a PEFT adapter directory")
    config = json.loads(cfg_path.read_text())
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise GGUFLoraError(
            f"{str(adapter_dir)!r} has no adapter_model.safetensors (expected PEFT's safetensors)"
        )
    from safetensors.torch import load_file

    weights = load_file(str(weights_path))
    meta_path = adapter_dir / "vsteer.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return config, weights, meta


def _refuse_config(config: dict) -> None:
    """One line for each PEFT feature llama.cpp's LoRA loader has no place for."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise GGUFLoraError(
            f"adapter peft_type is {peft_type!r}; only LORA adapters can be exported to llama.cpp"
        )
    checks = [
        (config.get("bias", "none") != "none", f"bias={config.get('bias')!r} trains the base biases"),
        (bool(config.get("lora_bias")), "lora_bias=True adds a bias to lora_B"),
        (bool(config.get("use_dora")), "use_dora=True (DoRA) rescales the weight by a magnitude vector"),
        (
            bool(config.get("modules_to_save")),
            f"modules_to_save={config.get('modules_to_save')!r} are full copies",
        ),
        (bool(config.get("trainable_token_indices")), "trainable_token_indices train embedding rows"),
        (bool(config.get("layer_replication")), "layer_replication changes the layer stack"),
        (bool(config.get("target_parameters")), "target_parameters adapts raw parameters, not modules"),
        (
            bool(config.get("alora_invocation_tokens")),
            "activated LoRA (alora_invocation_tokens) is not exported",
        ),
        (bool(config.get("use_qalora")), "use_qalora=True pools the input"),
    ]
    for bad, why in checks:
        if bad:
            raise GGUFLoraError(
                f"cannot export to llama.cpp: {why}, which a llama.cpp LoRA GGUF cannot express"
            )


def _pairs(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {"A": [r, in], "B": [out, r]}}`` from PEFT's state-dict keys."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in weights.items():
        for part, tag in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if key.endswith(part):
                name = key[: -len(part)]
                name = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
                out.setdefault(name, {})[tag] = t
                break
        else:
            raise GGUFLoraError(
                f"adapter tensor {key!r} is not a lora_A/lora_B weight (a bias, DoRA magnitude, embedding or "
                f"saved module), which a llama.cpp LoRA GGUF cannot express"
            )
    for name, ab in out.items():
        if set(ab) != {"A", "B"}:
            raise GGUFLoraError(f"adapter module {name!r} has lora_{'A' if 'B' in ab else 'B'} missing")
    return out


def llama_cpp_arch(model) -> str:
    """llama.cpp's architecture name for ``model`` (``"llama"`` for SmolLM2), or a one-line refusal."""
    from vsteer.arch import model_type_of

    model_type = model_type_of(model)
    if model_type not in LLAMA_CPP_ARCH:
        raise GGUFLoraError(
            f"unsupported architecture for llama.cpp LoRA export: model_type={model_type!r}; supported: "
            f"{', '.join(sorted(LLAMA_CPP_ARCH))}"
        )
    return LLAMA_CPP_ARCH[model_type]


def plan_gguf_lora(
    model, config: dict, weights: dict[str, torch.Tensor]
) -> list[tuple[GGUFLoraModule, dict]]:
    """Check a PEFT LoRA state dict against ``model``; returns the modules with their ``A``/``B``.

    Raises :class:`GGUFLoraError` (one line) for anything llama.cpp cannot load as PEFT computes it.
    """
    import gguf
    from peft.utils.other import get_pattern_key

    from vsteer.lora import resolve_targets

    _refuse_config(config)
    arch_name = llama_cpp_arch(model)
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    addressable = set(gguf.MODEL_TENSORS[arch_enum])
    values = {m.name: m for m in resolve_targets(model, "v")}
    pairs = _pairs(weights)
    if not pairs:
        raise GGUFLoraError("adapter has no lora_A/lora_B tensors: nothing to export")
    r0, alpha0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    alpha_file = alpha0 if alpha0 != 0 else 1.0  # llama.cpp reads alpha 0 as "no scaling"
    plan = []
    for name in sorted(pairs, key=_layer_order):
        a, b = pairs[name]["A"], pairs[name]["B"]
        target = values.get(name)
        if target is None:
            raise GGUFLoraError(
                f"adapter module {name!r} is not a value projection of this {arch_name} model; only value-only "
                f"adapters (v_proj, or the V rows of a fused qkv) are exported"
            )
        fused = target.masked
        tensor = gguf.MODEL_TENSOR.ATTN_QKV if fused else gguf.MODEL_TENSOR.ATTN_V
        if tensor not in addressable:
            raise GGUFLoraError(
                f"llama.cpp's {arch_name} has no {gguf.TENSOR_NAMES[tensor]} tensor for {name!r}"
            )
        r = int(a.shape[0])
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r or tuple(a.shape[1:]) != (target.in_features,):
            raise GGUFLoraError(
                f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a [{target.out_features}, "
                f"{target.in_features}] projection: adapter from another model?"
            )
        if b.shape[0] != target.out_features:
            raise GGUFLoraError(
                f"{name}: lora_B has {b.shape[0]} rows, the projection {target.out_features}: adapter from another model?"
            )
        expected_r = int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), r0))
        if expected_r != r:
            raise GGUFLoraError(f"{name}: lora_A has rank {r} but adapter_config.json says {expected_r}")
        if fused:
            others = torch.ones(b.shape[0], dtype=torch.bool)
            others[target.keep_rows] = False
            leak = float(b[others].abs().max()) if bool(others.any()) else 0.0
            if leak != 0:
                raise GGUFLoraError(
                    f"{name}: lora_B has non-zero Q/K rows (max |value| {leak:.3g}); only value-only adapters are "
                    f"exported (train it with vsteer.add_adapter(model, 'v'))"
                )
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), alpha0))
        scale = alpha / (math.sqrt(r) if rslora else r)
        factor = scale * r / alpha_file
        gguf_name = gguf.TENSOR_NAMES[tensor].format(bid=target.layer) + ".weight"
        plan.append((GGUFLoraModule(name, gguf_name, r, alpha, scale, factor), {"A": a, "B": b}))
    return plan


def _layer_order(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def export_gguf_lora(
    adapter_dir: str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    model=None,
    overwrite: bool = False,
) -> Path:
    """Write the PEFT adapter in ``adapter_dir`` as a llama.cpp LoRA GGUF; returns its path.

    ``path``: default ``<adapter_dir>/adapter.gguf``. ``model``: the base model (default: loaded
    from the name in ``vsteer.json`` or ``adapter_config.json``). An existing file is kept unless
    ``overwrite``; the file appears whole or not at all (written beside it, then renamed).
    """
    import gguf

    adapter_dir = Path(adapter_dir)
    from vsteer.encoding import to_numpy

    config, weights, meta = _read_adapter(adapter_dir)
    path = Path(path) if path is not None else adapter_dir / ADAPTER_FILE
    if path.is_dir():
        raise GGUFLoraError(f"output {str(path)!r} is a directory; name the .gguf file to write")
    if path.exists() and not overwrite:
        raise GGUFLoraError(f"{str(path)!r} exists; pass overwrite=True (--overwrite) to replace it")
    if model is None:
        model = _load_base(config, meta)
    _check_fingerprint(model, meta)
    plan = plan_gguf_lora(model, config, weights)
    arch_name = llama_cpp_arch(model)
    alpha_file = float(config.get("lora_alpha", 8)) or 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".writing", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha_file)
        writer.add_name(adapter_dir.resolve().name)
        writer.add_string(
            "vsteer.scale_note", "per-module PEFT scale folded into lora_b (scale = alpha / rank)"
        )
        for module, ab in plan:
            a = to_numpy(ab["A"].float()).astype(np.float32)
            b = to_numpy((ab["B"].detach().double() * module.b_factor).float()).astype(np.float32)
            writer.add_tensor(f"{module.gguf_name}.lora_a", np.ascontiguousarray(a))
            writer.add_tensor(f"{module.gguf_name}.lora_b", np.ascontiguousarray(b))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        from vsteer.files import share

        share(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if another writer got there first: nothing is clobbered
            except FileExistsError:
                raise GGUFLoraError(f"{str(path)!r} appeared while writing; not replaced") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_fingerprint(model, meta: dict) -> None:
    from vsteer.models import config_fingerprint

    expected = (meta.get("base_model") or {}).get("config_fingerprint")
    if expected and config_fingerprint(model.config) != expected:
        raise GGUFLoraError(
            f"the adapter was trained on a model with config fingerprint {expected}, this model has "
            f"{config_fingerprint(model.config)}: adapter for another model"
        )


def _load_base(config: dict, meta: dict):
    from vsteer.models import load_model

    name = (meta.get("base_model") or {}).get("name") or config.get("base_model_name_or_path")
    if not name:
        raise ModelError("the adapter names no base model; pass model= (--model NAME)")
    model, _ = load_model(name, device="cpu", dtype="float32")
    return model
