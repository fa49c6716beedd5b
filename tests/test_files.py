"""Published files get the permissions a normal write gives under the user's umask.

``tempfile`` creates its files mode 0600; a file that is written to a temporary name and
renamed keeps that mode unless the writer sets it, which left saved vectors readable by their
owner only (``-rw-------``) while ``save_pretrained`` writes ``-rw-r--r--``.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest
import torch
from conftest import make_tiny_model

import vsteer
from vsteer.files import atomic_write, share, umask
from vsteer.gguf_io import export_gguf
from vsteer.hooks import site_shape
from vsteer.pieces import PieceCache
from vsteer.report import write_report
from vsteer.vectors import SteeringVector

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")

UMASKS = [0o022, 0o077, 0o002]


@contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _open_mode(directory) -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask."""
    probe = directory / "probe-open.txt"
    with open(probe, "w") as f:
        f.write("x")
    mode = _mode(probe)
    probe.unlink()
    return mode


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


def _vector(model, site="resid"):
    shape = site_shape(vsteer.get_arch(model), site)
    return SteeringVector.for_model(model, {1: torch.ones(shape)}, site)


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_umask_reads_the_process_umask_without_changing_it(mask):
    with _umask(mask):
        assert umask() == mask
        assert umask() == mask


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
@pytest.mark.parametrize("data", [b"\x00bytes", "text é"], ids=["bytes", "text"])
def test_atomic_write_gives_the_mode_of_a_normal_write(tmp_path, mask, data):
    with _umask(mask):
        path = atomic_write(tmp_path / "sub" / "file.bin", data)
        assert _mode(path) == _open_mode(tmp_path) == 0o666 & ~mask
    expected = data if isinstance(data, bytes) else data.encode("utf-8")
    assert path.read_bytes() == expected
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]  # no temporary left


def test_atomic_write_replaces_and_leaves_no_temporary_on_failure(tmp_path):
    path = atomic_write(tmp_path / "f.txt", "old")
    with pytest.raises(TypeError):
        atomic_write(path, 123)  # not bytes or text
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    atomic_write(path, "new")
    assert path.read_text() == "new"


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=oct)
def test_saved_vector_and_gguf_export_get_the_mode_of_a_normal_write(llama, tmp_path, mask):
    vec = _vector(llama)
    with _umask(mask):
        saved = vec.save(tmp_path / "happy.safetensors")
        exported = export_gguf(vec, tmp_path / "happy.gguf")
        expected = _open_mode(tmp_path)
    assert _mode(saved) == expected == 0o666 & ~mask
    assert _mode(exported) == expected


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=oct)
def test_report_files_get_the_mode_of_a_normal_write(tmp_path, mask):
    with _umask(mask):
        report = write_report(tmp_path / "out", [], {"name": "modes", "model": "tiny"})
        expected = _open_mode(tmp_path)
    assert _mode(report) == expected
    assert _mode(report.parent / "results.json") == expected


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=oct)
def test_a_finished_piece_is_a_directory_with_the_modes_of_mkdir_and_open(tmp_path, mask):
    def compute(work):
        (work / "weights.bin").write_bytes(b"w")
        return {"ok": True}

    with _umask(mask):
        _, piece = PieceCache(tmp_path / "cache").run("vector", {"layer": 1}, compute)
        expected = _open_mode(tmp_path)
    assert _mode(piece) == 0o777 & ~mask
    assert _mode(piece / "weights.bin") == expected


def test_share_sets_the_umask_modes_of_a_tree(tmp_path):
    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "d" / "f").write_text("x")
    os.chmod(tmp_path / "d" / "f", 0o600)
    with _umask(0o022):
        share(tmp_path / "d")
    assert _mode(tmp_path / "d") == 0o755 and _mode(tmp_path / "d" / "f") == 0o644


# ---- the safetensors files of vectors and monitors ----------------------------------------------
def _written_by_the_old_save(tensors: dict, meta: dict) -> bytes:
    """What ``SteeringVector.save``/``Monitor.save`` wrote before they shared ``save_layer_tensors``."""
    import json

    from safetensors.torch import save

    return save(
        {f"layer.{layer}": t.detach().float().cpu().contiguous() for layer, t in tensors.items()},
        metadata={"vsteer": json.dumps(meta, default=str)},
    )


def _monitor():
    from vsteer.monitor import Monitor

    g = torch.Generator().manual_seed(0)
    return Monitor(
        weights={0: torch.randn(2, 8, generator=g), 2: torch.randn(2, 8, generator=g)},
        bias=0.5,
        threshold=1.25,
        site="v",
        fpr=0.1,
        model_name="tiny",
        extra={"n": [3, 4]},
    )


def test_vector_and_monitor_files_keep_their_format_and_old_files_load(llama, tmp_path):
    from vsteer.monitor import Monitor

    vec = SteeringVector.for_model(llama, {2: torch.randn(32), 0: torch.randn(32)}, "resid")
    vec.data = [{"path": "caa/x.json", "sha256": "ab" * 32}]
    mon = _monitor()
    for obj, tensors, cls in [(vec, vec.directions, SteeringVector), (mon, mon.weights, Monitor)]:
        old = _written_by_the_old_save(tensors, obj.metadata())
        assert obj.save(tmp_path / "new.safetensors").read_bytes() == old  # same bytes, same metadata keys
        (tmp_path / "old.safetensors").write_bytes(old)
        back = cls.load(tmp_path / "old.safetensors")
        assert back.metadata() == obj.metadata()
        loaded = back.directions if cls is SteeringVector else back.weights
        assert sorted(loaded) == sorted(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_a_monitor_file_is_not_a_vector_and_layers_must_match_the_tensors(tmp_path):
    from vsteer.errors import VectorError
    from vsteer.monitor import Monitor, MonitorError

    path = _monitor().save(tmp_path / "m.safetensors")
    with pytest.raises(
        VectorError, match=r"has format 'vsteer.monitor/1'; expected 'vsteer.steering_vector/1'"
    ):
        SteeringVector.load(path)
    meta = _monitor().metadata() | {"layers": [0, 1]}
    (tmp_path / "bad.safetensors").write_bytes(_written_by_the_old_save(_monitor().weights, meta))
    with pytest.raises(MonitorError, match=r"metadata layers \[0, 1\] disagree with tensors \[0, 2\]"):
        Monitor.load(tmp_path / "bad.safetensors")
