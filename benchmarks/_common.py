"""What the generation benchmarks share: prompts, greedy settings, paired repeats, intervals.

A *paired* benchmark runs every mode back to back in each repeat, in a rotating order (each mode
first in an equal share of the repeats), and keeps each candidate's ratio to the baseline of the
same repeat: the machine's drift between repeats minutes apart (several percent here) cancels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

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


def chat_batches(tokenizer, sizes: Sequence[int]) -> dict:
    """``{batch size: left-padded chat batch}`` of :data:`PROMPTS` (cycled), with position ids."""
    from vsteer.encoding import encode_batch

    return {
        b: encode_batch(
            tokenizer, [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(b)]
        )
        for b in sizes
    }


def greedy(tokenizer, new_tokens: int) -> dict:
    """``generate`` keywords for exactly ``new_tokens`` greedy tokens per row."""
    return dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )


def timed(fn: Callable[[], int]) -> tuple[float, float]:
    """``fn`` returns a token count: (tokens per wall second, tokens per process-CPU second)."""
    start, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)


def paired(run: Callable[[int, str], tuple[float, float]], sizes, modes: Sequence[str], repeats: int) -> dict:
    """Warm every (size, mode) up once, then ``repeats`` rounds of every mode back to back per
    size, rotating which goes first. ``run(size, mode)`` -> (wall, CPU) tokens/s. Returns
    ``{(size, mode): {"wall": [...], "cpu": [...], "ratio": [...], "cpu_ratio": [...]}}``, the
    ratios to ``modes[0]`` (the baseline) of the same round."""
    for b in sizes:
        for m in modes:
            run(b, m)
    out = {(b, m): {"wall": [], "cpu": [], "ratio": [], "cpu_ratio": []} for b in sizes for m in modes}
    for rep in range(repeats):
        for b in sizes:
            k = rep % len(modes)
            got = {m: run(b, m) for m in (*modes[k:], *modes[:k])}
            for m in modes:
                rec = out[(b, m)]
                rec["wall"].append(got[m][0])
                rec["cpu"].append(got[m][1])
                rec["ratio"].append(got[m][0] / got[modes[0]][0])
                rec["cpu_ratio"].append(got[m][1] / got[modes[0]][1])
    return out


def median_interval(xs: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """(median, 95% bootstrap interval of the median over repeats)."""
    a = np.asarray(xs, float)
    rng = np.random.default_rng(seed)
    meds = np.median(a[rng.integers(0, len(a), (2000, len(a)))], axis=1)
    return float(np.median(a)), float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))
