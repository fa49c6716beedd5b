"""Commands that write one file refuse, before any model loads, to lose a file (found in review:
`vsteer monitor fit -o` replaced an existing file silently; `vsteer extract -o DIR` ran the whole
extraction and then ended in an IsADirectoryError traceback)."""

from __future__ import annotations

import pytest

from vsteer.cli import main

COMMANDS = {
    "extract": ["extract", "--data", "template:happy,sad", "--model", "no-such-model"],
    "from-prompt": [
        "extract",
        "--from-prompt",
        "P",
        "--questions",
        "hh-rlhf:helpful",
        "--model",
        "no-such-model",
    ],
    "monitor fit": [
        "monitor",
        "fit",
        "--positive",
        "advbench",
        "--negative",
        "helpful",
        "--model",
        "no-such-model",
    ],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_an_existing_output_is_kept_without_overwrite(name, tmp_path, capsys):
    out = tmp_path / "old.safetensors"
    out.write_bytes(b"keep me")
    assert main([*COMMANDS[name], "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "exists; pass --overwrite" in err, err
    assert out.read_bytes() == b"keep me"
    # with --overwrite the command goes on to load the model (here: an unknown one, one line)
    assert main([*COMMANDS[name], "-o", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no-such-model" in err, err
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_directory_or_an_unwritable_place_is_one_line_before_the_model_loads(name, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, words in (
        (tmp_path / "adir", "is a directory"),
        (tmp_path / "afile" / "v.st", "not a writable"),
    ):
        assert main([*COMMANDS[name], "-o", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and words in err, err
    assert (tmp_path / "afile").read_text() == "x"


def test_export_gguf_refuses_to_write_over_its_own_input(tmp_path, capsys):
    vec = tmp_path / "v.safetensors"
    vec.write_bytes(b"a vector")
    assert main(["export-gguf", str(vec), "-o", str(vec), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "also the input" in err, err
    assert vec.read_bytes() == b"a vector"
