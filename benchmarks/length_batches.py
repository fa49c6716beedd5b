"""Greedy generation of the monitor section's held-out requests: length-sorted batches vs one batch.

The (a)-(d) conditional-steering table generates 24 harmful (AdvBench) + 24 harmless (HH-RLHF
helpful-base) held-out requests per arm. Padded into one left-padded batch, every row is as long as
the longest request (35-90 tokens with the chat template on SmolLM2: about twice the real tokens);
``vsteer.experiments.monitoring._generate`` runs them in batches of 16 requests of similar length
(:func:`vsteer.encoding.length_batches`) and puts the completions back in order. Both modes give the
same completions (checked here; ``tests/test_monitor.py`` checks it per row on a tiny model). Each
repeat runs both back to back, rotating which goes first (:func:`_common.paired`), at the main job's
one thread per section process. Headline, printed last: the median paired speed-up (one batch's
time / length-sorted batches' time).

    .venv/bin/python benchmarks/length_batches.py [--model NAME] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import median_interval, paired, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=12, help="the cpu profile's max_new_tokens")
    ap.add_argument("--batch-size", type=int, default=16, help="the cpu profile's monitor batch_size")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from vsteer.experiments.monitoring import MonitorOptions, _generate, build_tasks
    from vsteer.models import load_model
    from vsteer.run import load_profile

    model, tok = load_model(args.model)
    sizes = load_profile("cpu")["monitor"]
    opts = MonitorOptions(n_prompt=sizes["n_prompt"], n_steer=sizes["n_steer"])
    harmful, harmless = (side[: opts.n_steer] for side in build_tasks(opts)["prompt"]["test"])
    prompts = harmful + harmless
    sizes_of = {"one batch": len(prompts), "length-sorted": args.batch_size}
    outputs = {}

    def run(_: int, mode: str) -> tuple[float, float]:
        def go() -> int:
            outputs[mode] = _generate(model, tok, prompts, args.new_tokens, batch_size=sizes_of[mode])
            return len(prompts) * args.new_tokens  # the same completions either way: the same work

        return timed(go)

    res = paired(run, (len(prompts),), ("one batch", "length-sorted"), args.repeats)
    assert outputs["one batch"] == outputs["length-sorted"], "length-sorted batches changed a completion"
    key = (len(prompts), "length-sorted")
    r, lo, hi = median_interval(res[key]["ratio"])
    base = statistics.median(res[(len(prompts), "one batch")]["wall"])
    print(
        f"{len(prompts)} requests x {args.new_tokens} new tokens, {args.threads} thread(s): "
        f"length-sorted batches of {args.batch_size} / one batch, speed {r:.3f} [{lo:.3f}, {hi:.3f}] "
        f"(one batch {len(prompts) * args.new_tokens / base:.1f} nominal tok/s; {args.repeats} paired "
        f"repeats); in process CPU time {statistics.median(res[key]['cpu_ratio']):.3f}; same completions"
    )
    print(f"length_batches: {r:.3f} (target >= 1.0)")


if __name__ == "__main__":
    main()
