"""Time to extract a vector at the middle layer / time of a full forward pass over the same data.

The baseline is what a full-model extraction costs (repeng and steering-vectors run the whole
model with ``output_hidden_states``): the same batches, the same padding, one full forward each.
vsteer stops after the deepest requested layer, so the target is ``(layer + 1) / n_layers + 0.1``.
Interleaved and repeated; medians.

    .venv/bin/python benchmarks/extraction.py [--model NAME] [--pairs 48] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import vsteer
    from vsteer.extraction import caa_pairs, encode
    from vsteer.models import load_model

    model, tok = load_model(args.model)
    arch = vsteer.get_arch(model)
    layer = arch.n_layers // 2
    pairs = caa_pairs("refusal", limit=args.pairs)

    # the same batches the extractor builds: sorted by length, right-padded
    texts = [side for pair in pairs for side in pair]
    encoded = sorted((encode(tok, t)[0] for t in texts), key=len)
    batches = []
    for i in range(0, len(encoded), args.batch_size):
        chunk = encoded[i : i + args.batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        batches.append((ids, mask))

    def full_forward() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
        return time.perf_counter() - start

    def extraction() -> float:
        start = time.perf_counter()
        vsteer.extract(model, tok, pairs, site="v", layers=layer, batch_size=args.batch_size)
        return time.perf_counter() - start

    full_forward()
    extraction()
    times = {"full": [], "extract": []}
    for rep in range(args.repeats):
        order = (("full", full_forward), ("extract", extraction))
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            times[name].append(fn())
    full, ext = statistics.median(times["full"]), statistics.median(times["extract"])
    target = (layer + 1) / arch.n_layers + 0.1
    print(
        f"{len(texts)} texts in {len(batches)} batches; layer {layer} of {arch.n_layers}; "
        f"full forward {full:.2f} s, extraction {ext:.2f} s ({args.repeats} repeats, medians)"
    )
    print(f"extraction: {ext / full:.3f} (target <= {target:.3f})")


if __name__ == "__main__":
    main()
