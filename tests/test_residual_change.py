"""The residual change of a value vector, checked against forward passes, Gemma 2/3 included."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import VOCAB, make_tiny_model, random_ids

import vsteer
from vsteer.errors import VectorError
from vsteer.steering import attention_output_change, residual_change, residual_change_norms
from vsteer.vectors import SteeringVector


def _gemma(kind: str):
    torch.manual_seed(0)
    cls = transformers.Gemma2Config if kind == "gemma2" else transformers.Gemma3TextConfig
    config = cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=16,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # gains away from 1 so that the post-attention norm matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.5, 0.3)
    return model


def _value_vector(model, layer=1, seed=0):
    arch = vsteer.get_arch(model)
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(arch.n_kv_heads, arch.head_dim, generator=g)
    return SteeringVector.for_model(model, {layer: c}, "v")


def _post_attention_outputs(model, layer, ids, bias=None):
    """Output of the layer's post-attention norm, with ``bias`` on the value projection (independent path)."""
    block = model.model.layers[layer]
    seen = {}
    handle = block.post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    v_proj = block.self_attn.v_proj
    old = v_proj.bias
    try:
        if bias is not None:
            v_proj.bias = torch.nn.Parameter(bias.reshape(-1).clone())
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        v_proj.bias = old
        handle.remove()
    return seen["out"]


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_residual_change_norm_matches_a_forward_pass_on_gemma(kind):
    model = _gemma(kind)
    vec = _value_vector(model)
    ids = random_ids(batch=2, seq=6)
    c = vec.directions[1]
    plain = _post_attention_outputs(model, 1, ids)
    steered = _post_attention_outputs(model, 1, ids, bias=c)
    expected = float((steered - plain).norm(dim=-1).mean())
    got = residual_change_norms(model, vec, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert got[1] == pytest.approx(expected, rel=1e-4)
    # and the closed form W_O c, which ignores the norm, is measurably different here
    assert float(attention_output_change(model, vec).directions[1].norm()) != pytest.approx(
        expected, rel=0.05
    )


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_residual_change_refuses_an_input_dependent_change(kind):
    model = _gemma(kind)
    vec = _value_vector(model)
    with pytest.raises(VectorError, match="passes a norm before the residual add"):
        residual_change(model, vec)
    with pytest.raises(VectorError, match="pass inputs="):
        residual_change_norms(model, vec)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_residual_change_is_the_attention_output_difference_without_post_norm(family):
    model = make_tiny_model(family)
    vec = _value_vector(model)
    ids = random_ids(batch=2, seq=6)
    with torch.no_grad(), vsteer.capture(model, [("attn", 1)]) as plain:
        model(input_ids=ids)
    with torch.no_grad(), vsteer.steer(model, vec), vsteer.capture(model, [("attn", 1)]) as steered:
        model(input_ids=ids)
    diff = steered[("attn", 1)] - plain[("attn", 1)]
    change = residual_change(model, vec).directions[1]
    torch.testing.assert_close(diff, change.expand_as(diff), rtol=1e-4, atol=1e-5)
    assert residual_change_norms(model, vec)[1] == pytest.approx(float(change.norm()), rel=1e-6)
