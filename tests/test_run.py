"""The main job on the real model, at a tiny size: reruns reuse finished pieces, the same seed
gives the same numbers, and a run killed halfway resumes without redoing or corrupting pieces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vsteer.run import load_run_spec, run

pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny",
    "model": "smollm2-135m-instruct",
    "seed": 3,
    "sections": ["basis", "probes"],
    "options": {
        "basis": {"n_items": 40, "n_shuffles": 8, "n_boot": 50},
        "probes": {"n_train": 60, "n_test": 40, "n_layers": 2, "sites": ["v", "k"], "cv": 2},
    },
}


def _spec(out: Path, **changes):
    return load_run_spec({**TINY, "output_dir": str(out), **changes})


def _flat(obj) -> list:
    """Every leaf of a JSON value, in order."""
    if isinstance(obj, dict):
        return [x for k in sorted(obj) for x in [k, *_flat(obj[k])]]
    if isinstance(obj, list):
        return [x for v in obj for x in _flat(v)]
    return [obj]


def _numbers(report_dir: Path) -> list:
    data = json.loads((report_dir / "results.json").read_text())
    return [(v["claim"], v["effect"], v["verdict"]) for v in data["verdicts"]] + [
        e["records"] for e in data["experiments"]
    ]


def test_report_has_a_verdict_table_and_every_number_in_results_json(tmp_path):
    report = run(_spec(tmp_path), progress=False)
    text = report.read_text()
    data = json.loads((report.parent / "results.json").read_text())
    assert text.index("## Verdicts") < text.index("### ")
    assert data["verdicts"], "no verdicts"
    for v in data["verdicts"]:
        assert f"| {v['claim']} |" in text
        assert v["verdict"] in ("supported", "not supported", "inconclusive")
    for name in ("basis", "probing"):
        assert (report.parent / f"{name}.png").stat().st_size > 1000
    # the Limits paragraph states this run's model, not a fixed one
    facts = data["meta"]["model_facts"]
    assert facts["n_layers"] == 30 and facts["n_kv_heads"] == 3
    assert f"{facts['n_params'] / 1e6:.3g}M parameters, 30 layers" in text
    # every section's piece records the shipped data files it read, with their hashes
    for piece in (report.parent / "cache").glob("section-*/piece.json"):
        reads = json.loads(piece.read_text())["reads"]
        assert any(k.startswith("data/sst2/") for k in reads), piece.parent.name
        assert all(len(h) == 64 for h in reads.values())


def test_rerun_reuses_pieces_and_same_seed_gives_same_numbers(tmp_path):
    first = run(_spec(tmp_path / "a"), progress=False).parent
    # the piece keys do not depend on how the sections are scheduled
    again = run(_spec(tmp_path / "a", workers=2), progress=False).parent
    meta = json.loads((again / "results.json").read_text())["meta"]
    assert meta["cache_misses"] == [] and len(meta["cache_hits"]) == 2
    assert _numbers(first) == _numbers(again)
    # recomputed from scratch, the two sections side by side in two processes of one thread
    fresh = run(_spec(tmp_path / "b", workers=2), progress=False).parent
    meta = json.loads((fresh / "results.json").read_text())["meta"]
    assert meta["section_workers"] == 2 and "2 sections side by side in 2 processes" in meta["machine"]
    for piece in (fresh / "cache").glob("section-*/piece.json"):  # a worker's reads reach its piece
        reads = json.loads(piece.read_text())["reads"]
        assert any(k.startswith("data/sst2/") for k in reads) and all(len(h) == 64 for h in reads.values())
    a, b = _flat(_numbers(first)), _flat(_numbers(fresh))
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):  # one thread per worker: sums may round differently
        if isinstance(x, float) and isinstance(y, float):
            assert x == pytest.approx(y, rel=1e-4, abs=1e-6, nan_ok=True)
        else:
            assert x == y


def test_killed_run_resumes_without_redoing_finished_pieces(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "out")}))
    cache = tmp_path / "out" / "tiny" / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vsteer.cli", "run", str(recipe), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not list(cache.glob("section-basis-*/piece.json")):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "the first piece never finished"
            time.sleep(0.2)
        time.sleep(1.0)  # well into the next section
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = next(cache.glob("section-basis-*/piece.json"))
    stamp = finished.stat().st_mtime_ns
    assert not (tmp_path / "out" / "tiny" / "report.md").exists()
    report = run(load_run_spec(recipe), progress=False)
    meta = json.loads((report.parent / "results.json").read_text())["meta"]
    assert finished.stat().st_mtime_ns == stamp  # not recomputed, not rewritten
    assert any(h.startswith("section-basis-") for h in meta["cache_hits"])
    assert any(m.startswith("section-probes-") for m in meta["cache_misses"])
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no half-written leftovers


def test_workers_below_one_is_refused_in_one_line(tmp_path):
    from vsteer.errors import RecipeError

    with pytest.raises(RecipeError, match="'workers' must be at least 1, got 0"):
        _spec(tmp_path, workers=0)
