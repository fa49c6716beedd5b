"""The architecture matrix over transformers' causal-LM mapping (see tests/arch_matrix.py).

Every family that builds from a tiny config is supported (capture shapes, zero add bit-identical,
v by hand from the weights, v head layout, v-only LoRA keeping q/k bit-exact) or refused by
``vsteer.get_arch`` with a one-line reason. ``docs/architectures.md`` is generated from the same
matrix by ``scripts/gen_architectures.py``.
"""

from __future__ import annotations

import arch_matrix as am
import pytest

FAMILIES = am.families()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_is_supported_or_refused_with_a_reason(model_type):
    result = am.check_family(model_type)
    if result.status == "does not build":
        pytest.skip(f"does not build here: {result.reason}")
    if model_type in am.KNOWN_FAILS:
        assert result.status == "fails", f"{model_type} now {result.status}: remove it from KNOWN_FAILS"
        pytest.xfail(am.KNOWN_FAILS[model_type])
    assert result.status in ("supported", "unsupported"), f"{model_type}: {result.reason}"
    if result.status == "unsupported":
        assert result.reason and "\n" not in result.reason


@pytest.mark.parametrize("model_type", am.MUST_SUPPORT)
def test_long_established_family_is_supported(model_type):
    result = am.check_family(model_type)
    assert result.status == "supported", f"{model_type}: {result.status}: {result.reason}"


def test_supported_share_of_buildable_families_meets_the_target():
    results = am.matrix()
    buildable = [r for r in results if r.status != "does not build"]
    supported = [r for r in buildable if r.status == "supported"]
    share = len(supported) / len(buildable)
    assert share >= am.TARGET_SHARE, (
        f"{len(supported)} of {len(buildable)} buildable families supported ({share:.1%}), "
        f"target {am.TARGET_SHARE:.0%}"
    )


def test_docs_architectures_is_generated_from_the_matrix():
    import pathlib

    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
    assert doc.read_text() == am.render(am.matrix()), (
        "docs/architectures.md is stale: run OMP_NUM_THREADS=1 python scripts/gen_architectures.py"
    )
