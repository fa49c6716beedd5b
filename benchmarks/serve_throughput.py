"""Throughput of `vsteer serve`'s scheduler: 32 concurrent mixed requests vs the same requests one at a time.

Each request mixes steering (3 vectors, different scales and positions) and adapters (2
value-only LoRA adapters, plus the base model); all are greedy with a fixed ``max_tokens``.
Prints tokens/s of the concurrent run divided by the sequential one (target >= 4 on 2 CPU
cores), p50/p95 latency of both runs, and checks every concurrent output equals its solo one.

The vectors and adapters default to random directions and random LoRA weights: throughput
does not depend on their values. Pass ``--vectors DIR``/``--adapters DIR`` to use real ones.

    python benchmarks/serve_throughput.py [--model smollm2-135m-instruct] [--requests 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vsteer.models import load_model, resolve_model_name
from vsteer.serve import Engine, Limits, find_adapters, load_vectors
from vsteer.serve.schema import parse_chat
from vsteer.vectors import SteeringVector

PROMPTS = [
    "Tell me about your weekend.",
    "What do you think of rainy days?",
    "Describe a city you would like to visit.",
    "How should I start learning to cook?",
    "Write two sentences about the sea.",
    "What makes a good friend?",
    "Give me advice for a job interview.",
    "What is your favourite season and why?",
]


def random_assets(model, root: Path) -> tuple[dict, dict]:
    from peft import LoraConfig, get_peft_model

    from vsteer.arch import get_arch
    from vsteer.hooks import site_shape

    arch = get_arch(model)
    g = torch.Generator().manual_seed(0)
    shape = site_shape(arch, "v")
    vectors = {}
    for name in ("warm", "formal", "terse"):
        dirs = {layer: torch.randn(shape, generator=g) * 0.5 for layer in range(arch.n_layers)}
        vectors[name] = SteeringVector.for_model(model, dirs, site="v", method="random")
    adapters = {}
    for i, name in enumerate(("kind-v", "terse-v")):
        torch.manual_seed(i)
        base, _ = load_model(resolve_model_name(model), device="cpu")
        peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["v_proj"]))
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        peft.save_pretrained(root / name)
        adapters[name] = root / name
    return vectors, adapters


def mixed_bodies(n: int, model_name: str, max_tokens: int) -> list[dict]:
    models = [model_name, "kind-v", "terse-v"]
    steers = [
        None,
        [{"vector": "warm", "scale": 4.0, "positions": "all"}],
        [{"vector": "formal", "scale": 3.0, "positions": "generated"}],
        [{"vector": "terse", "scale": -3.0, "positions": "prompt"}],
    ]
    return [
        {
            "model": models[i % 3],
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "steering": steers[i % 4],
        }
        for i in range(n)
    ]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--vectors", default=None)
    ap.add_argument("--adapters", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    args = ap.parse_args()
    model, tok = load_model(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if args.vectors and args.adapters:
            vectors, adapters = load_vectors(args.vectors), find_adapters(args.adapters)
        else:
            vectors, adapters = random_assets(model, Path(tmp))
        name = resolve_model_name(args.model)
        engine = Engine(
            model, tok, name, vectors=vectors, adapters=adapters, max_batch=args.max_batch
        ).start()
        bodies = mixed_bodies(args.requests, name, args.max_tokens)

        def one(body):
            t0 = time.perf_counter()
            out = engine.generate(parse_chat(body, engine, Limits()))
            return out, time.perf_counter() - t0

        engine.generate(parse_chat(bodies[0], engine, Limits()))  # warm-up
        t0 = time.perf_counter()
        solo = [one(b) for b in bodies]
        t_solo = time.perf_counter() - t0
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(one, bodies))
        t_together = time.perf_counter() - t0
        engine.stop()
    tokens = sum(o["completion_tokens"] for o, _ in solo)
    same = sum(a[0]["text"] == b[0]["text"] for a, b in zip(solo, together))
    lat_solo, lat_together = [t for _, t in solo], [t for _, t in together]
    print(f"model {name}, {len(bodies)} requests, {tokens} tokens, {torch.get_num_threads()} threads")
    print(
        f"one at a time: {tokens / t_solo:8.1f} tokens/s  (request latency p50 {statistics.median(lat_solo):.2f}s)"
    )
    print(
        f"concurrent:    {tokens / t_together:8.1f} tokens/s  "
        f"(latency p50 {pct(lat_together, 0.5):.2f}s, p95 {pct(lat_together, 0.95):.2f}s)"
    )
    print(f"speed-up (concurrent / one at a time): {t_solo / t_together:.2f}  (target >= 4)")
    print(f"greedy outputs equal to solo: {same}/{len(bodies)}")


if __name__ == "__main__":
    main()
