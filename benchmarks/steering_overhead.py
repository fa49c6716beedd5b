"""Speed of ``generate`` with one value-site steering vector on every layer, relative to plain ``generate``.

Batch 1 and batch 8. Each repeat runs plain, bias-path steered (the default: a constant vector
at every position is added to ``v_proj``'s bias, no hook) and hook-path steered
(``as_bias=False``) back to back in a rotating order, and keeps each steered run's ratio to the
plain run of the same repeat (:func:`_common.paired`). Per batch size: the median paired ratio
with a 95% bootstrap interval over repeats. Headline: the worse batch size's median for the
default (bias) path.

One torch thread by default: on the 2-core machine two threads made the paired ratios scatter by
several percent (interval +-4% at batch 8 over 21 repeats), one thread by a few tenths of a
percent (+-0.3% over 31 repeats), which is what a 0.995 target needs; ``--threads 0`` keeps
torch's default.

    .venv/bin/python benchmarks/steering_overhead.py [--model NAME] [--repeats 31] [--new-tokens 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import chat_batches, greedy, median_interval, paired, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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
    batches, kw = chat_batches(tok, (1, 8)), greedy(tok, args.new_tokens)

    def run(b: int, mode: str) -> tuple[float, float]:
        enc = batches[b]

        def go() -> int:
            with torch.no_grad():
                if mode == "plain":
                    out = model.generate(**enc, **kw)
                else:
                    with vsteer.steer(model, vec, scale=1.0, as_bias=mode == "bias"):
                        out = model.generate(**enc, **kw)
            return b * (out.shape[1] - enc["input_ids"].shape[1])

        return timed(go)

    modes = ("plain", "bias", "hook")
    res = paired(run, batches, modes, args.repeats)
    headline = {}
    for b in batches:
        plain = statistics.median(res[(b, "plain")]["wall"])
        for m in modes[1:]:
            r, lo, hi = median_interval(res[(b, m)]["ratio"])
            c, clo, chi = median_interval(res[(b, m)]["cpu_ratio"])
            per_layer_us = (1 / (r * plain) - 1 / plain) * b / arch.n_layers * 1e6
            print(
                f"batch {b}: {m:4s} path ratio {r:.4f} [{lo:.4f}, {hi:.4f}] "
                f"(plain {plain:.1f} tok/s; {per_layer_us:+.1f} us per decoding step per layer; "
                f"{args.repeats} paired repeats, {torch.get_num_threads()} thread(s)); "
                f"in process CPU time {c:.4f} [{clo:.4f}, {chi:.4f}]"
            )
            if m == "bias":
                headline[b] = r
    component_line(model, arch, batches, res)
    print(f"steering_overhead: {min(headline.values()):.4f} (target >= 0.995)")


def component_line(model, arch, batches, res, calls: int = 4000, rounds: int = 9) -> None:
    """What the bias path adds, measured where it acts: one decoding step's ``v_proj`` call with
    and without the bias, interleaved, times the layers, against the plain step time. Finer than
    the end-to-end ratio (whose interval this machine's noise sets at several percent)."""
    import torch.nn.functional as F

    weight = arch.projection(0, "v").weight.detach()  # the embedded model's v_proj (not fused)
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
    for b in batches:
        x = torch.randn(b, 1, weight.shape[1], dtype=weight.dtype)
        diffs = []
        with torch.no_grad():
            for _ in range(rounds):
                t = {}
                for mode in ("plain", "bias"):
                    start = time.perf_counter()
                    for _ in range(calls):
                        F.linear(x, weight, bias if mode == "bias" else None)
                    t[mode] = (time.perf_counter() - start) / calls
                diffs.append(t["bias"] - t["plain"])
        extra = statistics.median(diffs) * arch.n_layers
        step = b / statistics.median(res[(b, "plain")]["wall"])
        print(
            f"batch {b}: bias path, component estimate: +{extra * 1e6:.1f} us per decoding step "
            f"({arch.n_layers} v_proj calls with a bias, median of {rounds} interleaved rounds) on a "
            f"{step * 1e3:.1f} ms step: ratio {step / (step + extra):.4f}"
        )


if __name__ == "__main__":
    main()
