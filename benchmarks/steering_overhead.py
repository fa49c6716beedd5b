"""Speed of ``generate`` with one value-site steering vector on every layer, relative to plain ``generate``.

Batch 1 and batch 16, baseline and steered interleaved in one process (alternating which goes
first), repeated; tokens/s medians. Headline: the worse of the two ratios. Prints per-step
overhead per hooked layer too (what the hook layer costs).

    .venv/bin/python benchmarks/steering_overhead.py [--model NAME] [--repeats 7] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

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
    ap.add_argument("--repeats", type=int, default=7)
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
    for b in (1, 16):
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

    def run(b: int, steered: bool) -> float:
        enc = batches[b]
        start = time.perf_counter()
        with torch.no_grad():
            if steered:
                with vsteer.steer(model, vec, scale=1.0):
                    out = model.generate(**enc, **kw)
            else:
                out = model.generate(**enc, **kw)
        elapsed = time.perf_counter() - start
        return b * (out.shape[1] - enc["input_ids"].shape[1]) / elapsed

    for b in batches:  # warm up both paths
        run(b, False)
        run(b, True)
    speeds = {(b, s): [] for b in batches for s in (False, True)}
    for rep in range(args.repeats):
        for b in batches:
            order = (False, True) if rep % 2 == 0 else (True, False)
            for s in order:
                speeds[(b, s)].append(run(b, s))
    ratios = {}
    for b in batches:
        plain = statistics.median(speeds[(b, False)])
        steered = statistics.median(speeds[(b, True)])
        ratios[b] = steered / plain
        step_plain = b / plain
        step_steered = b / steered
        per_hook_us = (step_steered - step_plain) / arch.n_layers * 1e6
        print(
            f"batch {b:2d}: plain {plain:8.1f} tok/s, steered {steered:8.1f} tok/s, ratio {ratios[b]:.3f}; "
            f"overhead per decoding step per hooked layer {per_hook_us:+.0f} us "
            f"(plain step {step_plain * 1e3:.1f} ms, {args.repeats} repeats, medians)"
        )
    headline = min(ratios.values())
    print(f"steering_overhead: {headline:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
