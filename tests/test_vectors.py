"""SteeringVector as data, extraction, GGUF interop: tiny models built in the test."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model

import vsteer
from vsteer.errors import DataError, SiteError, VectorError
from vsteer.extraction import Example, collect, direction, extract_sites
from vsteer.gguf_io import export_gguf, import_gguf
from vsteer.hooks import captured_forward, site_shape
from vsteer.vectors import SteeringVector


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


class CharTokenizer:
    """A tokenizer for tiny models: one token per character, ids 3..96, pad 0."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (ord(c) % 94) for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def _vec(model, site="v", layers=(1,), seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = site_shape(vsteer.get_arch(model), site)
    return SteeringVector.for_model(model, {layer: torch.randn(shape, generator=g) for layer in layers}, site)


PAIRS = [
    ("the film was a joy", "the film was a bore"),
    ("what a lovely day", "what an awful day"),
    ("great acting, great plot", "poor acting, poor plot"),
    ("i loved every minute", "i hated every minute"),
]


# ---- data: save / load / check ----------------------------------------------------------------
def test_save_load_round_trip_keeps_tensors_and_metadata(llama, tmp_path):
    vec = _vec(llama, layers=(0, 2))
    vec.data = [{"path": "caa/x.json", "sha256": "ab" * 32}]
    path = vec.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(path, llama)
    assert back.layers == [0, 2] and back.site == "v"
    assert all(torch.equal(vec[layer], back[layer]) for layer in vec.layers)
    assert back.metadata() == vec.metadata()


def test_save_writes_no_pickle(llama, tmp_path):
    path = _vec(llama).save(tmp_path / "v.safetensors")
    assert b"\x80\x04" not in path.read_bytes()[:8]  # safetensors starts with a JSON header length
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert "vsteer" in f.metadata()


def test_load_refuses_vector_of_another_model(llama, tmp_path):
    other = make_tiny_model("qwen2")
    other.config.hidden_size = 32
    path = _vec(make_tiny_model("gemma3"), layers=(1,)).save(tmp_path / "g.safetensors")
    with pytest.raises(VectorError, match="was made for model"):
        SteeringVector.load(path, llama)


def test_load_refuses_layer_outside_model(llama, tmp_path):
    vec = _vec(llama, layers=(1,))
    vec.fingerprint = None  # same shapes, but a deeper layer than this model has
    vec.directions = {7: vec[1]}
    with pytest.raises(VectorError, match="model has 3 layers"):
        SteeringVector.load(vec.save(tmp_path / "v.safetensors"), llama)


def test_check_refuses_wrong_site_shape(llama):
    vec = SteeringVector(directions={1: torch.zeros(5)}, site="resid")
    with pytest.raises(VectorError, match="site has shape"):
        vec.check(llama)


def test_nan_in_vector_is_refused():
    with pytest.raises(VectorError, match="NaN"):
        SteeringVector(directions={1: torch.tensor([1.0, math.nan])}, site="resid")


def test_unknown_site_is_refused():
    with pytest.raises(VectorError, match="unknown site 'value'"):
        SteeringVector(directions={1: torch.zeros(3)}, site="value")


def test_load_of_non_vector_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(VectorError, match="cannot read steering vector"):
        SteeringVector.load(bad)


# ---- arithmetic -----------------------------------------------------------------------------------
def test_linear_combination_is_per_layer(llama):
    happy, sad = _vec(llama, seed=1), _vec(llama, seed=2)
    mix = 0.7 * happy - 0.3 * sad
    assert torch.allclose(mix[1], 0.7 * happy[1] - 0.3 * sad[1])
    assert mix.site == "v" and mix.fingerprint == happy.fingerprint


def test_combination_across_sites_is_refused(llama):
    with pytest.raises(VectorError, match="different sites"):
        _vec(llama, "v") + _vec(llama, "k")


def test_combination_across_models_is_refused(llama):
    other = make_tiny_model("qwen2")
    with pytest.raises(VectorError, match="different models"):
        _vec(llama, "resid") + _vec(other, "resid")


def test_scaling_by_non_number_is_refused(llama):
    with pytest.raises(VectorError, match="scale must be a number, got 'big'"):
        _vec(llama) * "big"


def test_to_returns_a_copy(llama):
    vec = _vec(llama)
    half = vec.to(dtype=torch.float16)
    assert half[1].dtype == torch.float16 and vec[1].dtype == torch.float32
    half.directions[1].zero_()
    assert vec[1].abs().sum() > 0


# ---- extraction -----------------------------------------------------------------------------------
def test_mean_diff_is_the_mean_of_paired_differences(llama):
    tok = CharTokenizer()
    vec = vsteer.extract(llama, tok, PAIRS, site="v", layers=[0, 2], method="mean_diff", position="last")
    # by hand, one text at a time, full forward
    for layer in (0, 2):
        diffs = []
        for pos, neg in PAIRS:
            acts = [
                captured_forward(
                    llama, [("v", layer)], stop=False, input_ids=torch.tensor([tok(t)["input_ids"]])
                )
                for t in (pos, neg)
            ]
            diffs.append(acts[0][("v", layer)][0, -1] - acts[1][("v", layer)][0, -1])
        assert torch.allclose(vec[layer], torch.stack(diffs).mean(0), atol=1e-5)


def test_extraction_batches_with_padding_give_the_same_activations(llama):
    tok = CharTokenizer()
    texts = [p for pair in PAIRS for p in pair]
    batched = collect(llama, tok, texts, "resid", [1], "mean", batch_size=8)[1]
    alone = torch.cat([collect(llama, tok, [t], "resid", [1], "mean", batch_size=1)[1] for t in texts])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_position_rules_read_answer_completion_and_mean():
    from vsteer.extraction import _weights

    assert _weights("answer", 5, 3).tolist() == [0, 0, 0, 0, 1]
    assert _weights("completion", 5, 3).tolist() == [0, 0, 0, 0.5, 0.5]
    assert torch.allclose(_weights("mean", 4, 4), torch.full((4,), 0.25))
    with pytest.raises(DataError, match="needs a completion"):
        _weights("answer", 5, 5)


def test_chat_pairs_default_to_the_answer_token(llama):
    tok = CharTokenizer()
    q = {"role": "user", "content": "pick one"}
    pairs = [([q, {"role": "assistant", "content": "(A"}], [q, {"role": "assistant", "content": "(B"}])] * 2
    vec = vsteer.extract(llama, tok, pairs, site="resid", layers=1)
    assert vec.position == "answer"
    ex = vsteer.extract(llama, tok, [(Example("pick one", "(A"), Example("pick one", "(B"))] * 2, "resid", 1)
    assert ex.position == "answer"


@pytest.mark.parametrize("method", ["pca_diff", "logistic"])
def test_direction_methods_point_from_negative_to_positive(method):
    g = torch.Generator().manual_seed(0)
    axis = torch.zeros(8)
    axis[3] = 1.0
    neg = torch.randn(40, 8, generator=g)
    pos = neg + 2.0 * axis + 0.3 * torch.randn(40, 8, generator=g)
    d = direction(pos, neg, method)
    assert torch.nn.functional.cosine_similarity(d, axis, dim=0) > 0.8


def test_extraction_stops_at_the_deepest_layer(llama):
    tok = CharTokenizer()
    seen = []
    handle = llama.model.layers[2].register_forward_hook(lambda *a: seen.append(1))
    try:
        vsteer.extract(llama, tok, PAIRS, site="v", layers=1, position="last")
    finally:
        handle.remove()
    assert seen == []


def test_several_sites_in_one_pass_match_single_site_extraction(llama):
    tok = CharTokenizer()
    both = extract_sites(llama, tok, PAIRS, ("v", "resid"), [1], position="last")
    alone = vsteer.extract(llama, tok, PAIRS, site="resid", layers=[1], position="last")
    assert torch.allclose(both["resid"][1], alone[1])


def test_extract_refuses_bad_input(llama):
    tok = CharTokenizer()
    with pytest.raises(VectorError, match="unknown extraction method"):
        vsteer.extract(llama, tok, PAIRS, method="pca")
    with pytest.raises(SiteError, match="out of range"):
        vsteer.extract(llama, tok, PAIRS, layers=9)
    with pytest.raises(DataError, match="at least one"):
        vsteer.extract(llama, tok, [])
    with pytest.raises(SiteError, match="unknown site"):
        vsteer.extract(llama, tok, PAIRS, site="value")


def test_public_names_are_the_functions(llama):
    import vsteer.extraction as extraction_module
    import vsteer.steering as steering_module

    assert callable(steering_module.per_row) and callable(extraction_module.caa_pairs)
    vec = vsteer.extract(llama, CharTokenizer(), PAIRS, site="resid", layers=1, position="last")
    assert isinstance(vec, SteeringVector)
    with vsteer.steer(llama, vec):
        pass


# ---- GGUF control vectors ----------------------------------------------------------------------
def test_gguf_round_trip_gives_the_same_tensors(llama, tmp_path):
    vec = _vec(llama, "resid", layers=(1, 2))
    back = import_gguf(export_gguf(vec, tmp_path / "cv.gguf"), llama)
    assert back.site == "resid" and back.layers == [1, 2]
    assert all(torch.equal(vec[layer], back[layer]) for layer in vec.layers)


def test_gguf_has_llama_cpp_metadata(llama, tmp_path):
    import gguf

    reader = gguf.GGUFReader(str(export_gguf(_vec(llama, "resid", layers=(1, 2)), tmp_path / "cv.gguf")))
    field = reader.get_field("general.architecture")
    assert bytes(field.parts[-1]).decode() == "controlvector"
    assert bytes(reader.get_field("controlvector.model_hint").parts[-1]).decode() == "llama"
    assert int(reader.get_field("controlvector.layer_count").parts[-1][0]) == 2
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.2"]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1 for t in reader.tensors)


def test_gguf_export_of_block_zero_is_refused(llama, tmp_path):
    with pytest.raises(VectorError, match="layer 0 cannot be exported"):
        export_gguf(_vec(llama, "resid", layers=(0, 1)), tmp_path / "cv.gguf")


def test_gguf_export_of_a_value_vector_is_refused(llama, tmp_path):
    with pytest.raises(VectorError, match="residual stream"):
        export_gguf(_vec(llama, "v"), tmp_path / "cv.gguf")


def test_unreadable_gguf_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(VectorError, match="cannot read"):
        import_gguf(bad)


def test_gguf_written_by_repeng_style_writer_imports(llama, tmp_path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "r.gguf"), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 1)
    writer.add_tensor("direction.2", np.arange(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vec = import_gguf(tmp_path / "r.gguf", llama)
    assert vec.layers == [2] and torch.equal(vec[2], torch.arange(32, dtype=torch.float32))
