"""Speed of ``generate`` with a monitor watching every step, relative to plain ``generate``.

A value-site monitor (random weights: the cost does not depend on them) at two layers scores
every row at the prompt and at each decoding step (:func:`vsteer.watch`). Batch 1 and batch 16;
each repeat runs plain and watched back to back, alternating which goes first, and keeps the
watched run's ratio to the plain run of the same repeat (:func:`_common.paired`). Per batch size:
the median paired ratio with a 95% bootstrap interval over repeats, and the same ratio in process
CPU time (on a machine loaded by other jobs the wall clock mostly measures them). Headline,
printed last: the worse batch size's median wall-clock ratio.

    .venv/bin/python benchmarks/monitor_overhead.py [--model NAME] [--repeats 15] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import chat_batches, greedy, median_interval, paired, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layers", default="10,20", help="monitor layers (default 10,20)")
    args = ap.parse_args()

    import vsteer
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
    batches, kw = chat_batches(tok, (1, 16)), greedy(tok, args.new_tokens)

    def run(b: int, mode: str) -> tuple[float, float]:
        enc = batches[b]

        def go() -> int:
            with torch.no_grad():
                if mode == "watched":
                    with vsteer.watch(model, mon) as flags:
                        out = model.generate(**enc, **kw)
                    assert flags.scores.shape == (b, args.new_tokens)  # the prompt + every fed-back token
                else:
                    out = model.generate(**enc, **kw)
            return b * (out.shape[1] - enc["input_ids"].shape[1])

        return timed(go)

    res = paired(run, batches, ("plain", "watched"), args.repeats)
    ratios = {}
    for b in batches:
        plain = statistics.median(res[(b, "plain")]["wall"])
        r, lo, hi = median_interval(res[(b, "watched")]["ratio"])
        cpu_r = statistics.median(res[(b, "watched")]["cpu_ratio"])
        ratios[b] = r
        per_layer_us = (b / (r * plain) - b / plain) / len(layers) * 1e6
        print(
            f"batch {b:2d}: watched/plain {r:.4f} [{lo:.4f}, {hi:.4f}] (plain {plain:.1f} tok/s, "
            f"step {b / plain * 1e3:.1f} ms; {per_layer_us:+.0f} us per decoding step per monitored layer; "
            f"{args.repeats} paired repeats); ratio in process CPU time {cpu_r:.4f}"
        )
    print(f"monitor_overhead: {min(ratios.values()):.4f} (target >= 0.97)")


if __name__ == "__main__":
    main()
