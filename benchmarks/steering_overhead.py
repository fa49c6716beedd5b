"""Speed of ``generate`` with one value-site steering vector on every layer, relative to plain ``generate``.

Batch 1 and batch 8. Each repeat runs plain, bias-path steered (the default: a constant vector
at every position is added to ``v_proj``'s bias, no hook) and hook-path steered
(``as_bias=False``) back to back in a rotating order, and keeps each steered run's ratio to the
plain run of the same repeat: pairing cancels the machine's drift, which is several percent here
between runs minutes apart. Per batch size: the median paired ratio with a 95% bootstrap interval
over repeats. Headline: the worse batch size's median for the default (bias) path.

    .venv/bin/python benchmarks/steering_overhead.py [--model NAME] [--repeats 21] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

PROMPTS = [
    "Tell me about your favourite city.",
    "Write a short poem about the sea.",
    "What should I cook tonight?",
    "Explain how a bicycle works.",
    "Describe a walk in the forest.",
    "Give me advice for a job interview.",
    "What is the best way to learn a language?",
    "Summarise the plot of a mystery novel.",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()

    import vsteer
    from vsteer.hooks import site_shape
    from vsteer.models import load_model
    from vsteer.vectors import SteeringVector

    model, tok = load_model(args.model)
    arch = vsteer.get_arch(model)
    g = torch.Generator().manual_seed(0)
    shape = site_shape(arch, "v")
    vec = SteeringVector.for_model(
        model, {layer: 0.05 * torch.randn(shape, generator=g) for layer in range(arch.n_layers)}, "v"
    )
    batches = {}
    for b in (1, 8):
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for i in range(b)
        ]
        batches[b] = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )

    def run(b: int, mode: str) -> float:
        enc = batches[b]
        start = time.perf_counter()
        with torch.no_grad():
            if mode == "plain":
                out = model.generate(**enc, **kw)
            else:
                with vsteer.steer(model, vec, scale=1.0, as_bias=mode == "bias"):
                    out = model.generate(**enc, **kw)
        elapsed = time.perf_counter() - start
        return b * (out.shape[1] - enc["input_ids"].shape[1]) / elapsed

    modes = ("plain", "bias", "hook")
    for b in batches:  # warm up every path
        for mode in modes:
            run(b, mode)
    ratios = {(b, m): [] for b in batches for m in modes[1:]}
    speeds = {(b, m): [] for b in batches for m in modes}
    for rep in range(args.repeats):
        for b in batches:
            order = modes[rep % 3 :] + modes[: rep % 3]  # each mode first in a third of the repeats
            got = {m: run(b, m) for m in order}
            for m in modes:
                speeds[(b, m)].append(got[m])
            for m in modes[1:]:
                ratios[(b, m)].append(got[m] / got["plain"])

    def interval(xs: list[float]) -> tuple[float, float]:
        rng = np.random.default_rng(0)
        a = np.asarray(xs)
        meds = np.median(a[rng.integers(0, len(a), (2000, len(a)))], axis=1)
        return float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))

    headline = {}
    for b in batches:
        plain = statistics.median(speeds[(b, "plain")])
        for m in modes[1:]:
            r = statistics.median(ratios[(b, m)])
            lo, hi = interval(ratios[(b, m)])
            per_layer_us = (1 / (r * plain) - 1 / plain) * b / arch.n_layers * 1e6
            print(
                f"batch {b}: {m:4s} path ratio {r:.4f} [{lo:.4f}, {hi:.4f}] "
                f"(plain {plain:.1f} tok/s; {per_layer_us:+.1f} us per decoding step per layer; "
                f"{args.repeats} paired repeats)"
            )
            if m == "bias":
                headline[b] = r
    print(f"steering_overhead: {min(headline.values()):.4f} (target >= 0.995)")


if __name__ == "__main__":
    main()
