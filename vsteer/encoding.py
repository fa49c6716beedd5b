"""Model inputs and outputs: the one place that pads batches, and the one way tensors leave a model.

Every padded batch vsteer feeds a model comes from :func:`encode_batch` (texts, token ids or
chat messages) or :func:`pad_batch` (token ids). Both return ``input_ids``, ``attention_mask``
and ``position_ids``, each ``[batch, seq]`` long. Position ids count real tokens only (the
attention mask's cumulative sum minus one, 0 on padding): without them a model numbers the
positions of a left-padded row from the first *pad* token, which models with learned absolute
positions (GPT-2) do not forgive, so a row's activations would depend on its batch.

Left padding (the default) puts the last real token of every row at index ``seq - 1``, so "the
last token" is one absolute position for the hook layer, and ``generate`` appends to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vsteer.errors import DataError

PADDING_SIDES = ("left", "right")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` position of each token among its row's real tokens (0 on padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_batch(
    sequences: Sequence[Sequence[int]],
    pad_token_id: int = 0,
    padding_side: str = "left",
    max_length: int | None = None,
    device=None,
) -> dict[str, torch.Tensor]:
    """Pad token-id lists into ``{input_ids, attention_mask, position_ids}``, each ``[batch, seq]``.

    ``max_length`` keeps the first ``max_length`` tokens of each row; ``device`` moves the batch.
    """
    if padding_side not in PADDING_SIDES:
        raise DataError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if max_length is not None and max_length < 1:
        raise DataError(f"max_length must be >= 1, got {max_length}")
    rows = [_ids_row(seq, i)[:max_length] for i, seq in enumerate(sequences)]
    if not rows:
        raise DataError("a batch needs at least one sequence")
    for i, row in enumerate(rows):
        if not row:
            raise DataError(f"sequence {i} of the batch has no tokens")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
    return to_device(batch, device) if device is not None else batch


def _is_id(t) -> bool:
    return isinstance(t, int | np.integer) and not isinstance(t, bool | np.bool_) and t >= 0


def _ids_row(seq, i: int) -> list[int]:
    """Row ``i`` of a batch of token ids, checked: integers >= 0 (not booleans, floats or a string)."""
    if isinstance(seq, torch.Tensor):
        if seq.dim() != 1 or seq.is_floating_point() or seq.dtype == torch.bool:
            raise DataError(
                f"sequence {i} must be a 1-D integer tensor of token ids, got {seq.dtype} {tuple(seq.shape)}"
            )
        seq = seq.tolist()
    if isinstance(seq, str | bytes) or not isinstance(seq, Sequence | np.ndarray):
        raise DataError(f"sequence {i} must be a list of token ids, got {type(seq).__name__}: {seq!r:.60}")
    bad = next((t for t in seq if not _is_id(t)), None)
    if bad is not None:
        raise DataError(f"sequence {i} has {bad!r}: token ids are integers >= 0")
    return [int(t) for t in seq]


def token_ids(tokenizer, item, add_special_tokens: bool = True) -> list[int]:
    """Token ids of one item: a text, a list of token ids, or chat messages.

    Chat messages go through the chat template with the generation prompt (the assistant turn
    opens); the template writes its own special tokens, so none are added on top.
    """
    if isinstance(item, str):
        return list(tokenizer(item, add_special_tokens=add_special_tokens)["input_ids"])
    if isinstance(item, torch.Tensor) and item.dim() == 1 and not item.is_floating_point():
        return item.tolist()
    if isinstance(item, list | tuple) and item and all(isinstance(m, dict) for m in item):
        text = tokenizer.apply_chat_template(list(item), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(item, list | tuple) and all(isinstance(t, int | np.integer) for t in item):
        return _ids_row(item, 0)
    raise DataError(
        f"a batch item must be a string, token ids or chat messages, got {type(item).__name__}: {item!r:.80}"
    )


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id (padding is masked out, so 0 serves when it has none)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def encode_batch(
    tokenizer,
    items: Sequence,
    padding_side: str = "left",
    max_length: int | None = None,
    add_special_tokens: bool = True,
    device=None,
) -> dict[str, torch.Tensor]:
    """Tokenise ``items`` (texts, token-id lists or chat messages; see :func:`token_ids`) into a
    padded batch ``{input_ids, attention_mask, position_ids}``, each ``[batch, seq]``.

    The tokenizer's own ``padding_side`` is neither read nor changed: transformers versions load
    different defaults from the same files.
    """
    if isinstance(items, str):
        raise DataError("encode_batch takes a list of items; wrap a single text in a list")
    items = list(items)
    if not items:
        raise DataError("a batch needs at least one item")
    seqs = [token_ids(tokenizer, item, add_special_tokens) for item in items]
    return pad_batch(seqs, pad_token_id(tokenizer), padding_side, max_length, device)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of at most ``batch_size`` rows of similar length (a stable
    sort by ``lengths``), so that padding a batch costs little compute. Every index appears once."""
    if not isinstance(batch_size, int | np.integer) or isinstance(batch_size, bool) or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def to_device(batch: dict, device) -> dict:
    """``batch`` with every tensor on ``device`` (other values unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A model output as a NumPy array: detached, on the CPU, half types (bfloat16, float16) as
    float32; float32/float64, integer and bool tensors keep their dtype.

    ``.numpy()`` alone fails on a tensor that requires grad or lives on a GPU, and NumPy has no
    bfloat16.
    """
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.cpu().numpy()
