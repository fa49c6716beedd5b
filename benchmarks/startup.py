"""Start-up: seconds a fresh process waits for ``import vsteer`` and for a cached ``load_model``.

Each measurement is a new Python process, timed from outside (what a CLI user waits for),
with the model already materialised in the cache. Next to vsteer's load, the same files are
loaded with plain transformers (``AutoModelForCausalLM`` + ``AutoTokenizer``) in a fresh
process: the floor vsteer sits on. Interleaved, repeated; medians. The last line is the
fresh-process cached load (import included) against the 2 s target.

    .venv/bin/python benchmarks/startup.py [--model NAME] [--repeats 5] [--importtime]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

IMPORT = "import vsteer"
LOAD = "from vsteer.models import load_model\nload_model({model!r})"
PLAIN = (
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "AutoModelForCausalLM.from_pretrained({path!r}, dtype='float32')\n"
    "AutoTokenizer.from_pretrained({path!r})"
)
TORCH = "import torch"


def _seconds(code: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def _cached_directory(model: str) -> str:
    """Materialise ``model`` (not timed) and return its cache directory."""
    from vsteer.models import load_model

    m, _ = load_model(model)
    return m.config._name_or_path


def _top_imports(code: str, env: dict, n: int = 12) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], env=env, capture_output=True, text=True
    ).stderr
    rows = []
    for line in out.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit() and len(name) - len(name.lstrip()) == 1:  # top-level imports
            rows.append((int(cumulative), name.strip()))
    rows.sort(reverse=True)
    return [f"  {us / 1e6:6.2f} s  {name}" for us, name in rows[:n]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--importtime", action="store_true", help="also list the slowest top-level imports")
    args = ap.parse_args()

    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    path = _cached_directory(args.model)
    cases = {
        "import torch": TORCH,
        "import vsteer": IMPORT,
        "plain transformers load": PLAIN.format(path=path),
        "vsteer load_model": LOAD.format(model=args.model),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, code in cases.items():
            times[name].append(_seconds(code, env))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:24s} median {med[name]:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in t)})")
    print(
        f"vsteer load_model / plain transformers load: {med['vsteer load_model'] / med['plain transformers load']:.3f} "
        f"({args.repeats} interleaved fresh processes each, cached model {args.model}, {os.cpu_count()} cores)"
    )
    if args.importtime:
        print("slowest top-level imports of a fresh load_model (python -X importtime, cumulative):")
        print("\n".join(_top_imports(LOAD.format(model=args.model), env)))
    print(f"startup: {med['vsteer load_model']:.2f} (target <= 2.0)")


if __name__ == "__main__":
    main()
