"""Model metrics used by the comparisons: sentiment of sampled continuations, their KL to the
base model, perplexity, and next-token KL on neutral prompts.

Sentiment is scored by VADER (a lexicon, independent of every model under test).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vsteer.encoding import encode_batch, position_ids_from_mask, to_numpy
from vsteer.models import model_device


def vader_scores(texts: Sequence[str]) -> np.ndarray:
    """VADER compound score in [-1, 1] for each text."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    return np.array([vader.polarity_scores(t)["compound"] for t in texts])


@dataclass
class Samples:
    """Sampled continuations: ``sequences`` ``[n, prompt+new]`` (left-padded prompts),
    ``attention_mask`` of the same shape, ``prompt_len`` (padded), ``texts`` (new tokens only)."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    texts: list[str]


@torch.no_grad()
def sample_continuations(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 24, seed: int = 0, do_sample: bool = True
) -> Samples:
    """Continue plain-text prompts (no chat template); sampling at temperature 1 with a fixed seed."""
    enc = encode_batch(tokenizer, list(prompts), device=model_device(model))
    torch.manual_seed(seed)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=1.0 if do_sample else None,
        top_k=0 if do_sample else None,
        top_p=1.0 if do_sample else None,
        pad_token_id=tokenizer.pad_token_id,
    )
    plen = enc["input_ids"].shape[1]
    mask = torch.cat([enc["attention_mask"], torch.ones_like(out[:, plen:])], dim=1)
    texts = tokenizer.batch_decode(out[:, plen:], skip_special_tokens=True)
    return Samples(out, mask, plen, texts)


def _token_logps(model, sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[n, seq-1]`` log p of each next token."""
    sequences, mask = sequences.to(model_device(model)), mask.to(model_device(model))
    logits = model(input_ids=sequences, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logits = logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, sequences[:, 1:, None])[..., 0]


@torch.no_grad()
def continuation_logp(model, samples: Samples) -> np.ndarray:
    """``[n]`` log p of each sampled continuation (its generated tokens only) under ``model``."""
    lp = _token_logps(model, samples.sequences, samples.attention_mask)
    keep = torch.zeros_like(lp, dtype=torch.bool)
    keep[:, samples.prompt_len - 1 :] = True
    return to_numpy((lp * keep).sum(-1))


def sequence_kl(policy, reference, samples: Samples) -> np.ndarray:
    """Per-sample estimate of KL(policy || reference) over the continuation:
    ``log p_policy(y) - log p_ref(y)`` for ``y`` sampled from the policy (the DPO paper's
    sequence-level KL)."""
    return continuation_logp(policy, samples) - continuation_logp(reference, samples)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity over ``[n, window]`` token windows (all tokens but the first of each)."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(model_device(model))
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return float(np.exp(total / count))


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """``[n, vocab]`` log-probabilities of the token after each prompt."""
    enc = encode_batch(tokenizer, list(prompts), device=model_device(model))
    logits = model(**enc).logits[:, -1].float()
    return torch.log_softmax(logits, -1).cpu()


def kl_rows(base_logp: torch.Tensor, logp: torch.Tensor) -> np.ndarray:
    """KL(base || other) per row of two ``[n, vocab]`` log-probability tables."""
    return to_numpy((base_logp.exp() * (base_logp - logp)).sum(-1))
