"""Specification of the site/hook layer on tiny models of every supported family."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_tiny_model, random_ids

import vsteer
from vsteer.hooks import hook_count

ALL_SITES = vsteer.SITE_NAMES


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def expected_shape(arch, name, batch, seq):
    if name in ("q", "z"):
        return (batch, seq, arch.n_heads, arch.head_dim)
    if name in ("k", "v"):
        return (batch, seq, arch.n_kv_heads, arch.head_dim)
    return (batch, seq, arch.d_model)


def test_capture_shapes_per_site_and_family(tiny_model):
    arch = vsteer.get_arch(tiny_model)
    ids = random_ids(2, 7)
    sites = [(name, layer) for name in ALL_SITES for layer in range(arch.n_layers)]
    with torch.no_grad(), vsteer.capture(tiny_model, sites) as acts:
        tiny_model(ids)
    assert len(acts) == len(sites)
    for name, layer in sites:
        assert tuple(acts[(name, layer)].shape) == expected_shape(arch, name, 2, 7), (name, layer)


@pytest.mark.parametrize("role", ["q", "k", "v"])
def test_captured_projection_equals_weights_applied_by_hand(tiny_model, role):
    """v (and q, k) equal W x + b recomputed from the layer's weights, fused layouts included."""
    arch = vsteer.get_arch(tiny_model)
    layer = 1
    seen = {}
    proj = arch.projection(layer, role)
    handle = proj.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    try:
        with torch.no_grad(), vsteer.capture(tiny_model, [(role, layer)]) as acts:
            tiny_model(random_ids(2, 5))
    finally:
        handle.remove()
    w, b = arch.weight(layer, role), arch.bias(layer, role)
    by_hand = seen["x"] @ w.T + (0 if b is None else b)
    got = acts[(role, layer)]
    torch.testing.assert_close(got.flatten(-2), by_hand, rtol=1e-5, atol=1e-5)


def test_zero_add_and_self_patch_are_bit_identical(tiny_model):
    ids = random_ids(2, 6)
    base = logits(tiny_model, ids)
    arch = vsteer.get_arch(tiny_model)
    sites = [(name, 1) for name in ALL_SITES]
    with torch.no_grad(), vsteer.capture(tiny_model, sites) as acts:
        tiny_model(ids)
    zero_ops = {s: vsteer.add(torch.zeros(acts[s].shape[2:])) for s in sites}
    with vsteer.intervene(tiny_model, zero_ops):
        assert torch.equal(logits(tiny_model, ids), base)
    patch_ops = {s: vsteer.replace(acts[s]) for s in sites}
    with vsteer.intervene(tiny_model, patch_ops):
        assert torch.equal(logits(tiny_model, ids), base)
    with vsteer.intervene(tiny_model, {("v", arch.n_layers - 1): vsteer.scale(1.0)}):
        assert torch.equal(logits(tiny_model, ids), base)


def test_hooks_are_removed_after_exception_and_outputs_unchanged(tiny_model):
    ids = random_ids(1, 5)
    base = logits(tiny_model, ids)
    before = hook_count(tiny_model)
    with pytest.raises(RuntimeError, match="boom"):
        with vsteer.intervene(tiny_model, {("v", 0): vsteer.add(torch.ones(1)[0].expand(8) * 3.0)}):
            tiny_model(ids)
            assert hook_count(tiny_model) > before
            raise RuntimeError("boom")
    assert hook_count(tiny_model) == before
    assert torch.equal(logits(tiny_model, ids), base)


def test_patch_of_v_at_one_position_changes_only_that_and_later_positions(tiny_model):
    ids = random_ids(1, 8, seed=3)
    donor = random_ids(1, 8, seed=4)
    base = logits(tiny_model, ids)
    with torch.no_grad(), vsteer.capture(tiny_model, [("v", 1)]) as acts:
        tiny_model(donor)
    pos = 4
    with vsteer.intervene(tiny_model, {("v", 1): vsteer.replace(acts[("v", 1)], positions=[pos])}):
        patched = logits(tiny_model, ids)
    assert torch.equal(patched[:, :pos], base[:, :pos])
    assert not torch.allclose(patched[:, pos], base[:, pos])


def test_add_to_some_heads_only_changes_those_heads():
    model = make_tiny_model("llama")
    arch = vsteer.get_arch(model)
    ids = random_ids(1, 5)
    with torch.no_grad(), vsteer.capture(model, [("v", 0)]) as base:
        model(ids)
    with (
        torch.no_grad(),
        vsteer.intervene(model, {("v", 0): vsteer.add(torch.ones(arch.head_dim), heads=[1])}),
    ):
        with vsteer.capture(model, [("v", 0)]) as acts:
            model(ids)
    diff = acts[("v", 0)] - base[("v", 0)]
    assert torch.equal(diff[:, :, 0], torch.zeros_like(diff[:, :, 0]))
    torch.testing.assert_close(diff[:, :, 1], torch.ones_like(diff[:, :, 1]))


def test_nested_contexts_compose():
    model = make_tiny_model("qwen2")
    ids = random_ids(2, 5)
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    with (
        vsteer.intervene(model, {("v", 1): vsteer.add(a)}),
        vsteer.intervene(model, {("v", 1): vsteer.add(b)}),
    ):
        nested = logits(model, ids)
    with vsteer.intervene(model, {("v", 1): vsteer.add(a + b)}):
        summed = logits(model, ids)
    torch.testing.assert_close(nested, summed, rtol=1e-5, atol=1e-5)


def test_per_row_vectors_apply_to_their_own_row():
    model = make_tiny_model("llama")
    ids = random_ids(2, 5)
    vec = torch.randn(2, 8) * 3
    with vsteer.intervene(model, {("v", 1): vsteer.add(torch.stack([vec, torch.zeros_like(vec)]))}):
        both = logits(model, ids)
    with vsteer.intervene(model, {("v", 1): vsteer.add(vec)}):
        first = logits(model, ids[:1])
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-5)
    assert torch.equal(both[1:], logits(model, ids)[1:])  # zero vector on row 1: bit-identical


def test_capture_with_stop_runs_no_deeper_layer():
    model = make_tiny_model("llama")
    arch = vsteer.get_arch(model)
    calls = []
    handle = arch.layer(2).register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with torch.no_grad(), vsteer.capture(model, [("v", 1), ("resid", 0)], stop=True) as stopped:
            model(random_ids(2, 5))
            pytest.fail("the forward should stop after the deepest captured site")
        with torch.no_grad(), vsteer.capture(model, [("v", 1)]) as full:
            model(random_ids(2, 5))
    finally:
        handle.remove()
    assert calls == [1]  # only the full forward reached layer 2
    assert torch.equal(stopped[("v", 1)], full[("v", 1)])


def _positions(mask):
    """Position ids as generate computes them for left padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _left_padded_batch():
    ids = random_ids(2, 6, seed=7)
    mask = torch.ones_like(ids)
    ids[1, :2] = 0
    mask[1, :2] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_capture_under_cached_generate_matches_one_full_forward(family):
    """Decoding steps are appended with the right positions (batch 2, left padding)."""
    model = make_tiny_model(family)
    ids, mask = _left_padded_batch()
    with torch.no_grad(), vsteer.capture(model, [("v", 1), ("resid", 2)]) as acts:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    full_mask = torch.cat([mask, torch.ones(2, out.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    with torch.no_grad(), vsteer.capture(model, [("v", 1), ("resid", 2)]) as ref:
        model(out, attention_mask=full_mask, position_ids=_positions(full_mask))
    n = out.shape[1] - 1  # the last generated token is never fed back
    for site in [("v", 1), ("resid", 2)]:
        assert acts[site].shape[1] == n
        real = full_mask[:, :n].bool()
        torch.testing.assert_close(acts[site][real], ref[site][:, :n][real], rtol=1e-4, atol=1e-4)


def test_positions_are_absolute_under_cached_generate():
    """An edit at one absolute position gives the same logits in cached decoding as in one forward."""
    model = make_tiny_model("llama")
    ids, mask = _left_padded_batch()
    vec = torch.randn(2, 8) * 2
    op = {("v", 1): vsteer.add(vec, positions=[7])}  # position 7 is a generated token
    with torch.no_grad(), vsteer.intervene(model, op):
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    with torch.no_grad(), vsteer.intervene(model, op):
        ref = model(seq, attention_mask=full_mask, position_ids=_positions(full_mask)).logits
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(scores, ref[:, ids.shape[1] - 1 + step], rtol=1e-4, atol=1e-4)


def test_generated_positions_leave_the_prompt_alone():
    model = make_tiny_model("llama")
    ids = random_ids(1, 5)
    base = logits(model, ids)
    with vsteer.intervene(model, {("resid", 0): vsteer.add(torch.randn(32) * 5, positions="generated")}):
        steered = logits(model, ids)
    assert torch.equal(steered, base)


def test_padding_is_not_steered_by_default():
    model = make_tiny_model("llama")
    ids, mask = _left_padded_batch()
    with torch.no_grad(), vsteer.intervene(model, {("resid", 0): vsteer.add(torch.ones(32))}):
        with vsteer.capture(model, [("resid", 0)]) as acts:
            model(ids, attention_mask=mask)
    with torch.no_grad(), vsteer.capture(model, [("resid", 0)]) as base:
        model(ids, attention_mask=mask)
    diff = acts[("resid", 0)] - base[("resid", 0)]
    assert torch.equal(diff[1, :2], torch.zeros_like(diff[1, :2]))
    torch.testing.assert_close(diff[1, 2:], torch.ones_like(diff[1, 2:]))


def test_discovered_architecture_without_a_spec_works():
    model = make_tiny_model("stablelm")
    arch = vsteer.get_arch(model)
    assert arch.family.startswith("discovered:")
    assert arch.n_kv_heads == 2


# ---------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


@pytest.mark.parametrize(
    "ops, message",
    [
        ({("v", 3): vsteer.scale(2.0)}, "layer 3 is out of range: this model has 3 layers"),
        ({("w", 0): vsteer.scale(2.0)}, "unknown site 'w'"),
        ({("v", 0): vsteer.scale(2.0, heads=[2])}, "head 2 is out of range for site v.0: it has 2 heads"),
        ({("v", 0): vsteer.add(torch.ones(5))}, r"vector of shape \(5,\) does not fit site v.0"),
        ({("v", 0): vsteer.add(torch.tensor([float("nan")] * 8))}, "contains NaN"),
        ({("resid", 0): vsteer.scale("big")}, "scale factor must be a number"),
        ({("v", 0): vsteer.add(torch.ones(8), positions="later")}, "unknown positions 'later'"),
    ],
)
def test_bad_input_gives_one_clear_line(llama, ops, message):
    before = hook_count(llama)
    with pytest.raises(vsteer.SiteError, match=message) as err:
        with vsteer.intervene(llama, ops):
            pass
    assert "\n" not in str(err.value)
    assert hook_count(llama) == before


def test_unsupported_architecture_names_model_type_and_what_is_missing():
    transformers = pytest.importorskip("transformers")
    config = transformers.MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, state_size=4)
    model = transformers.MambaForCausalLM(config)
    with pytest.raises(vsteer.ModelError, match="model_type='mamba': state-space model") as err:
        vsteer.get_arch(model)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_site_table_names_a_module_for_every_site(family):
    table = vsteer.get_arch(make_tiny_model(family)).site_table()
    assert set(table) == set(ALL_SITES)
    assert all(table.values())
