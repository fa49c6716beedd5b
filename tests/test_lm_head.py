"""The materialised LM head gives TRL's fused head's fields and gradients (vsteer/lm_head.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, random_ids

from vsteer.lm_head import add_materialized_lm_head, cpu_lm_head

FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _labels(ids):
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that is not scored
    return labels


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fields_and_gradients_match_trl_fused_head(family, temperature):
    from trl.trainer.utils import add_fused_lm_head

    ids = random_ids(2, 9)
    labels = _labels(ids)
    outs, grads = [], []
    for patch in (add_fused_lm_head, add_materialized_lm_head):
        model = make_tiny_model(family).train()
        if family == "gemma3":  # logit softcapping, applied by the model's forward and by TRL's kernel
            model.config.get_text_config().final_logit_softcapping = 3.0
        patch(model, temperature=temperature, outputs=FIELDS)
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    fused, ours = outs
    torch.testing.assert_close(ours.loss, fused.loss, rtol=1e-5, atol=1e-5)
    for name in FIELDS:
        a, b = getattr(ours, name), getattr(fused, name)
        if name == "is_top1":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    assert torch.equal(ours.label_mask, fused.label_mask)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def test_without_the_flag_the_forward_is_the_models_own():
    model = make_tiny_model("llama")
    ids = random_ids()
    want = model(input_ids=ids, labels=ids)
    add_materialized_lm_head(model)
    got = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)


def test_the_swap_lasts_only_while_a_trainer_is_built_and_skips_router_losses():
    from trl.trainer import dpo_trainer, sft_trainer

    before = sft_trainer.add_fused_lm_head, dpo_trainer.add_fused_lm_head
    model = make_tiny_model("llama")
    with cpu_lm_head(model) as swapped:
        assert swapped and sft_trainer.add_fused_lm_head is add_materialized_lm_head
        assert dpo_trainer.add_fused_lm_head is before[1]  # measured slower for DPO on the CPU
    assert (sft_trainer.add_fused_lm_head, dpo_trainer.add_fused_lm_head) == before
    model.config.output_router_logits = True
    with cpu_lm_head(model) as swapped:
        assert not swapped and sft_trainer.add_fused_lm_head is before[0]
