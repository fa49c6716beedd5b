"""Defects found in the 2026-12-07 review of the steering path, each with a test that failed before.

Bias path (``steer(as_bias=True)``, the default): nesting, two sites of one fused projection, a
trained bias, an enclosing capture; positions: a slice's step, a one-shot iterable, ``generate``
without a KV cache; the monitor gate across batch sizes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, random_ids

import vsteer
from vsteer.errors import SiteError
from vsteer.steering import steering_ops
from vsteer.vectors import SteeringVector


def _vec(model, site="v", layers=(0, 1, 2), size=1.0, seed=0):
    shape = vsteer.get_arch(model).site_shape(site)
    g = torch.Generator().manual_seed(seed)
    return SteeringVector.for_model(model, {i: size * torch.randn(*shape, generator=g) for i in layers}, site)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_nested_bias_blocks_keep_the_outer_steering_after_the_inner_exits(family):
    torch.manual_seed(0)
    model = make_tiny_model(family)
    a, b = _vec(model, seed=1, size=2.0), _vec(model, seed=2, size=2.0)
    ids = random_ids(2, 7)
    with vsteer.steer(model, a, as_bias=False):
        outer_only = _logits(model, ids)
    with vsteer.steer(model, [a, b], as_bias=False):
        both = _logits(model, ids)
    biases = [p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")]
    with vsteer.steer(model, a):
        with vsteer.steer(model, b):
            torch.testing.assert_close(_logits(model, ids), both, rtol=0, atol=1e-5)
        torch.testing.assert_close(_logits(model, ids), outer_only, rtol=0, atol=1e-5)
    after = [p.detach() for n, p in model.named_parameters() if n.endswith("bias")]
    assert len(after) == len(biases) and all(torch.equal(x, y) for x, y in zip(after, biases, strict=True))


@pytest.mark.parametrize("family", ["phi3", "gpt2", "gpt_neox"])
def test_two_sites_of_one_fused_projection_add_into_one_bias(family):
    torch.manual_seed(0)
    model = make_tiny_model(family)
    vectors = [
        _vec(model, "q", layers=(1,), size=5.0, seed=3),
        _vec(model, "v", layers=(1,), size=2.0, seed=4),
    ]
    ids = random_ids(2, 7)
    with vsteer.steer(model, vectors, as_bias=False):
        hooks = _logits(model, ids)
    with vsteer.steer(model, vectors[1:], as_bias=False):
        v_only = _logits(model, ids)
    assert (hooks - v_only).abs().max() > 1e-5  # the q vector does something
    with vsteer.steer(model, vectors):
        torch.testing.assert_close(_logits(model, ids), hooks, rtol=0, atol=1e-5)


def test_a_bias_trained_inside_a_steer_block_keeps_learning():
    torch.manual_seed(0)
    model = make_tiny_model("qwen2")
    proj = vsteer.get_arch(model).projection(1, "v")
    start = proj.bias.detach().clone()
    ids = random_ids(2, 7)
    vec = _vec(model, layers=(1,))

    def losses():
        with torch.no_grad():
            proj.bias.copy_(start)
        opt = torch.optim.SGD([proj.bias], lr=50.0)
        out = []
        with vsteer.steer(model, vec):
            for _ in range(3):
                loss = model(ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                out.append(float(loss))
        return out

    trained = losses()
    assert trained[2] < trained[0]
    assert not torch.equal(proj.bias.detach(), start)


def test_an_enclosing_capture_sees_the_same_value_on_either_steering_path():
    torch.manual_seed(0)
    model = make_tiny_model("llama")
    vec = _vec(model, layers=(1,), size=3.0)
    ids = random_ids(2, 7)
    seen = []
    for as_bias in (False, True):
        with vsteer.capture(model, [("v", 1)]) as acts:
            with vsteer.steer(model, vec, as_bias=as_bias):
                _logits(model, ids)
        seen.append(acts[("v", 1)])
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)


def _steered_positions(model, positions, seq=8):
    """The positions of a length-``seq`` prompt whose v.0 an ``add`` at ``positions`` changed."""
    arch = vsteer.get_arch(model)
    ids = random_ids(1, seq)
    shape = arch.site_shape("v")
    with vsteer.capture(model, [("v", 0)]) as plain:
        _logits(model, ids)
    op = vsteer.add(torch.ones(shape), positions=positions)
    with vsteer.intervene(model, {("v", 0): op}), vsteer.capture(model, [("v", 0)]) as steered:
        _logits(model, ids)
    diff = (steered[("v", 0)] - plain[("v", 0)]).abs().flatten(2).amax(-1)[0]
    return [i for i in range(seq) if diff[i] > 0]


def test_a_positions_slice_honours_its_step_and_refuses_a_reversed_one():
    torch.manual_seed(0)
    model = make_tiny_model("llama")
    assert _steered_positions(model, slice(0, 8, 2)) == [0, 2, 4, 6]
    assert _steered_positions(model, slice(1, None, 3)) == [1, 4, 7]
    assert _steered_positions(model, slice(-4, None, 2)) == [4, 6]
    assert _steered_positions(model, range(0, 8, 2)) == [0, 2, 4, 6]
    shape = vsteer.get_arch(model).site_shape("v")
    for bad in (slice(None, None, -1), slice(0, 8, 0), slice(0.5, 3)):
        with pytest.raises(SiteError, match="slice") as err:
            with vsteer.intervene(model, {("v", 0): vsteer.add(torch.ones(shape), positions=bad)}):
                pass
        assert "\n" not in str(err.value)


def test_one_shot_iterables_of_positions_steer_the_same_positions_everywhere():
    torch.manual_seed(0)
    model = make_tiny_model("llama")
    assert _steered_positions(model, (p for p in (0, 2, 4))) == [0, 2, 4]
    vec = _vec(model, layers=(0, 1))
    ids = random_ids(1, 8)
    with vsteer.steer(model, vec, positions=[0, 2, 4]):
        listed = _logits(model, ids)
    with vsteer.steer(model, vec, positions=iter([0, 2, 4])):
        once = _logits(model, ids)
    torch.testing.assert_close(once, listed, rtol=0, atol=0)
    assert not torch.equal(listed, _logits(model, ids))


@pytest.mark.parametrize("positions", ["generated", "prompt", "all", -1])
def test_generate_without_a_kv_cache_steers_the_same_positions_as_with_it(positions):
    torch.manual_seed(0)
    model = make_tiny_model("llama")
    ids = random_ids(2, 6)
    vec = _vec(model, size=6.0)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad(), vsteer.steer(model, vec, positions=positions, as_bias=False):
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        plain = model.generate(ids, use_cache=True, **kw)
    assert not torch.equal(cached, plain)


def test_per_row_with_no_row_steered_runs_unsteered():
    torch.manual_seed(0)
    model = make_tiny_model("llama")
    ids = random_ids(2, 5)
    plain = _logits(model, ids)
    for as_bias in (True, False):
        with vsteer.steer(model, vsteer.per_row([None, None], scale=2.0), as_bias=as_bias):
            torch.testing.assert_close(_logits(model, ids), plain, rtol=0, atol=0)
    with pytest.raises(vsteer.VectorError, match="at least one vector"):  # an empty plain list: a mistake
        with vsteer.steer(model, []):
            pass


def test_a_block_entered_on_a_filled_cache_counts_every_token_it_sees_as_generated():
    """The documented rule (the serving engine steers one decoding step per block): a block whose
    first call continues a KV cache filled before it treats that call's tokens as generated, so
    ``generated`` steers them and ``prompt`` does not; inside one block the prompt is its first call."""
    torch.manual_seed(0)
    model = make_tiny_model("llama")
    ids = random_ids(1, 9)
    vec = _vec(model, size=4.0)

    def last_logits(positions):
        with torch.no_grad():
            out = model(ids[:, :6], use_cache=True)  # the cache is filled outside the block
            with vsteer.steer(model, vec, positions=positions, as_bias=False):
                return model(ids[:, 6:], past_key_values=out.past_key_values, use_cache=True).logits

    with torch.no_grad():
        out = model(ids[:, :6], use_cache=True)
        plain = model(ids[:, 6:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(last_logits("prompt"), plain, rtol=0, atol=0)
    torch.testing.assert_close(last_logits("generated"), last_logits("all"), rtol=0, atol=0)
    assert not torch.equal(last_logits("generated"), plain)
    with torch.no_grad(), vsteer.steer(model, vec, positions="generated", as_bias=False):
        whole = model(ids, use_cache=True)  # a prompt inside the block: nothing of it is generated
    torch.testing.assert_close(whole.logits, model(ids).logits, rtol=0, atol=0)


def test_per_row_entries_of_different_lengths_are_refused_not_broadcast():
    """Found in review: ``(v1, [5.0])`` beside a 3-row entry broadcast v1 at 5x to every row, 2 rows
    beside 3 was a raw torch error, and an empty scale tensor steered nothing silently."""
    torch.manual_seed(0)
    model = make_tiny_model("llama")
    v1, v2 = _vec(model, seed=1), _vec(model, seed=2)
    for entries in ([(v1, [5.0]), (v2, [0.0, 0.0, 1.0])], [(v1, [1.0, 2.0]), (v2, [1.0, 2.0, 3.0])]):
        with pytest.raises(vsteer.VectorError, match="disagree in length") as err:
            steering_ops(model, entries)
        assert "\n" not in str(err.value)
    with pytest.raises(vsteer.VectorError, match="empty"):
        steering_ops(model, v1, scale=torch.tensor([]))
    ops = steering_ops(model, [(v1, [1.0, 0.0, 2.0]), (v2, torch.tensor([0.0, 1.0, 0.0]))])
    assert next(iter(ops.values())) is not None


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_residual_change_of_an_mlp_vector_passes_gemmas_post_feedforward_norm(family):
    """Found in review: on Gemma 3 the MLP output passes post_feedforward_layernorm before the
    residual add, yet residual_change returned the vector itself and residual_change_norms its
    norm (17.1 where the stream moved by 7.4). Now the first refuses and the second measures."""
    from vsteer.steering import residual_change, residual_change_norms

    model = make_tiny_model(family)
    shape = vsteer.get_arch(model).site_shape("mlp")
    vec = SteeringVector.for_model(
        model, {1: 3.0 * torch.randn(*shape, generator=torch.Generator().manual_seed(0))}, "mlp"
    )
    ids = random_ids(2, 7)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        with vsteer.capture(model, [("resid", 1)]) as base:
            model(**inputs)
        with vsteer.steer(model, vec), vsteer.capture(model, [("resid", 1)]) as steered:
            model(**inputs)
    actual = float((steered[("resid", 1)] - base[("resid", 1)]).norm(dim=-1).mean())
    assert residual_change_norms(model, vec, inputs=inputs)[1] == pytest.approx(actual, rel=1e-4)
    if family == "gemma3":
        with pytest.raises(vsteer.VectorError, match="MLP output of layers \\[1\\] passes a norm"):
            residual_change(model, vec)
        assert abs(actual - float(vec.directions[1].norm())) > 1.0
    else:
        assert float(residual_change(model, vec).directions[1].norm()) == pytest.approx(actual, rel=1e-4)
