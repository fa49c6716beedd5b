"""Helpers shared by the claim experiments: batching, positions, unembedding.

Padded batches come from :func:`vsteer.encoding.encode_batch` (the one helper that pads).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from vsteer.arch import get_arch, unwrap
from vsteer.errors import DataError


def progress(iterable: Iterable, desc: str, enabled: bool | None = None, total: int | None = None):
    """A tqdm bar on stderr; ``enabled=None`` follows ``VSTEER_PROGRESS`` (on unless ``0``)."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = os.environ.get("VSTEER_PROGRESS", "1") != "0"
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False)


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    if size < 1:
        raise DataError(f"batch size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield items[i : i + size]


def require_items(items: Sequence, what: str) -> Sequence:
    """Raise one clear line when a dataset is empty."""
    if items is None or len(items) == 0:
        raise DataError(f"{what} is empty: the experiment needs at least one item")
    return items


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (``[batch]``), for any padding side."""
    seq = attention_mask.shape[1]
    idx = torch.arange(seq, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, -1).max(dim=1).values


def forward_logits(model: nn.Module, last_only: bool = False, **inputs) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` (``[batch, 1, vocab]`` with ``last_only``) without gradients."""
    kwargs = {"logits_to_keep": 1} if last_only else {}
    with torch.no_grad():
        return unwrap(model)(**inputs, use_cache=False, **kwargs).logits.float()


def final_norm(model: nn.Module) -> nn.Module:
    arch = get_arch(model)
    for path in arch.spec.final_norm:
        try:
            return arch.model.get_submodule(path)
        except AttributeError:
            continue
    raise DataError(f"{arch.family}: no final norm at {list(arch.spec.final_norm)}")


def unembedding(model: nn.Module) -> torch.Tensor:
    """The unembedding matrix ``[vocab, d_model]``."""
    arch = get_arch(model)
    try:
        return arch.model.get_submodule(arch.spec.unembed).weight
    except AttributeError:  # a spec's name can lag the class (GPT-NeoX's embed_out); HF knows its head
        head = arch.model.get_output_embeddings()
        if head is None:
            raise DataError(f"{arch.family}: no unembedding at {arch.spec.unembed!r}") from None
        return head.weight


def norm_gain(norm: nn.Module, d_model: int) -> torch.Tensor:
    """The elementwise gain of a LayerNorm/RMSNorm ``[d_model]``, up to a positive scale.

    Measured by feeding the norm a constant vector, so variants that store ``weight - 1``
    (Gemma) need no special case; LayerNorm's mean subtraction would zero a constant input, so
    its ``weight`` is read directly.
    """
    with torch.no_grad():
        if isinstance(norm, nn.LayerNorm):
            return norm.weight.detach().float().cpu().clone()
        p = next(norm.parameters(), None)
        x = torch.ones(1, d_model, dtype=p.dtype if p is not None else torch.float32)
        x = x.to(p.device) if p is not None else x
        # = gain / sqrt(1 + eps): scale does not matter here; on the CPU, where the readouts run
        return norm(x)[0].detach().float().cpu()


def token_strings(tokenizer, ids: Iterable[int]) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def subsample(items: Sequence, n: int | None, seed: int) -> list:
    """``n`` items drawn without replacement in a seed-fixed order (all when ``n`` is None or larger)."""
    items = list(items)
    if n is None or n >= len(items):
        return items
    idx = np.sort(rng(seed).choice(len(items), size=n, replace=False))
    return [items[i] for i in idx]
