"""``vsteer export-gguf-lora``: value-only PEFT LoRA -> llama.cpp LoRA GGUF.

Fast tests read the written file back with ``gguf.GGUFReader`` and recompute llama.cpp's update
(``alpha / r * B A``, ``r`` from the tensor shape) against PEFT's; the slow tests load the file
in llama.cpp itself (``llama-cpp-python``, built by ``make llamacpp``).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

import vsteer
from vsteer.cli import main
from vsteer.errors import VectorError
from vsteer.gguf_lora import GGUFLoraError, export_gguf_lora
from vsteer.lora import add_adapter


def _randomise_b(peft_model, seed: int = 0, std: float = 0.5) -> None:
    """Non-zero ``lora_B`` (rows of other roles in fused modules stay zero: the mask multiplies)."""
    from vsteer.lora import masked_modules

    masks = masked_modules(peft_model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in peft_model.get_base_model().named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                w = module.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=g) * std)
                if name in masks:
                    w.mul_(masks[name].to(w.dtype))


def _saved(peft_model, tmp_path, name="adapter"):
    out = tmp_path / name
    peft_model.save_pretrained(str(out))
    return out


def _read(path):
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    tensors = {t.name: np.array(t.data).reshape([int(x) for x in reversed(t.shape)]) for t in reader.tensors}
    return field, tensors


def _peft_module(peft_model, name):
    return peft_model.get_base_model().get_submodule(name)


def _llama_cpp_delta(tensors, gguf_name, alpha):
    """What llama.cpp adds to the weight: ``alpha / r * B A`` with ``r = lora_b.ne[0]`` ([out, in])."""
    a, b = tensors[f"{gguf_name}.lora_a"], tensors[f"{gguf_name}.lora_b"]
    return alpha / b.shape[1] * (b.astype(np.float64) @ a.astype(np.float64))


# --------------------------------------------------------------------------------------------
# the file
# --------------------------------------------------------------------------------------------
def test_export_writes_llama_cpp_adapter_metadata_names_and_shapes(tmp_path):
    model = make_tiny_model("llama")
    peft_model = add_adapter(model, "v", r=4)
    _randomise_b(peft_model)
    path = export_gguf_lora(_saved(peft_model, tmp_path), tmp_path / "a.gguf", model=model)
    field, tensors = _read(path)
    assert field("general.type") == "adapter"
    assert field("general.architecture") == "llama"
    assert field("adapter.type") == "lora"
    assert field("adapter.lora.alpha") == pytest.approx(8.0)
    expected = {f"blk.{i}.attn_v.weight.lora_{ab}" for i in range(3) for ab in "ab"}
    assert set(tensors) == expected
    kv_out = model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads)
    for i in range(3):
        assert tensors[f"blk.{i}.attn_v.weight.lora_a"].shape == (4, model.config.hidden_size)  # [r, in]
        assert tensors[f"blk.{i}.attn_v.weight.lora_b"].shape == (kv_out, 4)  # [out, r]
        module = _peft_module(peft_model, f"model.layers.{i}.self_attn.v_proj")
        np.testing.assert_array_equal(
            tensors[f"blk.{i}.attn_v.weight.lora_b"], module.lora_B["default"].weight.detach().numpy()
        )


def test_export_to_the_adapter_directory_by_default(tmp_path):
    model = make_tiny_model("qwen2")
    peft_model = add_adapter(model, "v", r=2)
    adapter = _saved(peft_model, tmp_path)
    path = export_gguf_lora(adapter, model=model)
    assert path == adapter / "adapter.gguf"
    assert _read(path)[0]("general.architecture") == "qwen2"


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_and_alpha_patterns_reproduce_peft_scaling(tmp_path, rslora):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model("llama")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["v_proj"],
        rank_pattern={"layers.1.self_attn.v_proj": 2},
        alpha_pattern={"layers.2.self_attn.v_proj": 3.0},
        use_rslora=rslora,
    )
    peft_model = get_peft_model(model, config)
    _randomise_b(peft_model, seed=3)
    path = export_gguf_lora(_saved(peft_model, tmp_path), tmp_path / "a.gguf", model=model)
    field, tensors = _read(path)
    alpha = field("adapter.lora.alpha")
    scalings = []
    for i in range(3):
        module = _peft_module(peft_model, f"model.layers.{i}.self_attn.v_proj")
        peft_delta = module.get_delta_weight("default").detach().double().numpy()  # scaling * B A, [out, in]
        ours = _llama_cpp_delta(tensors, f"blk.{i}.attn_v.weight", alpha)
        np.testing.assert_allclose(ours, peft_delta, rtol=1e-5, atol=1e-6)
        scalings.append(module.scaling["default"])
    ranks = [tensors[f"blk.{i}.attn_v.weight.lora_b"].shape[1] for i in range(3)]
    assert ranks == [4, 2, 4]
    root = math.sqrt if rslora else float
    assert scalings == pytest.approx([8 / root(4), 8 / root(2), 3 / root(4)])  # the patterns took effect


def test_fused_qkv_exports_attn_qkv_with_zero_query_and_key_rows(tmp_path):
    from vsteer.arch import get_arch

    model = make_tiny_model("phi3")
    peft_model = add_adapter(model, "v", r=3)
    _randomise_b(peft_model, seed=1)
    path = export_gguf_lora(_saved(peft_model, tmp_path), tmp_path / "a.gguf", model=model)
    field, tensors = _read(path)
    assert field("general.architecture") == "phi3"
    assert set(tensors) == {f"blk.{i}.attn_qkv.weight.lora_{ab}" for i in range(3) for ab in "ab"}
    arch = get_arch(model)
    v_rows = arch.rows("v").numpy()
    for i in range(3):
        b = tensors[f"blk.{i}.attn_qkv.weight.lora_b"]
        assert b.shape == (arch.fused_width(), 3)
        others = np.setdiff1d(np.arange(b.shape[0]), v_rows)
        assert not b[others].any()
        assert np.abs(b[v_rows]).min() > 0
        peft_delta = _peft_module(peft_model, f"model.layers.{i}.self_attn.qkv_proj").get_delta_weight(
            "default"
        )
        ours = _llama_cpp_delta(tensors, f"blk.{i}.attn_qkv.weight", field("adapter.lora.alpha"))
        np.testing.assert_allclose(ours, peft_delta.detach().double().numpy(), rtol=1e-5, atol=1e-6)


def test_cli_exports_and_refuses_an_existing_file_in_one_line(tmp_path, capsys, monkeypatch):
    import vsteer.models

    model = make_tiny_model("llama")
    base = make_tiny_model("llama")  # what --model loads (a tiny model has no tokenizer to load it with)
    monkeypatch.setattr(
        vsteer.models, "load_model", lambda name, **kw: (base, None) if name == "tiny" else 1 / 0
    )
    peft_model = add_adapter(model, "v", r=2)
    _randomise_b(peft_model)
    adapter = _saved(peft_model, tmp_path)
    out = tmp_path / "x.gguf"
    args = ["export-gguf-lora", str(adapter), "--out", str(out), "--model", "tiny"]
    assert main(args) == 0
    before = out.read_bytes()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists" in err
    assert out.read_bytes() == before
    assert main([*args, "--overwrite"]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left
    (tmp_path / "adir").mkdir()  # found in review: an IsADirectoryError traceback after the export
    to_dir = [
        "export-gguf-lora",
        str(adapter),
        "--out",
        str(tmp_path / "adir"),
        "--model",
        "tiny",
        "--overwrite",
    ]
    assert main(to_dir) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a directory" in err
    assert list((tmp_path / "adir").iterdir()) == []


# --------------------------------------------------------------------------------------------
# refusals: one line each, nothing written
# --------------------------------------------------------------------------------------------
def _edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"bias": "all"}, "bias='all'"),
        ({"lora_bias": True}, "lora_bias"),
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "only LORA"),
    ],
)
def test_inexpressible_configs_are_refused_in_one_line(tmp_path, changes, message):
    model = make_tiny_model("llama")
    adapter = _saved(add_adapter(model, "v", r=2), tmp_path)
    _edit_config(adapter, **changes)
    with pytest.raises(GGUFLoraError, match=message) as info:
        export_gguf_lora(adapter, tmp_path / "a.gguf", model=model)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "a.gguf").exists()


def test_a_bias_tensor_in_the_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_tiny_model("llama")
    adapter = _saved(add_adapter(model, "v", r=2), tmp_path)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.0.self_attn.v_proj.bias"] = torch.zeros(16)
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(GGUFLoraError, match="not a lora_A/lora_B weight"):
        export_gguf_lora(adapter, tmp_path / "a.gguf", model=model)


def test_modules_other_than_value_projections_are_refused(tmp_path):
    model = make_tiny_model("llama")
    adapter = _saved(add_adapter(model, "vo", r=2), tmp_path)
    with pytest.raises(GGUFLoraError, match=r"o_proj' is not a value projection"):
        export_gguf_lora(adapter, tmp_path / "a.gguf", model=model)


def test_fused_adapter_that_moved_query_rows_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model("phi3")
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["qkv_proj"]))
    _randomise_b(peft_model)  # no mask: Q and K rows move too
    with pytest.raises(GGUFLoraError, match="non-zero Q/K rows"):
        export_gguf_lora(_saved(peft_model, tmp_path), tmp_path / "a.gguf", model=model)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_unsupported_architecture_is_refused(tmp_path, family):
    model = make_tiny_model(family)
    adapter = _saved(add_adapter(model, "v", r=2), tmp_path)
    with pytest.raises(GGUFLoraError, match="unsupported architecture for llama.cpp LoRA export"):
        export_gguf_lora(adapter, tmp_path / "a.gguf", model=model)


def test_adapter_for_another_model_is_refused(tmp_path):
    model = make_tiny_model("llama")
    adapter = _saved(add_adapter(model, "v", r=2), tmp_path)
    other = make_tiny_model("qwen2")  # same layer names, a different model
    bigger = other.__class__(other.config.__class__(**{**other.config.to_dict(), "hidden_size": 64}))
    with pytest.raises(GGUFLoraError, match="adapter from another model"):
        export_gguf_lora(adapter, tmp_path / "a.gguf", model=bigger)


def test_value_site_vector_is_refused_as_a_control_vector(tmp_path):
    from vsteer.gguf_io import export_gguf
    from vsteer.vectors import SteeringVector

    vec = SteeringVector(directions={1: torch.ones(2, 8)}, site="v", model_name="m", fingerprint=None)
    with pytest.raises(VectorError, match="added to a block's output") as info:
        export_gguf(vec, tmp_path / "v.gguf")
    assert "\n" not in str(info.value) and "--model" in str(info.value)
    assert not (tmp_path / "v.gguf").exists()
    llama = make_tiny_model("llama")  # sequential blocks: refused even with the model
    vec = SteeringVector.for_model(llama, {1: torch.ones(2, 8)}, site="v")
    with pytest.raises(VectorError, match="on llama: its blocks are sequential") as info:
        export_gguf(vec, tmp_path / "v.gguf", model=llama)
    assert "\n" not in str(info.value) and not (tmp_path / "v.gguf").exists()


def _parallel_models():
    import transformers

    neox = make_tiny_model("gpt_neox")  # use_parallel_residual defaults to True
    sequential = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(**{**neox.config.to_dict(), "use_parallel_residual": False})
    ).eval()
    torch.manual_seed(3)
    phi = transformers.PhiForCausalLM(
        transformers.PhiConfig(
            vocab_size=neox.config.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    ).eval()
    return {"gpt_neox": neox, "phi": phi}, sequential


def test_value_vector_exports_exactly_on_parallel_residual_models(tmp_path):
    """On x + attn(ln x) + mlp(ln x) blocks the exported direction.l = W_O v gives, added at block
    l's output, the logits of the v vector itself (every position, padding masked); sequential
    blocks and layer 0 are refused."""
    from vsteer.arch import get_arch, parallel_residual
    from vsteer.gguf_io import export_gguf, import_gguf
    from vsteer.hooks import site_shape
    from vsteer.vectors import SteeringVector

    parallel, sequential = _parallel_models()
    assert not parallel_residual(sequential) and not parallel_residual(make_tiny_model("llama"))
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    for family, model in parallel.items():
        assert parallel_residual(model), family
        g = torch.Generator().manual_seed(7)
        shape = site_shape(get_arch(model), "v")
        vec = SteeringVector.for_model(
            model, {1: torch.randn(shape, generator=g), 2: torch.randn(shape, generator=g)}, "v"
        )
        out = export_gguf(vec, tmp_path / f"{family}.gguf", model=model)
        back = import_gguf(out, model)
        assert back.site == "resid" and back.layers == [1, 2]
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=mask).logits
            with vsteer.steer(model, vec, 1.5, as_bias=False):
                want = model(input_ids=ids, attention_mask=mask).logits
            with vsteer.steer(model, back, 1.5):
                got = model(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        assert (want - plain)[real].abs().max() > 1e-2, family  # the vector does something
        torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
        with pytest.raises(VectorError, match="layer 0 cannot be exported"):
            export_gguf(
                SteeringVector.for_model(model, {0: torch.ones(shape)}, "v"), tmp_path / "z.gguf", model=model
            )
    vec = SteeringVector.for_model(sequential, {1: torch.ones(site_shape(get_arch(sequential), "v"))}, "v")
    with pytest.raises(VectorError, match="sequential"):
        export_gguf(vec, tmp_path / "s.gguf", model=sequential)
    assert not (tmp_path / "s.gguf").exists() and not (tmp_path / "z.gguf").exists()


# --------------------------------------------------------------------------------------------
# llama.cpp itself (slow: the embedded SmolLM2 GGUF; llama-cpp-python from `make llamacpp`)
# --------------------------------------------------------------------------------------------
# Two bases for llama.cpp. (1) The embedded Q4_1 GGUF: llama.cpp multiplies Q4_1 weights by
# activations it quantises to 8 bits (Q8_1), PyTorch runs the same weights dequantised to float32,
# so even the base logits differ (max ~0.6 over the vocabulary) and the adapter's logit *changes*
# (adapted minus base, each engine against its own base) carry that noise: their per-prompt
# correlation exceeds 0.99 only when the adapter moves the logits well above it (measured: ~0.98
# for an adapter moving the largest logit by ~4, ~0.997 by ~16), and near-ties may flip the adapted
# greedy token, so "most" is 75% of the prompts. The Q4_1 criterion is the median over prompts
# (> 0.99) with a floor for every prompt (> 0.95): a fresh-clone CI run (2026-12-02) measured one
# prompt at 0.976 (median 0.996) where the development run had its minimum at 0.993, so a per-prompt
# 0.99 reads the quantisation noise, not the export. Until 2026-12-02 the adapter itself was a new
# draw in every run (PEFT's lora_A from the unseeded global generator): the per-prompt minima seen
# were 0.905 (a CI run that failed), 0.976, 0.980, 0.986 and 0.993; the adapter is now fixed
# (seed 0: minimum 0.991, median 0.996, same top-1 0.96). (2) The same weights dequantised to an f32
# GGUF: no quantisation left, so the changes must agree to 0.999 on every prompt and every greedy
# token must match: that is the test of the export itself.
MIN_CORRELATION = 0.99
MIN_CORRELATION_EVERY_PROMPT = 0.95
MIN_SAME_TOP1 = 0.75
MIN_CORRELATION_F32 = 0.999
N_PROMPTS = 24


def _value_lora_on_smollm2(tmp_path):
    """A PEFT value-only LoRA on the embedded model with rank/alpha patterns and rsLoRA, so that the
    exported file needs the per-module scales folded into lora_b; B set to random non-zero values."""
    from peft import LoraConfig, get_peft_model

    from vsteer.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["v_proj"],
        rank_pattern={r"layers\.(1|7|19)\.self_attn\.v_proj": 4},
        alpha_pattern={r"layers\.(2|7)\.self_attn\.v_proj": 4.0},
        use_rslora=True,
    )
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator: one adapter in every run
    peft_model = get_peft_model(model, config).eval()
    _randomise_b(peft_model, seed=0, std=0.15)
    return peft_model, tokenizer, _saved(peft_model, tmp_path)


def _llama(path, lora=None):
    from llama_cpp import Llama

    return Llama(
        model_path=str(path), lora_path=None if lora is None else str(lora), logits_all=True,
        n_ctx=128, n_batch=128, n_threads=2, seed=0, verbose=False,
    )  # fmt: skip


def _llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1], dtype=np.float64)


def _f32_copy(q_gguf, out):
    """The GGUF at ``q_gguf`` with every tensor dequantised to float32 (metadata copied)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(q_gguf))
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    writer.add_file_type(0)  # all F32
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        writer.add_tensor(t.name, dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _compare(peft_model, tokenizer, base_gguf, exported, prompts):
    """Per prompt: correlation of the next-token logit changes, same adapted top-1, PyTorch's max change."""
    base_cpp, lora_cpp = _llama(base_gguf), _llama(base_gguf, exported)
    correlations, same_top1, moved = [], [], []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            x = torch.tensor([ids])
            lora_pt = peft_model(input_ids=x).logits[0, -1].double().numpy()
            with peft_model.disable_adapter():
                base_pt = peft_model(input_ids=x).logits[0, -1].double().numpy()
        base_c, lora_c = _llama_logits(base_cpp, ids), _llama_logits(lora_cpp, ids)
        correlations.append(float(np.corrcoef(lora_pt - base_pt, lora_c - base_c)[0, 1]))
        same_top1.append(int(lora_pt.argmax()) == int(lora_c.argmax()))
        moved.append(float(np.abs(lora_pt - base_pt).max()))
    print(
        f"{base_gguf.name}: logit-change correlation min {min(correlations):.4f} median "
        f"{np.median(correlations):.4f}; same adapted top-1 {np.mean(same_top1):.2f}; "
        f"max |change| median {np.median(moved):.2f}"
    )
    return np.array(correlations), np.array(same_top1), np.array(moved)


@pytest.mark.slow
def test_llama_cpp_moves_logits_like_pytorch_with_the_exported_adapter(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is built and installed by `make llamacpp`")
    from vsteer.data import neutral_prompts
    from vsteer.models import _locate_smollm2

    peft_model, tokenizer, adapter = _value_lora_on_smollm2(tmp_path)
    exported = export_gguf_lora(adapter, tmp_path / "v.gguf", model=peft_model.get_base_model())
    q4 = _locate_smollm2(tmp_path)
    prompts = neutral_prompts(N_PROMPTS)
    corr, top1, moved = _compare(peft_model, tokenizer, q4, exported, prompts)
    assert np.median(moved) > 1.0, "the adapter barely moves the logits: the comparison would prove nothing"
    assert np.median(corr) > MIN_CORRELATION and corr.min() > MIN_CORRELATION_EVERY_PROMPT, corr
    assert top1.mean() >= MIN_SAME_TOP1
    f32 = _f32_copy(q4, tmp_path / "smollm2-f32.gguf")
    corr, top1, _ = _compare(peft_model, tokenizer, f32, exported, prompts[:8])
    assert corr.min() > MIN_CORRELATION_F32
    assert top1.all()


@pytest.mark.slow
def test_llama_cpp_loads_the_exported_adapter_with_its_tensors(tmp_path):
    """llama.cpp's own loader accepts the file on its base and reads back the metadata we wrote."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is built and installed by `make llamacpp`")
    import ctypes

    import llama_cpp

    from vsteer.models import _locate_smollm2

    peft_model, _, adapter = _value_lora_on_smollm2(tmp_path)
    exported = export_gguf_lora(adapter, tmp_path / "v.gguf", model=peft_model.get_base_model())
    llm = _llama(_locate_smollm2(tmp_path), exported)
    lora = llama_cpp.llama_adapter_lora_init(llm._model.model, str(exported).encode())
    assert lora is not None
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_adapter_meta_val_str(lora, b"adapter.type", buf, len(buf))
    assert buf.value[:n] == b"lora"


LLAMACPP_VERSION = "0.3.36"  # the Makefile's LLAMACPP_VERSION


def _llama_cpp_sdist():
    from vsteer.models import cache_dir

    path = cache_dir() / "wheels" / f"llama_cpp_python-{LLAMACPP_VERSION}.tar.gz"
    if not path.is_file():
        pytest.skip(f"{path} is missing: `make llamacpp` keeps the sdist whose converter this test uses")
    return path


def _converted(model, tmp_path, name: str, tokenizer_class: str | None = None, converter_fix=None):
    """``model`` (random weights) with SmolLM2's BPE tokenizer, converted to an f32 GGUF by
    llama.cpp's own convert_hf_to_gguf.py from the llama-cpp-python sdist. ``converter_fix``:
    ``(file, old, new)``, one text replacement in the converter (asserted to apply)."""
    import subprocess
    import sys
    import tarfile

    from vsteer.models import load_model

    hf = tmp_path / name  # not the family's name: llama.cpp may then expect its own special tokens
    model.save_pretrained(hf)
    _, tokenizer = load_model("smollm2-135m-instruct", device="cpu")
    tokenizer.save_pretrained(hf)
    if tokenizer_class:
        tc_path = hf / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        tc["tokenizer_class"] = tokenizer_class
        tc_path.write_text(json.dumps(tc))
    src = tmp_path / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").is_file():
        prefix = f"llama_cpp_python-{LLAMACPP_VERSION}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with tarfile.open(_llama_cpp_sdist()) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)
            ]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(src, members=members, filter="data")
    if converter_fix:
        file, old, new = converter_fix
        text = (src / file).read_text()
        assert old in text, f"{file} changed: the fix for it no longer applies"
        (src / file).write_text(text.replace(old, new))
    out = tmp_path / f"{name}-f32.gguf"
    run = subprocess.run(
        [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outfile", str(out), "--outtype", "f32"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return tokenizer, out


def _sharpen(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)  # random init is ~0.02: too flat to tell next tokens apart
    return model


def _tiny_phi3_gguf(tmp_path):
    """A tiny random Phi-3 (fused qkv_proj), converted to an f32 GGUF by llama.cpp's converter."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Phi3Config(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        original_max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = _sharpen(transformers.AutoModelForCausalLM.from_config(config).eval())
    # Phi3's converter reads BPE vocabularies for this tokenizer class
    tokenizer, out = _converted(model, tmp_path, "tiny-fused", tokenizer_class="GPT2Tokenizer")
    return model, tokenizer, out


def _tiny_parallel(family: str):
    """A tiny random parallel-residual model and the fix its llama.cpp converter needs (or None)."""
    import transformers

    torch.manual_seed(0)
    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    if family == "gpt_neox":
        config = transformers.GPTNeoXConfig(**common, rotary_pct=0.25, use_parallel_residual=True)
        # llama.cpp's GPT-NeoX converter (0.3.36's vendored copy) reads the config key rotary_pct,
        # which transformers 5's AutoConfig, through which it reads the config, no longer returns (it
        # is rope_parameters["partial_rotary_factor"] now): read that instead. Nothing else is touched.
        fix = (
            "conversion/gptneox.py",
            'self.hparams["rotary_pct"]',
            'self.hparams["rope_parameters"]["partial_rotary_factor"]',
        )
        return _sharpen(transformers.GPTNeoXForCausalLM(config).eval()), fix
    # Phi-1/2: attention and MLP both read ln(x). llama.cpp's phi2 loader expects n_ff = 4 * n_embd
    config = transformers.PhiConfig(**{**common, "intermediate_size": 256}, partial_rotary_factor=0.5)
    return _sharpen(transformers.PhiForCausalLM(config).eval()), None


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt_neox", "phi"])
def test_llama_cpp_applies_an_exported_value_vector_like_pytorch_on_parallel_blocks(tmp_path, family):
    """The parallel-residual export (direction.l = W_O v) run through llama.cpp itself: a tiny random
    GPT-NeoX / Phi-2 converted by llama.cpp's converter, the vsteer ``v`` vector exported with
    ``export_gguf`` and set with llama.cpp's own control-vector call, exactly as ``llama-cli
    --control-vector-scaled FILE S`` does (``direction.N`` at offset ``(N - 1) * n_embd``, scaled by S):
    llama.cpp's logits equal PyTorch's under ``vsteer.steer(model, vec, S)`` at the value site."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is built and installed by `make llamacpp`")
    import ctypes

    import llama_cpp

    from vsteer.arch import get_arch, parallel_residual
    from vsteer.data import neutral_prompts
    from vsteer.gguf_io import export_gguf
    from vsteer.hooks import site_shape
    from vsteer.vectors import SteeringVector

    model, fix = _tiny_parallel(family)
    config = model.config
    assert parallel_residual(model)
    tokenizer, base_gguf = _converted(model, tmp_path, "tiny-parallel", converter_fix=fix)
    g = torch.Generator().manual_seed(11)
    shape = site_shape(get_arch(model), "v")
    vec = SteeringVector.for_model(
        model, {1: torch.randn(shape, generator=g) * 0.5, 2: torch.randn(shape, generator=g) * 0.5}, "v"
    )
    scale = 1.5
    exported = export_gguf(vec, tmp_path / "v-as-control-vector.gguf", model=model)
    _, tensors = _read(exported)
    assert sorted(tensors) == ["direction.1", "direction.2"]
    n_embd, n_layer = config.hidden_size, config.num_hidden_layers
    data = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)  # layer 1 onwards, as llama.cpp reads it
    for name, t in tensors.items():
        layer = int(name.split(".")[1])
        data[(layer - 1) * n_embd : layer * n_embd] = scale * t.astype(np.float32)
    # the sensitivity check: the same directions one block too early (direction.l at block l - 1)
    # (direction.1 would land on block 0, which control vectors cannot reach: it is dropped there)
    early = np.zeros_like(data)
    early[:-n_embd] = data[n_embd:]
    base_cpp, steered_cpp, early_cpp = _llama(base_gguf), _llama(base_gguf), _llama(base_gguf)
    for llm, buf in ((steered_cpp, data), (early_cpp, early)):
        rc = llama_cpp.llama_set_adapter_cvec(  # what llama-cli --control-vector-scaled calls
            llm._ctx.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size, n_embd, 1, n_layer - 1
        )
        assert rc == 0
    worst_base, worst_change, moved, correlations, early_gap = 0.0, 0.0, [], [], []
    for prompt in neutral_prompts(8):
        ids = tokenizer(prompt)["input_ids"][:48]
        with torch.no_grad():
            x = torch.tensor([ids])
            base_pt = model(input_ids=x).logits[0, -1].double().numpy()
            with vsteer.steer(model, vec, scale, as_bias=False):
                steered_pt = model(input_ids=x).logits[0, -1].double().numpy()
        base_c, steered_c = _llama_logits(base_cpp, ids), _llama_logits(steered_cpp, ids)
        change_pt, change_c = steered_pt - base_pt, steered_c - base_c
        worst_base = max(worst_base, float(np.abs(base_c - base_pt).max()))
        worst_change = max(worst_change, float(np.abs(change_c - change_pt).max()))
        moved.append(float(np.abs(change_pt).max()))
        correlations.append(float(np.corrcoef(change_pt, change_c)[0, 1]))
        early_gap.append(float(np.abs(_llama_logits(early_cpp, ids) - base_c - change_pt).max()))
    print(
        f"{family} control vector: max |llama.cpp - PyTorch| base {worst_base:.2e}, of the change "
        f"{worst_change:.2e}; change correlation min {min(correlations):.6f}; max |change| median "
        f"{np.median(moved):.2f}; one block too early: max |difference| median {np.median(early_gap):.2f}"
    )
    assert np.median(moved) > 0.5, "the vector barely moves the logits: the comparison would prove nothing"
    # the engines differ on the model itself by ~1e-3 (f32 kernels; ggml's GELU): far below the change
    assert worst_base < 1e-2, "llama.cpp and PyTorch disagree on the base model itself"
    assert worst_change < 1e-2 and min(correlations) > MIN_CORRELATION_F32
    assert np.median(early_gap) > 50 * worst_change, "a misplaced vector would pass: the test proves nothing"


@pytest.mark.slow
def test_llama_cpp_applies_the_fused_qkv_v_slice_like_pytorch(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is built and installed by `make llamacpp`")
    from vsteer.data import neutral_prompts

    model, tokenizer, base_gguf = _tiny_phi3_gguf(tmp_path)
    peft_model = add_adapter(model, "v", r=4)
    _randomise_b(peft_model, seed=2, std=0.3)
    exported = export_gguf_lora(_saved(peft_model, tmp_path), tmp_path / "v.gguf", model=model)
    _, tensors = _read(exported)
    assert "blk.0.attn_qkv.weight.lora_b" in tensors
    base_cpp, lora_cpp = _llama(base_gguf), _llama(base_gguf, exported)
    correlations, same_top1, moved = [], [], []
    for prompt in neutral_prompts(N_PROMPTS):
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            x = torch.tensor([ids])
            lora_pt = peft_model(input_ids=x).logits[0, -1].double().numpy()
            with peft_model.disable_adapter():
                base_pt = peft_model(input_ids=x).logits[0, -1].double().numpy()
        base_c, lora_c = _llama_logits(base_cpp, ids), _llama_logits(lora_cpp, ids)
        correlations.append(float(np.corrcoef(lora_pt - base_pt, lora_c - base_c)[0, 1]))
        same_top1.append(int(lora_pt.argmax()) == int(lora_c.argmax()))
        moved.append(float(np.abs(lora_pt - base_pt).max()))
    print(
        f"phi3 fused: logit-change correlation min {min(correlations):.4f}; same adapted top-1 "
        f"{np.mean(same_top1):.2f}; max |change| median {np.median(moved):.2f}"
    )
    assert np.median(moved) > 0.5, "the adapter barely moves the logits: the comparison would prove nothing"
    assert min(correlations) > MIN_CORRELATION
    assert np.mean(same_top1) >= MIN_SAME_TOP1
