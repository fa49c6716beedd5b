"""Padding-free (packed) SFT batches: attention must not leak across the packed sequences.

TRL's ``padding_free=True`` (and ``packing=True`` with the ``bfd``/``bfd_split`` strategies, which
implies it) flattens a batch into one row whose ``position_ids`` restart at 0 for each sequence,
with no attention mask. With ``sdpa``/``eager`` attention, transformers 5.24 builds the
per-sequence (block-diagonal) mask from those ``position_ids`` only when the forward runs without
a KV cache (``masking_utils._preprocess_mask_arguments``: ``attention_mask is None and cache is
None``); a forward with ``use_cache`` left at the config's ``True`` lets every token attend to the
sequences packed before it. TRL's ``SFTTrainer.compute_loss`` passes ``use_cache=False`` (and the
Trainer sets ``config.use_cache = args.use_cache``, ``False``), so ``vsteer.train`` sees the padded
loss: the first test pins the leak of a cached forward (it notices if transformers changes), the
second that training and evaluation through ``vsteer.train`` do not have it.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model
from test_train import char_tokenizer

ROWS = [{"prompt": f"q{i}:", "completion": " ok" + "!" * (i % 4)} for i in range(24)]


@pytest.fixture
def sft_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _recipe(data_file, **training):
    return {
        "name": "packed",
        "method": "sft",
        "data": {"train": str(data_file), "eval_size": 8},
        "adapter": {"targets": "v", "r": 4},
        # one eval batch holding every eval row: eval_loss is then the token mean in both layouts
        "training": {"max_steps": 1, "batch_size": 4, "eval_batch_size": 8, "max_length": 64, **training},
    }


def _model(attn: str):
    model = make_tiny_model("llama")
    model.config._attn_implementation = attn
    return model


def _packed_trainer(model, sft_file, tmp_path, **training):
    from vsteer.recipes import load_recipe, load_recipe_data
    from vsteer.train import _make_trainer, quiet_libraries

    recipe = load_recipe(_recipe(sft_file, **training))
    with quiet_libraries():
        trainer = _make_trainer(
            recipe, model, char_tokenizer(), load_recipe_data(recipe), tmp_path / "out", eval_only=True
        )
    batch = next(iter(trainer.get_eval_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and int((batch["position_ids"] == 0).sum()) >= 4, (
        "the eval batch should be one row of several packed sequences"
    )
    return trainer, batch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_batch_leaks_across_sequences_only_in_a_forward_with_a_cache(attn, sft_file, tmp_path):
    model = _model(attn)
    trainer, batch = _packed_trainer(model, sft_file, tmp_path, packing=True)  # bfd: padding-free
    assert trainer.padding_free
    model.eval()
    with torch.no_grad():
        cached = model(**batch, use_cache=True).loss.item()
        uncached = model(**batch, use_cache=False).loss.item()
        # the same sequences, one per row, padded, with an attention mask
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        rows = [(a, b) for a, b in zip(starts, starts[1:])]
        width = max(b - a for a, b in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (a, b) in enumerate(rows):
            ids[i, : b - a], labels[i, : b - a], mask[i, : b - a] = (
                batch["input_ids"][0, a:b],
                batch["labels"][0, a:b],
                1,
            )
        padded = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.item()
    assert uncached == pytest.approx(padded, rel=1e-5)
    # if this starts failing, transformers masks packed sequences with a cache too: the leak is gone
    assert abs(cached - padded) > 1e-4, f"no leak with a cache any more: {cached} vs {padded}"


@pytest.mark.parametrize("training", [{"packing": True}, {"packing": True, "padding_free": True}])
def test_padding_free_training_sees_the_padded_loss_under_sdpa(training, sft_file, tmp_path):
    from vsteer.train import evaluate_sft_loss

    model = _model("sdpa")
    trainer, batch = _packed_trainer(model, sft_file, tmp_path, **training)
    model.train()  # the training-mode forward, through TRL's compute_loss
    with torch.no_grad():
        train_mode = trainer.compute_loss(model, dict(batch)).item()
    model.eval()
    packed = trainer.evaluate()["eval_loss"]
    padded = evaluate_sft_loss(_model("sdpa"), char_tokenizer(), _recipe(sft_file))
    assert packed == pytest.approx(padded, rel=1e-5)
    assert train_mode == pytest.approx(padded, rel=1e-5)  # no dropout in the tiny model
