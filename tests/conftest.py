"""Shared fixtures: tiny random-config models of each supported family, built in the test."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

# the real embedded models are materialised once per machine into this cache
os.environ.setdefault("VSTEER_CACHE", os.path.expanduser("~/.cache/vsteer"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 97


def _tiny_config(family: str):
    common = dict(
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    if family == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
            sliding_window=16,
            **common,
        )
    if family == "phi3":
        return transformers.Phi3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=64,
            n_embd=32,
            n_layer=3,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            **common,
        )
    if family == "stablelm":  # not in SPECS: found by structural discovery
        return transformers.StableLmConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "gemma3", "phi3", "gpt2", "gpt_neox", "stablelm")
FUSED_FAMILIES = ("phi3", "gpt2", "gpt_neox")


def make_tiny_model(family: str, seed: int = 0):
    """A tiny random model of ``family`` in eval mode, fp32, with non-zero biases where it has them."""
    torch.manual_seed(seed)
    config = _tiny_config(family)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # biases start at zero; make them matter in the tests
    return model.eval()


@pytest.fixture(params=FAMILIES)
def tiny_model(request):
    return make_tiny_model(request.param)


@pytest.fixture(params=FUSED_FAMILIES)
def fused_model(request):
    return make_tiny_model(request.param)


def random_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


@pytest.fixture(autouse=True)
def _threads_for_tiny_models(request):
    """Tiny models run faster on one intra-op thread (thread sync costs more than the math);
    tests on the real model (marked slow) keep torch's default."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
