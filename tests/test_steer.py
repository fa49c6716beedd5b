"""Injection: equivalences, positions under KV-cached generation, per-row steering, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_tiny_model, random_ids

import vsteer
from vsteer.errors import SiteError, VectorError
from vsteer.hooks import hook_count, site_shape
from vsteer.steering import attention_output_change, per_row
from vsteer.vectors import SteeringVector


def _vec(model, site="v", layers=(1,), seed=0, size=1.0):
    g = torch.Generator().manual_seed(seed)
    shape = site_shape(vsteer.get_arch(model), site)
    return SteeringVector.for_model(
        model, {layer: size * torch.randn(shape, generator=g) for layer in layers}, site
    )


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_constant_value_vector_equals_w_o_vector_at_attention_output(family):
    """Adding ``c`` to every value vector of a layer adds ``W_O c`` (each key/value head's ``c``
    feeding its group of query heads) to that layer's attention output, because each head's
    output is ``sum_j a_j (v_j + c) = sum_j a_j v_j + c`` and the attention weights ``a_j`` sum
    to one. With left padding the pad keys get zero weight, so this holds on the real tokens."""
    model = make_tiny_model(family)
    value = _vec(model, "v")
    at_attn = attention_output_change(model, value)
    ids = random_ids(2, 9)
    with vsteer.steer(model, value):
        a = _logits(model, ids)
    with vsteer.steer(model, at_attn):
        b = _logits(model, ids)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, _logits(model, ids), atol=1e-3)  # the vector does something


def test_value_and_w_o_vector_differ_when_added_at_some_positions_only(llama):
    """At positions ``S`` only, a head's output moves by ``c * sum_{j in S} a_j``: the attention
    mass on the steered keys, not a constant, so the two sites no longer agree."""
    value = _vec(llama, "v")
    at_attn = attention_output_change(llama, value)
    ids = random_ids(2, 9)
    with vsteer.steer(llama, value, positions=[3, 4]):
        a = _logits(llama, ids)
    with vsteer.steer(llama, at_attn, positions=[3, 4]):
        b = _logits(llama, ids)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)  # before the steered tokens: untouched
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)


def test_equivalence_holds_on_real_tokens_under_left_padding(llama):
    value = _vec(llama, "v")
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with vsteer.steer(llama, value):
        a = _logits(llama, ids, attention_mask=mask)
    with vsteer.steer(llama, attention_output_change(llama, value)):
        b = _logits(llama, ids, attention_mask=mask)
    assert torch.allclose(a[0, 3:], b[0, 3:], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)


def test_scale_zero_gives_bit_identical_logits(llama):
    ids = random_ids(2, 9)
    before = hook_count(llama)
    with vsteer.steer(llama, _vec(llama, layers=(0, 1, 2)), scale=0.0):
        assert hook_count(llama) == before
        steered = _logits(llama, ids)
    assert torch.equal(steered, _logits(llama, ids))


def test_hooks_are_removed_also_on_exceptions(llama):
    before = hook_count(llama)
    with pytest.raises(RuntimeError):
        with vsteer.steer(llama, _vec(llama)):
            raise RuntimeError("boom")
    assert hook_count(llama) == before


def test_scale_multiplies_the_vector(llama):
    vec = _vec(llama)
    ids = random_ids(1, 6)
    with vsteer.steer(llama, vec, scale=2.5):
        a = _logits(llama, ids)
    with vsteer.steer(llama, 2.5 * vec):
        b = _logits(llama, ids)
    assert torch.allclose(a, b, atol=1e-6)


def test_several_vectors_add_up(llama):
    happy, calm = _vec(llama, seed=1), _vec(llama, seed=2)
    ids = random_ids(1, 6)
    with vsteer.steer(llama, [(happy, 0.7), (calm, -0.3)]):
        a = _logits(llama, ids)
    with vsteer.steer(llama, 0.7 * happy - 0.3 * calm):
        b = _logits(llama, ids)
    assert torch.allclose(a, b, atol=1e-6)


def test_vectors_at_different_sites_apply_together(llama):
    v, r = _vec(llama, "v"), _vec(llama, "resid", layers=(2,))
    ids = random_ids(1, 6)
    with vsteer.steer(llama, [v, r]):
        both = _logits(llama, ids)
    with vsteer.steer(llama, v):
        only_v = _logits(llama, ids)
    assert not torch.allclose(both, only_v, atol=1e-4)


def test_each_row_gets_its_own_vector_and_scale(llama):
    happy, sad = _vec(llama, seed=1), _vec(llama, seed=2)
    ids = random_ids(3, 7)
    with vsteer.steer(llama, per_row([happy, sad, None], scale=[2.0, 1.0, 5.0])):
        batch = _logits(llama, ids)
    for row, (vec, s) in enumerate([(happy, 2.0), (sad, 1.0)]):
        with vsteer.steer(llama, vec, scale=s):
            alone = _logits(llama, ids[row : row + 1])
        assert torch.allclose(batch[row], alone[0], atol=1e-5)
    assert torch.allclose(batch[2], _logits(llama, ids[2:3])[0], atol=1e-5)


def _generate(model, ids, mask, vec=None, positions="all", n=6):
    kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if vec is None:
            return model.generate(input_ids=ids, attention_mask=mask, **kw)
        with vsteer.steer(model, vec, scale=1.0, positions=positions):
            return model.generate(input_ids=ids, attention_mask=mask, **kw)


def _left_padded(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


@pytest.mark.parametrize("positions", ["generated", "prompt", "all"])
def test_batched_left_padded_generation_matches_each_row_alone(llama, positions):
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    vec = _vec(llama, layers=(0, 1, 2), size=3.0)
    ids, mask = _left_padded(rows)
    batch = _generate(llama, ids, mask, vec, positions)[:, ids.shape[1] :]
    plain = _generate(llama, ids, mask)[:, ids.shape[1] :]
    assert not torch.equal(batch, plain)  # the steering changes something
    for i, r in enumerate(rows):
        one = torch.tensor([r])
        alone = _generate(llama, one, torch.ones_like(one), vec, positions)[0, len(r) :]
        assert torch.equal(batch[i], alone), f"row {i}"


def test_generated_only_leaves_the_prompt_untouched(llama):
    ids = random_ids(2, 6)
    with vsteer.steer(llama, _vec(llama, size=5.0), positions="generated"):
        steered = _logits(llama, ids)
    assert torch.equal(steered, _logits(llama, ids))


def test_scale_that_is_not_a_number_is_refused(llama):
    with pytest.raises(VectorError, match="scale must be a number, got 'x'"):
        with vsteer.steer(llama, _vec(llama), scale="x"):
            pass
    with pytest.raises(VectorError, match="finite"):
        with vsteer.steer(llama, _vec(llama), scale=float("nan")):
            pass


def test_vector_for_another_model_is_refused(llama):
    other = make_tiny_model("gemma3")
    with pytest.raises(VectorError, match="was made for model"):
        with vsteer.steer(llama, _vec(other)):
            pass


def test_unknown_positions_are_refused(llama):
    with pytest.raises(SiteError, match="unknown positions 'answer'"):
        with vsteer.steer(llama, _vec(llama), positions="answer"):
            pass


def test_per_row_scale_of_wrong_length_is_refused(llama):
    with pytest.raises(VectorError, match="3 values for 2 rows"):
        per_row([_vec(llama), None], scale=[1.0, 2.0, 3.0])


# ------------------------------------------------------------------------------------------------
# the bias path: a constant q/k/v vector at every position is added to the projection's bias
# ------------------------------------------------------------------------------------------------
def _padded_batch():
    ids = random_ids(3, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return ids, mask


def _biases_of(model, site):
    arch = vsteer.get_arch(model)
    return [arch.projection(layer, site).bias for layer in range(arch.n_layers)]


@pytest.mark.parametrize("site", ["v", "k", "q"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bias_path_equals_the_hook_on_real_tokens_under_left_padding(family, site):
    """Fused QKV (phi3, gpt2's Conv1D, gpt_neox per head), projections with a bias (qwen2) and
    without: the bias path installs no hook and gives the hook path's logits on every real token."""
    model = make_tiny_model(family)
    vec = _vec(model, site, layers=(0, 1), size=2.0)
    ids, mask = _padded_batch()
    before_biases = _biases_of(model, site)
    hooks_before = hook_count(model)
    with torch.no_grad(), vsteer.steer(model, vec, scale=1.5):  # no_grad: qwen2's biases require grad
        assert hook_count(model) == hooks_before  # no hook: the bias carries the vector
        fast = _logits(model, ids, attention_mask=mask)
    assert all(a is b for a, b in zip(_biases_of(model, site), before_biases, strict=True))
    with vsteer.steer(model, vec, scale=1.5, as_bias=False):
        assert hook_count(model) > hooks_before
        slow = _logits(model, ids, attention_mask=mask)
    real = mask.bool()
    assert torch.allclose(fast[real], slow[real], atol=1e-5)
    if not (site == "k" and family == "gpt2"):  # without rotary positions a constant key changes
        # every score of a query by the same q.c, which softmax removes
        assert not torch.allclose(fast[real], _logits(model, ids, attention_mask=mask)[real], atol=1e-3)


def test_bias_path_generation_equals_the_hook_path(llama):
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (6, 3, 8)]
    ids, mask = _left_padded(rows)
    vec = _vec(llama, layers=(0, 1, 2), size=3.0)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with vsteer.steer(llama, vec):
            fast = llama.generate(ids, **kw)
        with vsteer.steer(llama, vec, as_bias=False):
            slow = llama.generate(ids, **kw)
        plain = llama.generate(ids, **kw)
    assert torch.equal(fast, slow) and not torch.equal(fast, plain)


def test_bias_path_nests_and_mixes_with_hooked_sites(llama):
    """A bias-path vector inside another steering context, next to a resid vector (hooked) and a
    per-row scale (hooked): the sum of all, as with hooks only; every bias restored exactly."""
    a, b, r = _vec(llama, "v", seed=1), _vec(llama, "v", seed=2), _vec(llama, "resid", seed=3, size=0.3)
    ids = random_ids(2, 7)
    before = _biases_of(llama, "v")
    with vsteer.steer(llama, [a, r]), vsteer.steer(llama, b, scale=[0.5, 2.0]):
        with vsteer.steer(llama, a, scale=-0.5):
            fast = _logits(llama, ids)
    with vsteer.steer(llama, [a, r], as_bias=False), vsteer.steer(llama, b, scale=[0.5, 2.0]):
        with vsteer.steer(llama, a, scale=-0.5, as_bias=False):
            slow = _logits(llama, ids)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert all(x is y for x, y in zip(_biases_of(llama, "v"), before, strict=True))


def test_bias_path_restores_the_bias_after_an_exception():
    model = make_tiny_model("qwen2")  # has q/k/v biases
    before = [t.clone() for t in _biases_of(model, "v")]
    with pytest.raises(RuntimeError), vsteer.steer(model, _vec(model, "v", size=4.0)):
        raise RuntimeError("boom")
    assert all(torch.equal(x, y) for x, y in zip(_biases_of(model, "v"), before, strict=True))


def test_peft_wrapped_projection_keeps_the_hook():
    from vsteer.lora import add_adapter

    model = add_adapter(make_tiny_model("llama"), targets="v", r=2)
    vec = _vec(model, "v", size=2.0)
    before = hook_count(model)
    with vsteer.steer(model, vec):
        assert hook_count(model) > before


def test_bias_path_keeps_the_gradient_of_a_trainable_bias():
    model = make_tiny_model("qwen2")
    vec = _vec(model, "v", layers=(1,), size=2.0)
    bias = vsteer.get_arch(model).projection(1, "v").bias
    grads = []
    for as_bias in (True, False):
        model.zero_grad()
        with vsteer.steer(model, vec, as_bias=as_bias):
            model(random_ids(2, 6)).logits.square().mean().backward()
        grads.append(bias.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
