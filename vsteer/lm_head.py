"""A materialised LM head for TRL's trainers on the CPU.

TRL's SFT and DPO trainers patch the model with a *fused* LM head (``trl.trainer.utils.
add_fused_lm_head``): per-token log-probabilities computed in vocabulary tiles, never holding the
``[batch, seq, vocab]`` logits, with the logits recomputed in backward. On a GPU that saves memory
for long sequences. On the CPU the tiles run as plain torch ops: for SmolLM2 (vocabulary 49,152)
it made SFT slower than the model's own forward and loss (measurements below), and the logits of
a CPU-sized batch fit easily in memory.

:func:`cpu_lm_head` swaps in :func:`add_materialized_lm_head` while an SFT trainer is built: the
same ``FusedCausalLMOutput`` fields from the model's own logits (so softcapping and logit scaling
are the model's, as in its own loss). ``tests/test_lm_head.py`` checks every field and the
gradients against TRL's kernel. Measured with the comparison's jobs (SmolLM2, 12 steps, one
thread, 2026-12-02): SFT 17.9 s with this head vs 20.9 s with TRL's; DPO the other way round,
34.5 s vs 29.1 s (its reference pass runs without gradients, where TRL's tiles cost least), so
DPO keeps TRL's head.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch


def add_materialized_lm_head(
    model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False, outputs: tuple = ("log_probs",)
) -> None:
    """Patch ``model`` like ``trl.trainer.utils.add_fused_lm_head`` (same signature and outputs),
    computing the fields from the full logits. ``cast_lm_head_to_fp32`` is accepted for the
    signature; the logits are upcast to fp32 before any reduction either way."""
    from trl.trainer.utils import FusedCausalLMOutput

    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw
    ):
        if not fused_lm_head:
            for name, value in (
                ("labels", labels),
                ("shift_labels", shift_labels),
                ("num_items_in_batch", num_items_in_batch),
            ):
                if value is not None:
                    kw[name] = value
            return original_forward(*args, **kw)
        kw["use_cache"] = False
        logits = original_forward(*args, **kw).logits
        if shift_labels is None:
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        labels = labels.to(logits.device)
        mask = labels != -100
        z = logits.float() / temperature  # [batch, seq, vocab]
        log_z = torch.logsumexp(z, -1)
        target = z.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        log_probs = (target - log_z).masked_fill(~mask, 0.0)
        fields = dict.fromkeys(("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
        with torch.no_grad():  # metrics (TRL's SFT and DPO losses use log_probs only)
            zd, lzd = z.detach(), log_z.detach()
            if "entropy" in outputs or "log_sum_sq_probs" in outputs:
                log_p = zd - lzd.unsqueeze(-1)
                if "entropy" in outputs:
                    fields["entropy"] = (-(log_p.exp() * log_p).sum(-1)).masked_fill(~mask, 0.0)
                if "log_sum_sq_probs" in outputs:
                    fields["log_sum_sq_probs"] = torch.logsumexp(2 * log_p, -1).masked_fill(~mask, 0.0)
                del log_p
            if "mean_logits" in outputs:
                fields["mean_logits"] = zd.mean(-1).masked_fill(~mask, 0.0)
            if "is_top1" in outputs:
                # argmax returns the first maximum, as TRL's kernel counts ties
                fields["is_top1"] = (zd.argmax(-1) == labels) & mask
        loss = -log_probs.sum() / (
            mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        )
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, aux_loss=None, **fields)

    model.forward = types.MethodType(forward, model)


def usable(model) -> bool:
    """Whether the materialised head can stand in for TRL's: a CPU model without MoE router
    losses (TRL's head adds those; this one does not)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return on_cpu and not getattr(config, "output_router_logits", False)


@contextlib.contextmanager
def cpu_lm_head(model):
    """While a TRL SFT trainer is built for ``model``: the materialised head instead of TRL's
    fused one when :func:`usable`, else unchanged (DPO trainers keep TRL's head: see above)."""
    if not usable(model):
        yield False
        return
    from trl.trainer import sft_trainer

    saved = {sft_trainer: sft_trainer.add_fused_lm_head}
    try:
        for m in saved:
            m.add_fused_lm_head = add_materialized_lm_head
        yield True
    finally:
        for m, fn in saved.items():
            m.add_fused_lm_head = fn
