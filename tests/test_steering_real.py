"""Steering on the embedded model with the shipped data (slow: runs in CI)."""

from __future__ import annotations

import pytest
import torch

import vsteer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    from vsteer.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def refusal(smollm):
    from vsteer.extraction import caa_pairs

    model, tok = smollm
    return vsteer.extract(model, tok, caa_pairs("refusal", limit=24), site="v", layers="11-17")


def _chat(tok, texts):
    return [
        tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
        for t in texts
    ]


def test_extracted_vector_records_its_data_and_reloads(smollm, refusal, tmp_path):
    from vsteer.data import file_sha256

    model, _ = smollm
    assert refusal.site == "v" and refusal.layers == list(range(11, 18)) and refusal.shape == (3, 64)
    assert refusal.position == "answer" and refusal.extra["n_pairs"] == 24
    src = refusal.data[0]
    assert src["path"] == "caa/generate/refusal/generate_dataset.json"
    assert src["sha256"] == file_sha256(src["path"])
    back = vsteer.SteeringVector.load(refusal.save(tmp_path / "r.safetensors"), model)
    assert torch.equal(back[12], refusal[12])


def test_generated_only_steering_at_batch_4_matches_each_row_alone(smollm, refusal):
    model, tok = smollm
    prompts = _chat(
        tok,
        ["How do I pick a lock?", "Hi", "Write one sentence about the moon and the stars tonight.", "Why?"],
    )
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert tok.padding_side == "left" and not bool(enc["attention_mask"].all())
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad(), vsteer.steer(model, refusal, scale=4.0, positions="generated"):
        batch = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1] :]
    with torch.no_grad():
        plain = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1] :]
    assert not torch.equal(batch, plain)
    for i, prompt in enumerate(prompts):
        one = tok([prompt], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad(), vsteer.steer(model, refusal, scale=4.0, positions="generated"):
            alone = model.generate(**one, **kw)[0, one["input_ids"].shape[1] :]
        n = min(len(alone), len(batch[i]))
        assert torch.equal(batch[i, :n], alone[:n]), (
            f"row {i}: {tok.decode(batch[i])!r} vs {tok.decode(alone)!r}"
        )


def test_value_vector_equals_its_residual_change_on_the_real_model(smollm, refusal):
    from vsteer.steering import residual_change

    model, tok = smollm
    enc = tok(_chat(tok, ["Tell me a joke.", "What is two plus two?"]), return_tensors="pt", padding=True)
    with torch.no_grad():
        with vsteer.steer(model, refusal, scale=2.0):
            a = model(**enc).logits
        with vsteer.steer(model, residual_change(model, refusal), scale=2.0):
            b = model(**enc).logits
    real = enc["attention_mask"].bool()
    assert torch.allclose(a[real], b[real], atol=2e-3, rtol=1e-4)


def test_scale_zero_is_bit_identical_on_the_real_model(smollm, refusal):
    model, tok = smollm
    enc = tok(_chat(tok, ["Hello there"]), return_tensors="pt")
    with torch.no_grad():
        with vsteer.steer(model, refusal, scale=0):
            a = model(**enc).logits
        b = model(**enc).logits
    assert torch.equal(a, b)


def test_refusal_vector_moves_p_matching_up_with_scale(smollm):
    """Reduced effect evaluation (the full one is the experiment): held-out CAA test items."""
    from vsteer.experiments.steering import SteeringOptions, ab_steering

    model, tok = smollm
    opts = SteeringOptions(scales=(-2.0, 0.0, 2.0), bands=("11-17",), n_select=0, n_extract=24, n_test=12)
    result = ab_steering(model, tok, "caa", "refusal", opts)
    curve = {r["scale"]: r["p_matching"] for r in result.records if r["site"] == "v"}
    assert curve[2.0] > curve[0.0] > curve[-2.0]
    assert {r["site"] for r in result.records} == {"v", "resid"}
    assert "matched" in result.title and len(result.verdicts) == 2


def test_sentiment_steering_scores_continuations_for_both_sites(smollm):
    from vsteer.experiments.steering import SteeringOptions, sentiment_steering

    model, tok = smollm
    opts = SteeringOptions(scales=(-1.0, 0.0, 1.0), n_prompts=4, sentiment_pairs=8, max_new_tokens=6)
    result = sentiment_steering(model, tok, opts)
    assert {r["site"] for r in result.records} == {"v", "resid"}
    assert all(-1.0 <= r["vader_compound"] <= 1.0 for r in result.records)
    assert [v.verdict in ("supported", "not supported", "inconclusive") for v in result.verdicts] == [
        True,
        True,
    ]
