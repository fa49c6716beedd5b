"""Specification of vsteer.models: loading, the GGUF cache, embedded models, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vsteer.errors import ModelError, VsteerError
from vsteer.models import (
    EMBEDDED_MODELS,
    _materialised,
    cache_dir,
    config_fingerprint,
    format_model_info,
    load_model,
    model_info,
    resolve_model_name,
)

DEAD_PID = 2**22 + 12345  # above Linux's pid_max default, so never a live process


def _tiny_config(**overrides) -> LlamaConfig:
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaConfig(**{**fields, **overrides})


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (no hub): 60 words plus specials, no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(60)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    directory = tmp_path / "tiny-llama"
    LlamaForCausalLM(_tiny_config()).save_pretrained(directory)
    _tiny_tokenizer().save_pretrained(directory)
    return directory


def _single_line_error(call) -> str:
    with pytest.raises(ModelError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Names and the cache location


def test_cache_dir_follows_vsteer_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VSTEER_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_cache_dir_defaults_to_home_cache(monkeypatch):
    monkeypatch.delenv("VSTEER_CACHE", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "vsteer"


def test_embedded_models_are_smollm2_and_gemma3():
    assert list(EMBEDDED_MODELS) == ["smollm2-135m-instruct", "gemma3-270m"]
    assert "Gemma Terms of Use" in EMBEDDED_MODELS["gemma3-270m"]


def test_resolve_model_name_canonicalises_embedded_paths_and_hub_ids(tmp_path):
    assert resolve_model_name("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert resolve_model_name(tmp_path) == str(tmp_path.resolve())
    assert resolve_model_name("org/some-model") == "org/some-model"


def test_resolve_model_name_rejects_empty_name():
    assert "non-empty" in _single_line_error(lambda: resolve_model_name("  "))


def test_errors_are_value_errors():
    assert issubclass(ModelError, VsteerError) and issubclass(VsteerError, ValueError)


# ---------------------------------------------------------------------------------------------
# Fingerprints


def test_fingerprint_is_equal_for_equal_shapes_and_ignores_other_fields():
    assert config_fingerprint(_tiny_config()) == config_fingerprint(
        _tiny_config(rope_theta=5.0, attention_dropout=0.1)
    )


@pytest.mark.parametrize(
    "change",
    [dict(hidden_size=64), dict(num_hidden_layers=3), dict(num_key_value_heads=4), dict(vocab_size=65)],
)
def test_fingerprint_changes_with_any_shape_field(change):
    assert config_fingerprint(_tiny_config()) != config_fingerprint(_tiny_config(**change))


def test_fingerprint_fills_implicit_kv_heads_and_head_dim():
    implicit = _tiny_config(num_key_value_heads=None)
    explicit = _tiny_config(num_key_value_heads=4, head_dim=8)
    assert config_fingerprint(implicit) == config_fingerprint(explicit)


def test_fingerprint_of_model_is_that_of_its_config():
    model = LlamaForCausalLM(_tiny_config())
    assert config_fingerprint(model) == config_fingerprint(model.config)
    assert len(config_fingerprint(model)) == 16


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line each


def test_unknown_model_name_names_every_route_it_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _single_line_error(lambda: load_model("no-such-model-xyz"))
    assert message.startswith(
        "unknown model 'no-such-model-xyz': not an embedded model (smollm2-135m-instruct, gemma3-270m)"
    )
    assert "not a local directory or .gguf file" in message
    assert "could not be loaded from the Hugging Face hub (HF_HUB_OFFLINE is set" in message


def test_unknown_model_name_close_to_an_embedded_one_suggests_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "did you mean 'gemma3-270m'?" in _single_line_error(lambda: load_model("gemma3-270"))


def test_missing_gguf_file_is_one_line(tmp_path):
    path = tmp_path / "absent.gguf"
    assert _single_line_error(lambda: load_model(str(path))) == f"GGUF file not found: {path}"


def test_missing_local_directory_is_one_line(tmp_path):
    path = tmp_path / "absent"
    assert _single_line_error(lambda: load_model(str(path))) == f"model directory not found: {path}"


def test_existing_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    assert "is a file but not a .gguf file" in _single_line_error(lambda: load_model(str(path)))


def test_unknown_dtype_is_refused(tiny_model_dir):
    assert "got 'float33'" in _single_line_error(lambda: load_model(str(tiny_model_dir), dtype="float33"))


def test_unknown_device_is_refused(tiny_model_dir):
    assert "got 'gpu0'" in _single_line_error(lambda: load_model(str(tiny_model_dir), device="gpu0"))


# ---------------------------------------------------------------------------------------------
# Local directories


def test_local_directory_loads_model_and_tokenizer(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert tokenizer("w1 w2").input_ids == [4, 5]
    assert resolve_model_name(model) == str(tiny_model_dir.resolve())


def test_local_directory_tokenizer_pads_left_with_eos_when_it_has_no_pad(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert (tokenizer.padding_side, tokenizer.pad_token) == ("left", "</s>")
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id


def test_local_directory_loads_in_requested_dtype(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_pickled_weights_are_refused(tiny_model_dir):
    state = LlamaForCausalLM(_tiny_config()).state_dict()
    torch.save(state, tiny_model_dir / "pytorch_model.bin")
    (tiny_model_dir / "model.safetensors").unlink()
    message = _single_line_error(lambda: load_model(str(tiny_model_dir)))
    assert message.startswith(
        f"could not load a causal LM with tokenizer and safetensors weights from {tiny_model_dir}"
    )


def test_model_info_reports_shapes_and_parameters(tiny_model_dir):
    info = model_info(str(tiny_model_dir))
    expected = dict(layers=2, query_heads=4, kv_heads=2, head_dim=8, d_model=32, d_mlp=64, vocab_size=64)
    assert {k: info[k] for k in expected} == expected
    assert info["parameters"] == sum(p.numel() for p in LlamaForCausalLM(_tiny_config()).parameters())


def test_format_model_info_prints_one_fact_per_line(tiny_model_dir):
    text = format_model_info(model_info(str(tiny_model_dir)))
    assert "key/value heads: 2" in text.splitlines()
    assert "query heads:     4" in text.splitlines()


# ---------------------------------------------------------------------------------------------
# The cache is written atomically


def _write_complete(tmp: Path) -> dict:
    (tmp / "weights").write_text("complete")
    return {}


def test_cache_directory_is_built_once_then_reused(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        return _write_complete(tmp)

    first = _materialised(tmp_path, "m", build)
    second = _materialised(tmp_path, "m", build)
    assert first == second == tmp_path / "models" / "m"
    assert len(calls) == 1 and (first / "weights").read_text() == "complete"


def test_failed_build_leaves_neither_final_nor_temporary_directory(tmp_path):
    def build(tmp):
        (tmp / "weights").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        _materialised(tmp_path, "m", build)
    assert list((tmp_path / "models").iterdir()) == []


def test_partial_final_directory_without_marker_is_rebuilt(tmp_path):
    partial = tmp_path / "models" / "m"
    partial.mkdir(parents=True)
    (partial / "weights").write_text("half")
    assert (_materialised(tmp_path, "m", _write_complete) / "weights").read_text() == "complete"


def test_temporary_directory_of_a_dead_run_is_removed(tmp_path):
    leftover = tmp_path / "models" / f".m.tmp-{DEAD_PID}-abc"
    leftover.mkdir(parents=True)
    _materialised(tmp_path, "m", _write_complete)
    assert not leftover.exists()


def test_temporary_directory_of_a_live_run_is_kept(tmp_path):
    live = tmp_path / "models" / f".m.tmp-{os.getppid()}-abc"
    live.mkdir(parents=True)
    _materialised(tmp_path, "m", _write_complete)
    assert live.exists()


def test_run_killed_while_building_leaves_no_cache_that_is_used(tmp_path):
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from vsteer.models import _materialised

        def build(tmp):
            (tmp / "weights").write_text("half")
            print("building", flush=True)
            time.sleep(60)

        _materialised(Path({str(tmp_path)!r}), "m", build)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "building"
    proc.kill()
    proc.wait()
    models = tmp_path / "models"
    assert not (models / "m").exists()
    assert len(list(models.glob(".m.tmp-*"))) == 1
    assert (_materialised(tmp_path, "m", _write_complete) / "weights").read_text() == "complete"
    assert [p.name for p in models.iterdir()] == ["m"]


# ---------------------------------------------------------------------------------------------
# Any GGUF file (a tiny one written here with the gguf package)


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, the base vocabulary of byte-level BPE."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _write_tiny_gguf(path: Path) -> None:
    """A 2-layer llama GGUF with random float32 weights and a 261-token byte-level BPE tokenizer."""
    import gguf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + _byte_level_alphabet() + ["he", "Ġt"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(["h e", "Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), 32), "output_norm.weight": (32,)}
    for i in range(2):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (32,),
            f"blk.{i}.ffn_norm.weight": (32,),
            f"blk.{i}.attn_q.weight": (32, 32),
            f"blk.{i}.attn_k.weight": (16, 32),
            f"blk.{i}.attn_v.weight": (16, 32),
            f"blk.{i}.attn_output.weight": (32, 32),
            f"blk.{i}.ffn_gate.weight": (64, 32),
            f"blk.{i}.ffn_up.weight": (64, 32),
            f"blk.{i}.ffn_down.weight": (32, 64),
        }
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_any_gguf_file_is_materialised_as_float32_safetensors(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path)
    model, tokenizer = load_model(str(path), cache_dir=tmp_path / "cache")
    (directory,) = (tmp_path / "cache" / "models").iterdir()
    assert directory.name.startswith("gguf-tiny-")
    assert (directory / "model.safetensors").is_file() and not list(directory.glob("*.bin"))
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    assert (model.config.num_hidden_layers, model.dtype, tokenizer.padding_side) == (2, torch.float32, "left")
    assert tokenizer.decode(tokenizer("the").input_ids) == "the"
    assert resolve_model_name(model) == str(path.resolve())


# ---------------------------------------------------------------------------------------------
# The embedded default, SmolLM2-135M-Instruct, materialised into a fresh cache


@pytest.fixture(scope="module")
def fresh_smollm2(tmp_path_factory):
    """Load the default model into an empty cache seeded with what a killed run leaves behind:
    a temporary directory of a dead process and a final directory without its marker."""
    root = tmp_path_factory.mktemp("vsteer-cache")
    models = root / "models"
    stale = models / f".smollm2-135m-instruct.tmp-{DEAD_PID}-x"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"garbage")
    partial = models / "smollm2-135m-instruct"
    partial.mkdir()
    (partial / "config.json").write_text("{not json")
    started = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m-instruct", cache_dir=root)
    return dict(
        root=root, model=model, tokenizer=tokenizer, seconds=time.perf_counter() - started, stale=stale
    )


@pytest.mark.slow
def test_first_load_materialises_float32_safetensors_with_tokenizer(fresh_smollm2):
    directory = fresh_smollm2["root"] / "models" / "smollm2-135m-instruct"
    names = {p.name for p in directory.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "vsteer-model.json"} <= names
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    print(f"first load of smollm2-135m-instruct (materialising): {fresh_smollm2['seconds']:.1f} s")


@pytest.mark.slow
def test_first_load_ignores_and_cleans_what_a_killed_run_left(fresh_smollm2):
    models = fresh_smollm2["root"] / "models"
    assert not fresh_smollm2["stale"].exists()
    assert [p.name for p in models.iterdir()] == ["smollm2-135m-instruct"]


@pytest.mark.slow
def test_second_load_from_cache_takes_under_2_s(fresh_smollm2):
    started = time.perf_counter()
    model, _ = load_model("smollm2-135m-instruct", cache_dir=fresh_smollm2["root"])
    seconds = time.perf_counter() - started
    print(f"cached load of smollm2-135m-instruct: {seconds:.2f} s")
    assert seconds < 2.0
    assert model.config.num_hidden_layers == 30


@pytest.mark.slow
def test_smollm2_tokenizer_pads_left_with_im_end(fresh_smollm2):
    tokenizer = fresh_smollm2["tokenizer"]
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.padding_side) == ("<|im_end|>", 2, "left")
    assert tokenizer.eos_token_id == fresh_smollm2["model"].generation_config.eos_token_id == 2


def _chat(model, tokenizer, question: str, max_new_tokens: int = 20) -> str:
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_answers_the_capital_of_france_greedily(fresh_smollm2):
    assert "Paris" in _chat(
        fresh_smollm2["model"], fresh_smollm2["tokenizer"], "What is the capital of France?"
    )


@pytest.mark.slow
def test_smollm2_batched_generation_matches_single_prompt(fresh_smollm2):
    model, tokenizer = fresh_smollm2["model"], fresh_smollm2["tokenizer"]
    prompts = ["The capital of France is", "Hello"]
    with torch.no_grad():
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        batched = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
        single = tokenizer(prompts[1:], return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=4, do_sample=False)[:, single["input_ids"].shape[1] :]
    assert tokenizer.decode(batched[1]) == tokenizer.decode(alone[0])


@pytest.mark.slow
def test_smollm2_model_info(fresh_smollm2, monkeypatch):
    monkeypatch.setenv("VSTEER_CACHE", str(fresh_smollm2["root"]))
    info = model_info("smollm2-135m-instruct")
    expected = dict(
        family="llama", layers=30, query_heads=9, kv_heads=3, head_dim=64, d_model=576, parameters=134_515_008
    )
    assert {k: info[k] for k in expected} == expected


# ---------------------------------------------------------------------------------------------
# The second embedded model, Gemma 3 270M (shared default cache: materialised once per machine)


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3-270m")


@pytest.mark.slow
def test_gemma3_completes_a_fact(gemma3):
    model, tokenizer = gemma3
    inputs = tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


@pytest.mark.slow
def test_gemma3_chat_template_renders_gemma_turns(gemma3):
    _, tokenizer = gemma3
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.slow
def test_gemma3_chat_generation_is_non_empty_and_stops_at_end_of_turn(gemma3):
    model, tokenizer = gemma3
    assert model.generation_config.eos_token_id == [1, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    assert _chat(model, tokenizer, "What is the capital of France?").strip()


@pytest.mark.slow
def test_gemma3_pads_left_with_its_pad_token(gemma3):
    _, tokenizer = gemma3
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.padding_side) == ("<pad>", 0, "left")


@pytest.mark.slow
def test_loads_from_two_threads_then_one_more_work():
    """Two threads loading the embedded model at once (two comparisons driven side by side),
    then a third load in the same fresh process: transformers' import and loading swap
    process-wide state, so without vsteer's load lock the threads failed on a half-done lazy
    import, or the later load came out with meta tensors. A fresh process, since this process
    has imported everything already."""
    script = textwrap.dedent(
        """
        from concurrent.futures import ThreadPoolExecutor
        from vsteer.models import load_model
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: load_model("smollm2-135m-instruct"), range(2)))
        model, _ = load_model("smollm2-135m-instruct")
        assert not any(p.is_meta for p in model.parameters())
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
