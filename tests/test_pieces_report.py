"""The run cache never picks up half-written pieces; the report renders every verdict."""

from __future__ import annotations

import json

import pytest

from vsteer.evaluate import Estimate, Verdict
from vsteer.experiments.result import ExperimentResult
from vsteer.pieces import PieceCache
from vsteer.report import write_report


def test_a_finished_piece_is_reused_and_not_recomputed(tmp_path):
    cache = PieceCache(tmp_path)
    calls = []

    def compute(work):
        calls.append(1)
        (work / "weights.txt").write_text("w")
        return {"score": 0.5}

    first, path = cache.run("adapter", {"seed": 1}, compute)
    second, path2 = cache.run("adapter", {"seed": 1}, compute)
    assert calls == [1] and path == path2
    assert first["result"] == second["result"] == {"score": 0.5}
    assert (path / "weights.txt").read_text() == "w"


def test_a_piece_killed_halfway_leaves_nothing_that_is_picked_up(tmp_path):
    cache = PieceCache(tmp_path)

    def dies(work):
        (work / "half.bin").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.run("vector", {"layer": 3}, dies)
    assert cache.get("vector", {"layer": 3}) is None
    assert not cache.path("vector", {"layer": 3}).exists()
    # a leftover directory without its completion marker (e.g. from kill -9) is redone
    leftover = cache.path("vector", {"layer": 3})
    leftover.mkdir()
    (leftover / "half.bin").write_text("partial")
    done, _ = cache.run("vector", {"layer": 3}, lambda work: {"ok": True})
    assert done["result"] == {"ok": True}
    assert not (leftover / "half.bin").exists()


def test_different_inputs_are_different_pieces(tmp_path):
    cache = PieceCache(tmp_path)
    assert cache.path("a", {"x": 1}) != cache.path("a", {"x": 2})


def test_report_lists_every_verdict_and_results_json_holds_its_numbers(tmp_path):
    v = Verdict(
        "values carry style", "shift", Estimate(0.25, 0.1, 0.4, 50), "supported", "CI > 0", "vsteer x"
    )
    r = ExperimentResult("demo", "Demo", [{"layer": 1, "acc": 0.75}], [v])
    path = write_report(
        tmp_path, [r], {"name": "t", "model": "m", "profile": "cpu", "seed": 0, "runtime_s": 1.0}
    )
    text = path.read_text()
    assert "| values carry style | shift | 0.25 [0.1, 0.4] | **supported** | `vsteer x` |" in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["verdicts"][0]["effect"]["value"] == 0.25
    assert data["experiments"][0]["records"] == [{"layer": 1, "acc": 0.75}]
