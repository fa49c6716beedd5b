"""Several operations on one site: a list applies them one after another, in list order."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import FAMILIES, make_tiny_model, random_ids

import vsteer
from vsteer.hooks import site_shape


def _pool(shape: tuple[int, ...], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    pool = {
        "add_a": lambda: vsteer.add(a),
        "add_b": lambda: vsteer.add(b),
        "scale0": lambda: vsteer.scale(0.0),
        "scale_half_last": lambda: vsteer.scale(0.5, positions=[-1]),
        "apply_sq": lambda: vsteer.apply(lambda x, step: x * x),
    }
    if len(shape) == 2:
        pool["add_head0"] = lambda: vsteer.add(b[0], heads=[0])
    return pool


def _logits(model, ids, ops=None, nested=None):
    with torch.no_grad():
        if ops is not None:
            with vsteer.intervene(model, ops):
                return model(input_ids=ids).logits
        if nested:
            site, first, *rest = nested
            with vsteer.intervene(model, {site: first}):
                return _logits(model, ids, nested=[site, *rest] if rest else None)
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site_name", ["v", "resid", "z"])
def test_op_list_equals_nested_contexts(family, site_name):
    model = make_tiny_model(family)
    arch = vsteer.get_arch(model)
    site = (site_name, 1)
    pool = _pool(site_shape(arch, site_name), seed=3)
    ids = random_ids()
    names = list(pool)
    combos = [c for n in (2, 3) for c in itertools.product(names, repeat=n)]
    # keep the product small for speed: all pairs, and the triples that start with an add
    combos = [c for c in combos if len(c) == 2 or c[0].startswith("add")]
    for combo in combos:
        listed = _logits(model, ids, ops={site: [pool[n]() for n in combo]})
        nested = _logits(model, ids, nested=[site, *[pool[n]() for n in combo]])
        torch.testing.assert_close(listed, nested, rtol=0, atol=1e-5, msg=f"{family} {site} {combo}")


@pytest.mark.parametrize("family", FAMILIES)
def test_two_adds_add_their_sum(family):
    model = make_tiny_model(family)
    arch = vsteer.get_arch(model)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(arch.d_model, generator=g), torch.randn(arch.d_model, generator=g)
    ids = random_ids()
    both = _logits(model, ids, ops={("resid", 0): [vsteer.add(a), vsteer.add(b)]})
    summed = _logits(model, ids, ops={("resid", 0): vsteer.add(a + b)})
    torch.testing.assert_close(both, summed, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_then_add_replaces_the_site(family):
    model = make_tiny_model(family)
    arch = vsteer.get_arch(model)
    b = torch.randn(arch.d_model, generator=torch.Generator().manual_seed(1))
    ids = random_ids()
    with torch.no_grad(), vsteer.intervene(model, {("resid", 0): [vsteer.scale(0.0), vsteer.add(b)]}):
        with vsteer.capture(model, [("resid", 0)]) as acts:
            model(input_ids=ids)
    # the capture hook was registered after the operations', so it sees the site after them
    out = acts[("resid", 0)]
    torch.testing.assert_close(out, b.expand_as(out), rtol=0, atol=1e-6)
