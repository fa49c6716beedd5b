"""One encoding helper: a left-padded batch gives every row the numbers it gets alone.

vsteer imports sit inside the tests, so that the experiments' batch tests also run on code
without :mod:`vsteer.encoding` (there they fail for GPT-2, whose positions are learned).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FAMILIES, make_tiny_model
from test_experiments import TOK, WordTokenizer

from vsteer.encoding import length_batches, pad_batch
from vsteer.errors import DataError

SITES = ("q", "k", "v", "z", "attn", "resid", "mlp")
# three rows of different lengths, so two of them are padded
SEQS = [[5, 17, 33], [8, 9, 10, 11, 12, 13, 14], [40, 41, 42, 43, 44]]
TEXTS = [
    "a short one",
    "this sentence is quite a lot longer than the others are",
    "mid length text here",
    "x",
    "four words in it",
]


class ChatTok(WordTokenizer):
    """The test tokenizer with a chat template: the messages' contents, then the turn opener."""

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        return " ".join(m["content"] for m in messages) + (" answer:" if add_generation_prompt else "")


# ---- the helper -----------------------------------------------------------------------------
def test_left_padding_puts_real_tokens_last_and_counts_positions_from_the_first_real_token():
    from vsteer.encoding import pad_batch

    b = pad_batch([[5, 6, 7], [8]], pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert all(t.dtype == torch.long for t in b.values())


def test_right_padding_on_request():
    from vsteer.encoding import pad_batch

    b = pad_batch([[5, 6, 7], [8]], pad_token_id=1, padding_side="right")
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_max_length_keeps_the_first_tokens_and_a_device_is_honoured():
    from vsteer.encoding import pad_batch

    b = pad_batch([[1, 2, 3, 4], [5]], max_length=2, device="meta")
    assert b["input_ids"].shape == (2, 2) and b["input_ids"].device.type == "meta"
    assert pad_batch([[1, 2, 3, 4]], max_length=2)["input_ids"].tolist() == [[1, 2]]


def test_texts_ids_and_chat_messages_encode_the_same_way():
    from vsteer.encoding import encode_batch

    tok = ChatTok()
    ids = tok("hello there answer:")["input_ids"]
    for item in ("hello there answer:", ids, torch.tensor(ids), [{"role": "user", "content": "hello there"}]):
        assert encode_batch(tok, [item, "x"])["input_ids"][0].tolist() == ids


@pytest.mark.parametrize(
    "bad, message",
    [([], "at least one"), ([[]], "no tokens"), ([3.5], "string, token ids or chat messages")],
)
def test_bad_items_are_one_error_line(bad, message):
    from vsteer.encoding import encode_batch

    with pytest.raises(DataError, match=message) as err:
        encode_batch(TOK, bad)
    assert "\n" not in str(err.value)


def test_padding_side_other_than_left_or_right_is_refused():
    from vsteer.encoding import pad_batch

    with pytest.raises(DataError, match="padding_side"):
        pad_batch([[1]], padding_side="middle")


def test_a_real_tokenizer_gives_what_its_own_left_padding_gives():
    from test_models import _tiny_tokenizer

    from vsteer.encoding import encode_batch

    tok = _tiny_tokenizer()
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    texts = ["w1 w2 w3 w4", "w5", "w6 w7"]
    ours = encode_batch(tok, texts, max_length=3)
    theirs = tok(texts, padding=True, truncation=True, max_length=3, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    tok.padding_side = "right"  # the tokenizer's own setting is neither read nor changed
    assert torch.equal(encode_batch(tok, texts, max_length=3)["input_ids"], theirs["input_ids"])
    assert tok.padding_side == "right"


# ---- every family, every site ---------------------------------------------------------------
def _last_token(model, batch, sites):
    from vsteer.hooks import captured_forward

    acts = captured_forward(model, sites, stop=False, use_cache=False, **batch)
    return {s: acts[s][:, -1] for s in sites}


@pytest.fixture(scope="module")
def models():
    return {f: make_tiny_model(f) for f in FAMILIES}


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_gives_each_rows_last_token_activations(models, family, site):
    from vsteer.encoding import pad_batch

    model = models[family]
    sites = [(site, layer) for layer in range(3)]
    batched = _last_token(model, pad_batch(SEQS), sites)
    for row, seq in enumerate(SEQS):
        alone = _last_token(model, pad_batch([seq]), sites)
        for s in sites:
            torch.testing.assert_close(
                batched[s][row], alone[s][0], atol=1e-5, rtol=1e-5, msg=f"{s} row {row}"
            )


def test_without_position_ids_gpt2s_learned_positions_break_the_batch(models):
    """The test above can fail: the old code's batches (mask, no position ids) differ on GPT-2."""
    from vsteer.encoding import pad_batch

    model, sites = models["gpt2"], [("resid", 2)]
    batch = pad_batch(SEQS)
    del batch["position_ids"]
    batched = _last_token(model, batch, sites)[sites[0]]
    alone = _last_token(model, pad_batch(SEQS[:1]), sites)[sites[0]]
    assert (batched[0] - alone[0]).abs().max() > 1e-3


# ---- the experiments' batch paths -----------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_probe_features_batched_equal_one_by_one(models, family):
    from vsteer.experiments.probing import collect_features

    for position in ("last", "mean"):
        kw = dict(position=position, progress_bar=False)
        together = collect_features(models[family], TOK, TEXTS, batch_size=5, **kw)
        alone = collect_features(models[family], TOK, TEXTS, batch_size=1, **kw)
        for key in together:
            np.testing.assert_allclose(together[key], alone[key], atol=1e-5, rtol=1e-5, err_msg=str(key))


def _pair(src, don, a_src, a_don, template):
    from vsteer.experiments.patching import CounterfactualPair

    return CounterfactualPair(template.format(src), template.format(don), src, don, a_src, a_don)


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_batched_equals_one_by_one(models, family):
    from vsteer.experiments.patching import align_pair, patch_pairs

    pairs = [
        _pair("Rome", "Oslo", "Italy", "Norway", "I live in {}. The country I live in is"),
        _pair("Lima", "Kiev", "Peru", "Ukraine", "{} is in"),
        _pair("Oslo", "Rome", "Norway", "Italy", "We all went to {} and then we saw that it is in"),
    ]
    aligned = [align_pair(TOK, p) for p in pairs]
    kw = dict(sites=("v", "resid"), layers=[1], progress_bar=False)
    together = patch_pairs(models[family], TOK, aligned, batch_size=3, **kw)
    alone = patch_pairs(models[family], TOK, aligned, batch_size=1, **kw)
    for key in ("clean", "donor"):
        np.testing.assert_allclose(together[key], alone[key], atol=1e-4, err_msg=key)
    for key in together["patched"]:
        np.testing.assert_allclose(
            together["patched"][key], alone["patched"][key], atol=1e-4, err_msg=str(key)
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_swaps_perplexity_and_kl_batched_equal_one_by_one(models, family):
    from vsteer.experiments.swaps import SwapConfig, run_swaps

    text = " ".join(f"word{i % 13} and thing{i % 7}." for i in range(200))

    def records(batch_size):
        config = SwapConfig(n_pairs=1, n_windows=2, window=16, matrices=("v", "k"), batch_size=batch_size)
        return run_swaps(models[family], TOK, config, text=text, prompts=TEXTS, progress_bar=False).records

    # the tiny models' swap effects are small (KL ~1e-5), so KL is compared relative to its size;
    # Δlog-ppl is a difference of two log-perplexities ~4.6, good to float32 noise
    for a, b in zip(records(5), records(1), strict=True):
        assert a["delta_log_ppl"] == pytest.approx(b["delta_log_ppl"], abs=2e-6), (a, b)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-2, abs=1e-7), (a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_basis_features_batched_equal_one_by_one(models, family):
    from vsteer.experiments.basis import BasisConfig, run_basis

    items = [(f"x {'good' if i % 2 else 'bad'} {'long ' * (i % 5)}{i}", i % 2) for i in range(12)]

    def records(batch_size):
        config = BasisConfig(n_shuffles=5, n_boot=10, batch_size=batch_size)
        return run_basis(models[family], TOK, config, items=items, progress_bar=False).records

    for a, b in zip(records(12), records(1), strict=True):
        for key in ("write_share", "write_shuffled", "read_share"):
            assert a[key] == pytest.approx(b[key], abs=1e-5, nan_ok=True), key


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_p_matching_and_extraction_batched_equal_one_by_one(models, family):
    from vsteer.experiments.steering import p_matching
    from vsteer.extraction import collect

    tok = ChatTok()
    items = [SimpleNamespace(question=t, matching="(A)", not_matching="(B)") for t in TEXTS]
    model = models[family]
    np.testing.assert_allclose(
        p_matching(model, tok, items, batch_size=5), p_matching(model, tok, items, batch_size=1), atol=1e-5
    )
    for position in ("last", "mean"):
        together = collect(model, tok, TEXTS, ["v", "resid"], [0, 2], position, batch_size=5)
        alone = collect(model, tok, TEXTS, ["v", "resid"], [0, 2], position, batch_size=1)
        for key in together:
            torch.testing.assert_close(together[key], alone[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_next_token_logprobs_batched_equal_one_by_one(models, family):
    from vsteer.metrics import next_token_logprobs

    together = next_token_logprobs(models[family], TOK, TEXTS)
    alone = torch.cat([next_token_logprobs(models[family], TOK, [t]) for t in TEXTS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_length_batches_group_similar_lengths_and_cover_every_row_once():
    from vsteer.encoding import length_batches
    from vsteer.errors import DataError

    lengths = [5, 1, 9, 3, 3, 7, 2]
    batches = length_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [3, 3, 1]
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)  # sorted, ties in their original order
    assert batches[0] == [1, 6, 3]
    assert length_batches([], 4) == []
    with pytest.raises(DataError, match="batch_size must be an integer >= 1, got 0"):
        length_batches(lengths, 0)


@pytest.mark.parametrize(
    "rows, words",
    [
        (["123"], "sequence 0 must be a list of token ids, got str"),
        ([[3.9, 4.2]], "sequence 0 has 3.9"),
        ([[5, 1], [5, -7]], "sequence 1 has -7"),
        ([[True, False]], "sequence 0 has True"),
        ([torch.tensor([1.0, 2.0])], "1-D integer tensor"),
    ],
)
def test_pad_batch_refuses_what_is_not_token_ids(rows, words):
    """Found in review: a string was split into digit ids, floats truncated, negative ids kept."""
    with pytest.raises(DataError, match=words) as err:
        pad_batch(rows, 0)
    assert "\n" not in str(err.value)
    assert pad_batch([np.array([3, 4]), torch.tensor([5])], 0)["input_ids"].tolist() == [[3, 4], [0, 5]]


@pytest.mark.parametrize("size", [0, 2.0, True, "4"])
def test_length_batches_refuses_a_batch_size_that_is_not_a_positive_integer(size):
    with pytest.raises(DataError, match="batch_size must be an integer >= 1"):
        length_batches([3, 1, 2], size)


@pytest.mark.parametrize("limit", [-1, 0, 2.5, True])
def test_a_limit_that_is_not_a_positive_integer_is_one_line_not_a_silent_slice(limit):
    """Found in review: ``limit=-1`` dropped the last pair or question silently (a slice end)."""
    from vsteer import extraction

    for call in (
        lambda: extraction.template_pairs(limit=limit),
        lambda: extraction.sst2_pairs(limit=limit),
        lambda: extraction.pairs_from_data([{"positive": "a", "negative": "b"}] * 3, limit=limit),
        lambda: extraction.questions_from_data(["q1", "q2"], limit=limit),
    ):
        with pytest.raises(DataError, match="limit must be an integer >= 1") as err:
            call()
        assert "\n" not in str(err.value)
    assert len(extraction.questions_from_data(["q1", "q2", "q3"], limit=2)) == 2
