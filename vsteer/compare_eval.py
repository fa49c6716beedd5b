"""Measurements behind an adapter comparison (:mod:`vsteer.compare`), all per item and cheap.

* :func:`item_logps`: mean token log-probability of each scored text given its prompt
  (``[n_items]``); the primary metrics are shifts of it relative to the base model.
* :func:`item_subset`, :func:`item_blocks`: which items a run scores (the statistics over them
  are in :mod:`vsteer.compare_stats`).
* :func:`kl_and_ppl`: per-token KL(arm || base) and perplexity on WikiText-2 windows (one forward).
* :func:`ablate`: a context that drops the learned LoRA update of one projection type.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from vsteer.encoding import pad_batch, pad_token_id

PROJECTION_TYPES = ("q", "k", "v", "o", "mlp")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _autocast(model, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(_device(model).type, dtype=dtype)


@torch.no_grad()
def item_logps(model, tokenizer, items, max_length: int = 128, batch_size: int = 32, precision: str = "fp32"):
    """``[n]`` mean log p per token of each item's text given its prompt (text tokens only).

    Rows are right-padded with position ids (:func:`vsteer.encoding.pad_batch`); long prompts are
    cut from the left so the text is kept.
    """
    was_training = model.training
    model.eval()
    seqs, starts = [], []
    for it in items:
        p = tokenizer(it.prompt, add_special_tokens=False)["input_ids"] if it.prompt else []
        sep = " " if it.prompt and not it.text.startswith((" ", "\n")) else ""
        t = tokenizer(sep + it.text, add_special_tokens=False)["input_ids"][: max_length - 1]
        if not p:  # an unprompted text: condition its first token on the BOS (or, lacking one, skip it)
            bos = tokenizer.bos_token_id
            p = [bos] if bos is not None else []
        p = p[-max(max_length - len(t), 1) :]
        seqs.append(p + t)
        starts.append(len(p) if p else 1)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = np.zeros(len(seqs))
    pad, device = pad_token_id(tokenizer), _device(model)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        batch = pad_batch([seqs[i] for i in idx], pad, padding_side="right", device=device)
        with _autocast(model, precision):
            logits = model(**batch, use_cache=False).logits
        logits = logits[:, :-1].float()
        tok = batch["input_ids"][:, 1:]
        # log p(token) = logit - logsumexp: no [batch, seq, vocab] log-softmax copy
        lp = logits.gather(-1, tok[..., None])[..., 0] - torch.logsumexp(logits, -1)
        del logits
        for row, i in enumerate(idx):
            s, n = starts[i], len(seqs[i])
            out[i] = float(lp[row, s - 1 : n - 1].mean())
    model.train(was_training)
    return out


def item_subset(items, n: int | None, seed: int = 0) -> list[int]:
    """Sorted indices of a fixed random subset of ``items``: ``n`` per label, or ``n`` whole
    pairs when the items come in groups (chosen/rejected); all items when ``n`` is None or not
    smaller than what there is."""
    rng = np.random.default_rng(seed)
    groups = [i.group for i in items]
    if all(g is not None for g in groups):
        keys = sorted(set(groups))
        if n is None or n >= len(keys):
            return list(range(len(items)))
        keep = {keys[j] for j in rng.choice(len(keys), size=n, replace=False)}
        return [i for i, g in enumerate(groups) if g in keep]
    out = []
    for label in sorted({i.label for i in items}):
        idx = [i for i, it in enumerate(items) if it.label == label]
        out += idx if n is None or n >= len(idx) else rng.choice(idx, size=n, replace=False).tolist()
    return sorted(out)


def item_blocks(items, n_blocks: int) -> list[list[int]]:
    """``n_blocks`` disjoint index lists covering ``items``, balanced by label: whole pairs (by
    group, in order of first appearance) or, for unpaired items, each label's items dealt out in
    turn. A comparison with ``test_items: per-seed`` scores seed ``j``'s runs on block ``j``."""
    if n_blocks < 1:
        raise ValueError("n_blocks must be >= 1")
    blocks: list[list[int]] = [[] for _ in range(n_blocks)]
    groups = [i.group for i in items]
    if groups and all(g is not None for g in groups):
        order: dict = {}
        for g in groups:
            order.setdefault(g, len(order))
        for i, g in enumerate(groups):
            blocks[order[g] % n_blocks].append(i)
        return blocks
    seen: dict = {}
    for i, it in enumerate(items):
        k = seen.get(it.label, 0)
        seen[it.label] = k + 1
        blocks[k % n_blocks].append(i)
    return blocks


@torch.no_grad()
def kl_and_ppl(
    model, windows: torch.Tensor, base_logp: torch.Tensor | None, precision: str = "fp32", batch_size: int = 8
):
    """(mean per-token KL(model || base), perplexity) over ``[n, window]`` token windows;
    ``base_logp`` ``[n, window-1, vocab]`` (None: returns the model's own log-probs instead of KL)."""
    logps, nll, count = [], 0.0, 0
    kl_sum = 0.0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(_device(model))
        with _autocast(model, precision):
            logits = model(input_ids=ids, use_cache=False).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        nll -= float(lp.gather(-1, ids[:, 1:, None]).sum())
        count += ids[:, 1:].numel()
        if base_logp is None:
            logps.append(lp.cpu())
        else:
            b = base_logp[i : i + batch_size].float().to(lp.device)
            kl_sum += float((lp.exp() * (lp - b)).sum())
    ppl = float(np.exp(nll / count))
    if base_logp is None:
        return torch.cat(logps), ppl
    return kl_sum / count, ppl


# ---- ablation and update norms -----------------------------------------------------------


def _lora_modules(peft_model):
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            yield name, module


def _role_rows(peft_model, name: str, module) -> dict[str, torch.Tensor | None]:
    """Projection types a LoRA module's output rows belong to (``None``: all its rows)."""
    from vsteer.arch import get_arch

    base = peft_model.get_base_model()
    arch = get_arch(base)
    leaf = name.rsplit(".", 1)[-1]
    mlp_names = {n.rsplit(".", 1)[-1] for n in arch.spec.mlp_targets}
    if leaf in mlp_names and f".{arch.spec.mlp}." in f".{name}.":
        return {"mlp": None}
    rows = {}
    for role in ("q", "k", "v", "o"):
        try:
            path = arch.module_path(0, role)
        except Exception:  # noqa: BLE001 - a role the architecture does not have
            continue
        if path.rsplit(".", 1)[-1] == leaf:
            rows[role] = arch.rows(role) if arch.is_fused(role) else None
    return rows


@contextlib.contextmanager
def ablate(peft_model, projection: str):
    """Drop the learned update of one projection type (``q``/``k``/``v``/``o``/``mlp``) while inside:
    its ``lora_B`` rows are zeroed and restored on exit (fused modules: only that role's rows)."""
    saved = []
    try:
        with torch.no_grad():
            for name, module in _lora_modules(peft_model):
                roles = _role_rows(peft_model, name, module)
                if projection not in roles:
                    continue
                w = module.lora_B["default"].weight
                saved.append((w, w.detach().clone()))
                rows = roles[projection]
                if rows is None:
                    w.zero_()
                else:
                    w[rows.to(w.device)] = 0
        yield len(saved)
    finally:
        with torch.no_grad():
            for w, old in saved:
                w.copy_(old)


@torch.no_grad()
def update_norms(peft_model) -> dict[str, float]:
    """Per projection type, ``||Delta W||_F / ||W||_F`` summed over its modules (relative update norm)."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for name, module in _lora_modules(peft_model):
        a = module.lora_A["default"].weight.float()
        b = module.lora_B["default"].weight.float()
        delta = (b @ a) * float(module.scaling["default"])  # [out, in]
        w = module.base_layer.weight.float()
        if tuple(w.shape) != tuple(delta.shape):  # Conv1D stores [in, out]
            w = w.T
        for role, rows in _role_rows(peft_model, name, module).items():
            d, ww = (delta, w) if rows is None else (delta[rows], w[rows])
            num[role] = num.get(role, 0.0) + float((d**2).sum())
            den[role] = den.get(role, 0.0) + float((ww**2).sum())
    return {r: float(np.sqrt(num[r] / den[r])) for r in num if den[r] > 0}


def vader_of_samples(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, seed: int) -> np.ndarray:
    """``[n]`` VADER compound of sampled continuations of ``prompts`` (face validity of style)."""
    from vsteer.metrics import sample_continuations, vader_scores

    return vader_scores(sample_continuations(model, tokenizer, prompts, max_new_tokens, seed).texts)
