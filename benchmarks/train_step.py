"""Where a bf16 LoRA training step's time goes on CPU, and two candidate savings (not yet adopted).

The main job's adapter section is two thirds of its time, and each of its 24 runs is ~20 steps
of about 2 s on one thread. ``torch.profiler`` on such a step (SmolLM2, v-only LoRA, batch 8 x 48
tokens, bf16 autocast) put 27% of it in the backward of PyTorch's CPU flash-attention kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu_backward``, about 17 ms per layer for a
48-token batch) and 13% in ``aten::copy_`` (autocast re-casting the frozen fp32 weights to bf16 at
every forward: autocast caches casts only of weights that require grad). Modes, each a fresh copy
of the model with the same LoRA init, trained side by side on the same right-padded batches of
shipped SST-2 positive sentences:

* ``sdpa``: what ``vsteer train`` does today (transformers' default SDPA attention);
* ``precast``: the frozen ``nn.Linear`` weights stored in bf16 up front (tied embeddings kept):
  the matmuls get the very bf16 values autocast would have made, so the losses are bit-identical;
* ``eager``: transformers' eager attention (matmul, softmax, matmul): the same function, so the
  losses agree to bf16 rounding, not bit for bit;
* ``both``: precast and eager.

Paired rounds (every mode back to back, rotating order, ``_common.paired``), process CPU time per
step, one thread. Prints each mode's step time ratio to ``sdpa`` with a 95% interval and the
largest loss difference from ``sdpa`` over the steps. Headline: the ``both`` ratio.

    .venv/bin/python benchmarks/train_step.py [--repeats 8] [--batch 8] [--max-length 48] [--pack]
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import median_interval, paired


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument(
        "--pack", action="store_true", help="join sentences so that every row is --max-length tokens long"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)

    from peft import LoraConfig, get_peft_model

    from vsteer import data
    from vsteer.models import load_model

    model, tok = load_model(args.model)
    tok.padding_side = "right"
    texts = [t for t, label in data.sst2("train") if label == 1]
    if args.pack:  # rows of --max-length tokens: how attention's share grows with the sequence
        per_row = max(1, args.max_length // 12)
        texts = [" ".join(texts[i : i + per_row]) for i in range(0, len(texts), per_row)]
    texts = texts[: args.batch * (args.repeats + 2)]
    batches = []
    for i in range(0, len(texts), args.batch):
        enc = tok(
            texts[i : i + args.batch],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=args.max_length,
        )
        enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append(enc)

    def build(mode: str):
        m = copy.deepcopy(model)
        m.set_attn_implementation("eager" if mode in ("eager", "both") else "sdpa")
        torch.manual_seed(0)
        pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["v_proj"], lora_dropout=0.0))
        if mode in ("precast", "both"):
            tied = pm.get_input_embeddings().weight
            for mod in pm.modules():
                if (
                    isinstance(mod, torch.nn.Linear)
                    and not mod.weight.requires_grad
                    and mod.weight is not tied
                ):
                    mod.weight = torch.nn.Parameter(
                        mod.weight.detach().to(torch.bfloat16), requires_grad=False
                    )
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
        return pm, opt

    modes = ("sdpa", "precast", "eager", "both")
    state = {m: build(m) for m in modes}
    step_of = dict.fromkeys(modes, 0)
    losses = {m: [] for m in modes}

    def run(_size: int, mode: str) -> tuple[float, float]:
        import time

        pm, opt = state[mode]
        enc = batches[step_of[mode] % len(batches)]
        step_of[mode] += 1
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = pm(**enc).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses[mode].append(float(loss.detach()))
        return 1 / (time.perf_counter() - wall), 1 / (time.process_time() - cpu)  # steps per second

    res = paired(run, (args.batch,), modes, args.repeats)
    for mode in modes[1:]:
        r, lo, hi = median_interval(res[(args.batch, mode)]["cpu_ratio"])
        gap = max(abs(a - b) for a, b in zip(losses[mode], losses["sdpa"], strict=True))
        print(
            f"{mode:8s} steps/CPU-s vs sdpa {r:.3f} [{lo:.3f}, {hi:.3f}] ({args.repeats} paired rounds, "
            f"batch {args.batch}, <= {args.max_length} tokens, 1 thread); largest loss difference from sdpa "
            f"over {len(losses[mode])} steps {gap:.2e}"
        )
    sdpa_s = 1 / torch.tensor(res[(args.batch, "sdpa")]["cpu"]).median().item()
    print(f"sdpa step: {sdpa_s:.2f} CPU-s")
    r, _, _ = median_interval(res[(args.batch, "both")]["cpu_ratio"])
    print(f"train_step: {r:.3f} (target >= 1.15)")


if __name__ == "__main__":
    main()
