"""Model metrics used by the adapter comparison."""

from __future__ import annotations

import numpy as np
import torch
from conftest import make_tiny_model

from vsteer.lora import add_adapter
from vsteer.metrics import Samples, continuation_logp, sequence_kl


def test_adapter_off_is_the_base_model_as_kl_reference():
    peft_model = add_adapter(make_tiny_model("llama"), "v", r=4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    seq = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(0))
    samples = Samples(seq, torch.ones_like(seq), 5, ["x"] * 3)
    with peft_model.disable_adapter():
        reference = continuation_logp(peft_model, samples)
    kl = continuation_logp(peft_model, samples) - reference
    assert np.allclose(kl, sequence_kl(peft_model, make_tiny_model("llama"), samples), atol=1e-5)
    assert np.abs(kl).max() > 1e-3  # the adapter changes the continuation's probability


def test_sequence_kl_of_a_model_with_itself_is_zero():
    model = make_tiny_model("gpt2")
    seq = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    samples = Samples(seq, torch.ones_like(seq), 4, ["x"] * 2)
    assert np.array_equal(sequence_kl(model, model, samples), np.zeros(2))
