"""llama.cpp control vectors: export residual-stream vectors to GGUF, import repeng/llama.cpp files.

The format (llama.cpp ``llama_control_vector_load``, repeng ``ControlVector.export_gguf``):
``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model type),
``controlvector.layer_count``, and one float32 1-D tensor ``direction.N`` of ``d_model`` values
per steered layer. llama.cpp adds ``direction.N`` to the output of block ``N`` (0-based), which
is vsteer's ``resid`` site at layer ``N``; it rejects ``N = 0``, so block 0 cannot be exported.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from vsteer.errors import VectorError
from vsteer.files import atomic_write
from vsteer.vectors import SteeringVector

ARCH = "controlvector"


def export_gguf(
    vector: SteeringVector, path: str | os.PathLike, model_hint: str | None = None, model=None
) -> Path:
    """Write ``vector`` as a llama.cpp control-vector GGUF at ``path`` (atomically).

    Site ``resid`` as it is. Site ``v`` only with ``model`` and only where it is exact: on a
    parallel-residual model (:func:`vsteer.arch.parallel_residual`) a value vector added at every
    position moves block ``l``'s output by exactly ``W_O δ`` (:func:`vsteer.steering.residual_change`),
    which becomes ``direction.l`` (docs/llamacpp.md); elsewhere it is refused with the reason.
    """
    import gguf

    if vector.site == "v":
        vector = _value_as_residual(vector, model)
    if vector.site != "resid":
        raise VectorError(
            f"llama.cpp control vectors are added to the residual stream (site 'resid'); this vector is at "
            f"site {vector.site!r}. Extract it with site='resid' (or convert a v vector with residual_change)"
        )
    if 0 in vector.directions:
        raise VectorError(
            "layer 0 cannot be exported: llama.cpp's direction.N is added to the output of block N and it "
            "rejects N = 0; drop layer 0 (vector.select_layers(...)) before exporting"
        )
    if len(vector.shape) != 1:
        raise VectorError(
            f"control-vector directions are 1-D; this vector has shape {vector.shape} per layer"
        )
    hint = model_hint or vector.extra.get("model_type") or _model_type_hint(vector)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.writing")
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    writer.add_string(f"{ARCH}.model_hint", hint)
    writer.add_uint32(f"{ARCH}.layer_count", len(vector.directions))
    for layer, t in vector.directions.items():
        writer.add_tensor(f"direction.{layer}", t.detach().float().cpu().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    try:
        atomic_write(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _value_as_residual(vector: SteeringVector, model) -> SteeringVector:
    """The ``resid`` vector a ``v`` vector equals on a parallel-residual ``model``; else refuse."""
    from vsteer.arch import model_type_of, parallel_residual
    from vsteer.steering import residual_change

    if model is None:  # why, in docs/llamacpp.md: not even W_O v is exact before the MLP
        raise VectorError(
            "a value-site vector cannot be a llama.cpp control vector on a sequential block: those are "
            "added to a block's output (the residual stream after the MLP), while a v vector acts inside "
            "attention, before W_O and the block's MLP; it is exact only on parallel-residual models "
            "(pass the model: --model NAME), otherwise extract a vector with site='resid' (docs/llamacpp.md)"
        )
    vector.check(model)
    if not parallel_residual(model):
        raise VectorError(
            f"a value-site vector cannot be a llama.cpp control vector on {model_type_of(model)}: its blocks "
            "are sequential (the MLP reads the attention output), so no constant added to a block's output "
            "equals it; extract a vector with site='resid' instead (docs/llamacpp.md)"
        )
    change = residual_change(model, vector)  # same layers: export_gguf refuses layer 0 for both sites
    extra = {**vector.extra, "converted_from": "v", "model_type": model_type_of(model)}
    return replace(change, site="resid", extra=extra)


def import_gguf(path: str | os.PathLike, model=None) -> SteeringVector:
    """Read a control-vector GGUF into a ``resid`` :class:`SteeringVector`; check it against ``model``.

    The file carries no config fingerprint, so the check is by shape and layer count.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise VectorError(f"no control-vector file at {str(path)!r}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct.error/IndexError on malformed files
        raise VectorError(f"cannot read {str(path)!r} as GGUF: {_first_line(exc)}") from None
    arch = _string_field(reader, "general.architecture")
    if arch is not None and arch != ARCH:
        raise VectorError(
            f"{str(path)!r} is a GGUF of architecture {arch!r}, not a control vector ({ARCH!r})"
        )
    hint = _string_field(reader, f"{ARCH}.model_hint")
    directions = {}
    for tensor in reader.tensors:
        if not tensor.name.startswith("direction."):
            continue
        index = tensor.name.partition(".")[2]
        if not index.isdigit():
            raise VectorError(f"{str(path)!r} has tensor {tensor.name!r}; expected direction.N with N >= 1")
        data = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        directions[int(index)] = torch.from_numpy(data.copy())
    if not directions:
        raise VectorError(f"{str(path)!r} has no direction.N tensors: not a control vector")
    if 0 in directions:
        raise VectorError(
            f"{str(path)!r} has direction.0, which llama.cpp rejects (block 0 has no control vector)"
        )
    vec = SteeringVector(
        directions=directions,
        site="resid",
        model_name=hint,
        fingerprint=None,
        method="gguf import",
        data=[{"path": str(path), "sha256": _sha256(path)}],
        extra={"model_hint": hint or ""},
    )
    if model is not None:
        vec.check(model)
    return vec


def _model_type_hint(vector: SteeringVector) -> str:
    return vector.extra.get("model_hint") or (vector.model_name or "unknown")


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not len(field.parts):
        return None
    return bytes(field.parts[-1]).decode("utf-8", errors="replace")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
