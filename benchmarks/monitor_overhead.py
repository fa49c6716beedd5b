"""Speed of ``generate`` with a monitor watching every step, relative to plain ``generate``.

A value-site monitor (random weights: the cost does not depend on them) at two layers scores
every row at the prompt and at each decoding step (:func:`vsteer.watch`). Batch 1 and batch 16,
baseline and watched interleaved in one process (alternating which goes first), repeated;
tokens/s medians. Headline, printed last: the worse of the two wall-clock ratios. The same ratio
in process CPU time is printed too: on a machine loaded by other jobs the wall clock mostly
measures them (a single-thread run's CPU time is far less sensitive to them).

    .venv/bin/python benchmarks/monitor_overhead.py [--model NAME] [--repeats 7] [--new-tokens 32]
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
    ap.add_argument("--layers", default="10,20", help="monitor layers (default 10,20)")
    args = ap.parse_args()

    import vsteer
    from vsteer.encoding import encode_batch
    from vsteer.hooks import site_shape
    from vsteer.models import config_fingerprint, load_model

    model, tok = load_model(args.model)
    arch = vsteer.get_arch(model)
    g = torch.Generator().manual_seed(0)
    shape = site_shape(arch, "v")
    layers = [int(x) for x in args.layers.split(",")]
    mon = vsteer.Monitor(
        weights={layer: torch.randn(shape, generator=g) for layer in layers},
        bias=0.0,
        threshold=0.0,
        site="v",
        fingerprint=config_fingerprint(model.config),
    )
    batches = {
        b: encode_batch(tok, [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(b)])
        for b in (1, 16)
    }
    kw = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )

    def run(b: int, watched: bool) -> tuple[float, float]:
        enc = batches[b]
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            if watched:
                with vsteer.watch(model, mon) as flags:
                    out = model.generate(**enc, **kw)
                assert flags.scores.shape == (b, args.new_tokens)  # the prompt + every fed-back token
            else:
                out = model.generate(**enc, **kw)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        tokens = b * (out.shape[1] - enc["input_ids"].shape[1])
        return tokens / elapsed, tokens / cpu

    for b in batches:  # warm up both paths
        run(b, False)
        run(b, True)
    speeds = {(b, w): [] for b in batches for w in (False, True)}
    for rep in range(args.repeats):
        for b in batches:
            order = (False, True) if rep % 2 == 0 else (True, False)
            for w in order:
                speeds[(b, w)].append(run(b, w))
    ratios = {}
    for b in batches:
        plain = statistics.median(s[0] for s in speeds[(b, False)])
        watched = statistics.median(s[0] for s in speeds[(b, True)])
        ratios[b] = watched / plain
        cpu_ratio = statistics.median(s[1] for s in speeds[(b, True)]) / statistics.median(
            s[1] for s in speeds[(b, False)]
        )
        per_layer_us = (b / watched - b / plain) / len(layers) * 1e6
        print(
            f"batch {b:2d}: plain {plain:8.1f} tok/s, watched {watched:8.1f} tok/s, ratio {ratios[b]:.3f}; "
            f"overhead per decoding step per monitored layer {per_layer_us:+.0f} us "
            f"(plain step {b / plain * 1e3:.1f} ms, {args.repeats} repeats, medians); "
            f"ratio in process CPU time {cpu_ratio:.3f}"
        )
    print(f"monitor_overhead: {min(ratios.values()):.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
