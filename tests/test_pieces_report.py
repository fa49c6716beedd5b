"""The run cache: pieces never half-written, keyed by the content of what they are computed from
(recipe options, data files, weights, code, package versions), never by a verdict rule; the report
judges findings afresh and states only facts of the run."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny_model

import vsteer.pieces as pieces
from vsteer.errors import RecipeError
from vsteer.evaluate import Estimate, Finding
from vsteer.experiments.result import ExperimentResult
from vsteer.pieces import PieceCache, code_closure, content_key, track_reads
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


def test_content_key_replaces_a_recipe_path_by_its_content(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("a: 1\n")
    before = content_key({"recipe": str(recipe), "steps": 3, "overrides": ["x=1"]})
    assert before["steps"] == 3 and before["overrides"] == ["x=1"]
    assert before["recipe"]["file"] == "r.yaml" and len(before["recipe"]["sha256"]) == 64
    recipe.write_text("a: 2\n")
    assert content_key({"recipe": str(recipe)})["recipe"] != before["recipe"]
    moved = tmp_path / "sub" / "r.yaml"
    moved.parent.mkdir()
    moved.write_text("a: 1\n")
    assert content_key({"recipe": str(moved)})["recipe"] == before["recipe"]  # content, not path


def test_code_closure_follows_imports_and_leaves_out_report_rules_and_cli():
    closure = code_closure(["vsteer.experiments.swaps"])
    assert {"vsteer.experiments.swaps", "vsteer.hooks", "vsteer.evaluate"} <= set(closure)
    assert not {"vsteer.report", "vsteer.verdicts", "vsteer.cli", "vsteer.run"} & set(closure)
    assert "vsteer.experiments.adapters" not in closure


def test_a_piece_that_read_a_data_file_is_recomputed_when_the_file_changes(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("1")
    (data / "b.txt").write_text("1")
    monkeypatch.setattr(pieces, "tracked_roots", lambda: [data])
    cache = PieceCache(tmp_path / "cache")
    calls = []

    def reader(name):
        def compute(_work):
            calls.append(name)
            return {"x": (data / name).read_text()}

        return compute

    cache.run("p", {"f": "a"}, reader("a.txt"))
    cache.run("p", {"f": "b"}, reader("b.txt"))
    (data / "a.txt").write_text("2")
    assert cache.run("p", {"f": "a"}, reader("a.txt"))[0]["result"] == {"x": "2"}
    cache.run("p", {"f": "b"}, reader("b.txt"))
    assert calls == ["a.txt", "b.txt", "a.txt"]
    with track_reads() as reads:
        (data / "b.txt").read_text()
        (tmp_path / "elsewhere.txt").write_text("untracked")
    assert list(reads) == ["data/b.txt"]


# --- the main job, with tiny stand-ins for the model and the section runners --------------------

FAKE_RULES = """
fake.positive:
  what: mean
  threshold: 0.0
  rope: [-0.1, 0.1]
  rationale: test rule
"""


@pytest.fixture
def fake_job(tmp_path, monkeypatch):
    """Two sections (swaps, probes) whose runners read one data file each and live in a package of
    their own on disk, so that their data, code and options can be edited between runs."""
    import vsteer.models
    import vsteer.run as run_mod

    data = tmp_path / "data"
    data.mkdir()
    for s in ("swaps", "probes"):
        (data / f"{s}.txt").write_text("0.5")
    pkg = tmp_path / "src" / "fakeexp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "common.py").write_text("SCALE = 1.0\n")
    (pkg / "swaps.py").write_text("from fakeexp.common import SCALE\n")
    (pkg / "probes.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setitem(run_mod.SECTION_MODULES, "swaps", "fakeexp.swaps")
    monkeypatch.setitem(run_mod.SECTION_MODULES, "probes", "fakeexp.probes")
    monkeypatch.setattr(pieces, "tracked_roots", lambda: [data])
    model = make_tiny_model("llama")
    monkeypatch.setattr(vsteer.models, "load_model", lambda *a, **k: (model, None))
    computed = []

    def fake_section(section, model, tokenizer, spec, opts, cache, progress):
        computed.append(section)
        value = float((data / f"{section}.txt").read_text())
        finding = Finding(
            "fake.positive", f"{section} claim", "m", Estimate(value, value - 0.3, value + 0.3, 9)
        )
        return [ExperimentResult(section, section.title(), [{"opts": json.dumps(opts)}], [finding])]

    monkeypatch.setattr(run_mod, "_run_section", fake_section)
    rules = tmp_path / "rules.yaml"
    rules.write_text(FAKE_RULES)

    def job(**options):
        spec = run_mod.load_run_spec(
            {
                "name": "t",
                "sections": ["swaps", "probes"],
                "output_dir": str(tmp_path / "out"),
                "rules": str(rules),
                "options": options,
            }
        )
        computed.clear()
        report = run_mod.run(spec, progress=False)
        return sorted(computed), report

    return {"job": job, "data": data, "pkg": pkg, "model": model, "rules": rules}


def test_each_input_recomputes_exactly_the_pieces_that_depend_on_it(fake_job, monkeypatch):
    job, data, pkg = fake_job["job"], fake_job["data"], fake_job["pkg"]
    assert job()[0] == ["probes", "swaps"]
    assert job()[0] == []  # nothing changed
    assert job(swaps={"n_pairs": 3})[0] == ["swaps"]  # a recipe option
    assert job(swaps={"n_pairs": 3})[0] == []
    (data / "probes.txt").write_text("0.7")  # a data file
    assert job(swaps={"n_pairs": 3})[0] == ["probes"]
    (pkg / "common.py").write_text("SCALE = 2.0\n")  # code imported by the swaps module only
    assert job(swaps={"n_pairs": 3})[0] == ["swaps"]
    (pkg / "probes.py").write_text("X = 1\n# a comment is not code\n")
    assert job(swaps={"n_pairs": 3})[0] == []
    with torch.no_grad():  # the weights behind the same model name
        next(fake_job["model"].parameters()).add_(1e-3)
    assert job(swaps={"n_pairs": 3})[0] == ["probes", "swaps"]
    versions = dict(pieces.package_versions())
    monkeypatch.setattr(pieces, "package_versions", lambda: {**versions, "transformers": "99.0"})
    assert job(swaps={"n_pairs": 3})[0] == ["probes", "swaps"]


def test_a_rule_change_recomputes_nothing_and_changes_the_verdict(fake_job):
    job, rules = fake_job["job"], fake_job["rules"]
    _, report = job()
    data = json.loads((report.parent / "results.json").read_text())
    assert [v["verdict"] for v in data["verdicts"]] == ["supported", "supported"]
    assert "findings" in data["experiments"][0] and "verdict" not in data["experiments"][0]["findings"][0]
    rules.write_text(
        FAKE_RULES.replace("threshold: 0.0", "threshold: 0.9").replace("[-0.1, 0.1]", "[0.8, 1.0]")
    )
    computed, report = job()
    assert computed == []
    data = json.loads((report.parent / "results.json").read_text())
    assert data["meta"]["cache_misses"] == [] and len(data["meta"]["cache_hits"]) == 2
    assert [v["verdict"] for v in data["verdicts"]] == ["not supported", "not supported"]
    assert "| swaps claim | m | 0.5 [0.2, 0.8] | **not supported** |" in report.read_text()


def test_the_report_states_facts_of_the_run_not_of_a_fixed_model(fake_job):
    _, report = fake_job["job"]()
    text = report.read_text()
    meta = json.loads((report.parent / "results.json").read_text())["meta"]
    model = fake_job["model"]
    n_params = sum(p.numel() for p in model.parameters())
    assert meta["model_facts"]["n_params"] == n_params
    limits = text[text.index("## Limits") :].split("\n### ")[0]
    assert f"{n_params / 1e6:.3g}M parameters, {model.config.num_hidden_layers} layers" in limits
    assert f"{model.config.num_key_value_heads} key/value heads" in limits and "float32 on cpu" in limits
    assert "135M" not in text and "30 layers" not in text and "15-minute" not in text
    assert "rests on 9 items" in limits and "profile `cpu`" in limits
    assert set(meta["packages"]) >= {"torch", "transformers", "peft", "trl"}
    # the configuration is stated once, with the sizes the verdicts rest on
    assert text.count("## Configuration") == 1 and "| swaps | n_pairs=" in text
    assert "This report draws 2 verdicts" in text and "Holm" in text


def test_report_lists_every_verdict_and_results_json_holds_its_numbers(tmp_path):
    f = Finding(
        "probing.selectivity", "values carry style", "shift", Estimate(0.25, 0.1, 0.4, 50), "vsteer x"
    )
    r = ExperimentResult("demo", "Demo", [{"layer": 1, "acc": 0.75}], [f])
    path = write_report(
        tmp_path, [r], {"name": "t", "model": "m", "profile": "cpu", "seed": 0, "runtime_s": 1.0}
    )
    text = path.read_text()
    assert (
        "| values carry style | shift | 0.25 [0.1, 0.4] | **supported** | supported | supported | `vsteer x` |"
        in text
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["verdicts"][0]["effect"]["value"] == 0.25
    assert data["verdicts"][0]["rule_id"] == "probing.selectivity" and data["verdicts"][0]["p_holm"] < 0.025
    assert data["experiments"][0]["records"] == [{"layer": 1, "acc": 0.75}]


@pytest.mark.parametrize(
    "profile, message",
    [
        ("swaps:\n  n_pears: 3\n", "unknown option swaps.n_pears in profile bad.yaml"),
        ("vibes: {}\n", "unknown section 'vibes' in profile bad.yaml"),
        ("swaps: 3\n", "swaps must map option names to values"),
    ],
)
def test_a_malformed_profile_is_one_clear_line(tmp_path, profile, message):
    from vsteer.run import load_run_spec

    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent(profile))
    with pytest.raises(RecipeError, match=message) as err:
        load_run_spec({"profile": str(bad)})
    assert "\n" not in str(err.value)


def test_every_shipped_profile_validates_and_smoke_is_smallest():
    from vsteer.run import RunSpec, load_profile, profile_names, section_options

    assert {"cpu", "full", "smoke"} <= set(profile_names())
    for name in profile_names():
        load_profile(name)
    smoke, cpu = RunSpec(profile="smoke"), RunSpec(profile="cpu")
    assert section_options(smoke, "probes")["n_train"] < section_options(cpu, "probes")["n_train"]
    assert section_options(smoke, "adapters")["sft"]["steps"] <= 2


def test_a_nested_option_overrides_one_key_and_keeps_the_profiles_others():
    """``--set options.adapters.sft.ablation_seeds=...`` once replaced the profile's whole ``sft``
    mapping, so the comparison silently ran at the recipe's own sizes (3 learning rates, other
    steps): 28 minutes instead of 12, for different numbers."""
    from vsteer.run import load_profile, load_run_spec, section_options

    spec = load_run_spec("claims", ["options.adapters.sft.ablation_seeds=first", "options.swaps.n_pairs=4"])
    sft, profile = section_options(spec, "adapters")["sft"], load_profile("cpu")["adapters"]["sft"]
    assert profile["ablation_seeds"] == "all" and sft == {**profile, "ablation_seeds": "first"}
    assert section_options(spec, "adapters")["dpo"] == load_profile("cpu")["adapters"]["dpo"]
    assert section_options(spec, "swaps")["n_pairs"] == 4


@pytest.fixture(autouse=True)
def _forget_fake_modules():
    yield
    for name in [m for m in sys.modules if m.split(".")[0] == "fakeexp"]:
        del sys.modules[name]


def test_limits_state_the_adapter_training_of_this_run():
    from vsteer.report import limits

    meta = {
        "model": "m",
        "profile": "smoke",
        "model_facts": {"n_params": 2_500_000_000, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2},
        "config": {"adapters": {"tasks": ["sft", "dpo"], "sft": {"steps": 3, "seeds": [0, 1]}, "dpo": {}}},
    }
    text = limits(meta, [])
    assert "2.5B parameters, 4 layers, 8 query heads, 2 key/value heads" in text
    assert "SFT for 3 steps with seeds 0, 1; DPO for the recipe's steps" in text


def test_reads_of_shipped_data_are_recorded_even_when_parsed_before():
    from vsteer.data import sst2

    sst2("dev")  # parsed and cached in this process before the piece starts
    with track_reads() as reads:
        sst2("dev")
    assert (
        list(reads) == ["data/sst2/stsa.binary.dev.gz"] and len(reads["data/sst2/stsa.binary.dev.gz"]) == 64
    )


def test_an_enclosing_piece_depends_on_the_files_a_cached_inner_piece_read(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("1")
    monkeypatch.setattr(pieces, "tracked_roots", lambda: [data])
    cache = PieceCache(tmp_path / "cache")
    inner = lambda _work: {"a": (data / "a.txt").read_text()}  # noqa: E731
    cache.run("inner", {}, inner)  # cached before the outer piece runs
    outer, _ = cache.run("outer", {}, lambda _work: cache.run("inner", {}, inner)[0]["result"])
    assert list(outer["reads"]) == ["data/a.txt"]
    (data / "a.txt").write_text("2")
    again, _ = cache.run("outer", {}, lambda _work: cache.run("inner", {}, inner)[0]["result"])
    assert again["result"] == {"a": "2"}


def test_run_command_takes_device_dtype_and_rules(tmp_path, monkeypatch, capsys):
    import vsteer.run as run_mod
    from vsteer.cli import main

    rules = tmp_path / "rules.yaml"
    rules.write_text(FAKE_RULES)
    seen = {}
    monkeypatch.setattr(
        run_mod, "run", lambda spec, **kw: seen.setdefault("spec", spec) and tmp_path / "report.md"
    )
    args = [
        "run",
        "claims",
        "--set",
        "profile=smoke",
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
        "--rules",
        str(rules),
    ]
    assert main(args) == 0
    spec = seen["spec"]
    assert (spec.device, spec.dtype, spec.rules, spec.profile) == ("cpu", "bfloat16", str(rules), "smoke")
    assert main(["run", "claims", "--rules", str(tmp_path / "missing.yaml")]) == 2
    assert "verdict rules file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "workers, threads, device, expected",
    [
        (2, 2, "cpu", (2, 1)),  # the shipped recipe on 2 cores: two processes of one thread
        (2, 16, "cpu", (2, 8)),
        (4, 2, "cpu", (2, 1)),  # never more processes than torch threads
        (2, 1, "cpu", (1, 1)),  # one thread: one after another
        (2, 8, "cuda", (1, 8)),  # one accelerator: in this process
        (1, 2, "cpu", (1, 2)),
    ],
)
def test_sections_go_side_by_side_only_on_the_cpu_and_split_its_threads(
    workers, threads, device, expected, monkeypatch
):
    import vsteer.run as run_mod

    monkeypatch.setattr(run_mod, "_threads", lambda: threads)
    assert run_mod._section_workers(run_mod.RunSpec(workers=workers), device) == expected


def test_reads_noted_from_another_process_reach_the_enclosing_piece(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_text("1")
    monkeypatch.setattr(pieces, "tracked_roots", lambda: [data])
    with track_reads() as reads:
        pieces.note_reads({"data/x.txt": ""})
    assert reads == {"data/x.txt": pieces.file_digest(data / "x.txt")}


def test_a_result_from_another_process_is_adopted_with_its_files_and_reads(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_text("1")
    monkeypatch.setattr(pieces, "tracked_roots", lambda: [data])
    work = tmp_path / "job"
    work.mkdir()
    (work / "plot.png").write_bytes(b"png")
    cache = PieceCache(tmp_path / "cache")
    piece, where = cache.adopt("k", {"a": 1}, {"value": 2}, work, {"data/x.txt": ""})
    assert piece["result"] == {"value": 2} and (where / "plot.png").read_bytes() == b"png"
    assert piece["reads"] == {"data/x.txt": pieces.file_digest(data / "x.txt")}
    assert not work.exists() and cache.get("k", {"a": 1})["result"] == {"value": 2}
    (data / "x.txt").write_text("2")  # the file its worker read changed: the piece is stale
    assert cache.get("k", {"a": 1}) is None


# ---- found in the evening review of 2026-12-07: inputs the keys missed, concurrent runs ----------
def test_a_computing_config_change_recomputes_and_a_docstring_edit_does_not(fake_job):
    """The model key held only shape fields and the weights: an edited rope_theta (or norm eps,
    activation, tying) replayed pieces computed under the old one. A docstring edit, which computes
    nothing differently, recomputed everything."""
    job, pkg, model = fake_job["job"], fake_job["pkg"], fake_job["model"]
    assert job()[0] == ["probes", "swaps"]
    model.config.rope_theta = 1234.0
    assert job()[0] == ["probes", "swaps"]
    (pkg / "common.py").write_text('"""A docstring now."""\nSCALE = 1.0\n')
    assert job()[0] == []
    model.config.transformers_version = "0.0.1"  # bookkeeping, not computing
    assert job()[0] == []


def test_the_model_key_reads_the_tokenizer_and_generation_config():
    from test_train import char_tokenizer

    from vsteer.models import model_key, tokenizer_fingerprint

    model = make_tiny_model("llama")
    tok = char_tokenizer()
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(char_tokenizer())
    base = model_key(model, tok)
    tok.chat_template = "{{ messages[0]['content'] }}"
    assert model_key(model, tok)["tokenizer"] != base["tokenizer"]
    model.generation_config.repetition_penalty = 1.3
    assert model_key(model, tok)["generation"] != base["generation"]
    assert model_key(model, tok)["weights"] == base["weights"]


def test_a_recipe_key_follows_the_data_files_the_recipe_names(tmp_path):
    """A user recipe's ``data.train`` file was not in the section key: edited training data
    replayed adapters trained on the old data."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  train: train.jsonl\n")
    before = content_key({"recipe": str(recipe)})
    assert before["recipe"]["refs"][0]["file"] == "train.jsonl"
    data.write_text('{"text": "b"}\n')
    assert content_key({"recipe": str(recipe)}) != before


def test_a_same_size_rewrite_with_its_mtime_kept_is_rehashed(tmp_path):
    import os

    f = tmp_path / "d.txt"
    f.write_text("aaaa")
    first = pieces.file_digest(f)
    st = f.stat()
    tmp = tmp_path / "new"
    tmp.write_text("bbbb")
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, f)  # cp -p / rsync -a: same size, same mtime
    assert f.stat().st_mtime_ns == st.st_mtime_ns and pieces.file_digest(f) != first


def test_the_weights_memo_tells_a_copied_over_checkpoint_apart(tmp_path):
    import os
    import shutil

    from transformers import AutoModelForCausalLM

    from vsteer.models import weights_fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    make_tiny_model("llama").save_pretrained(a)
    other = make_tiny_model("llama")  # a fine-tune: same shapes, other weights
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    other.save_pretrained(b)
    fa = weights_fingerprint(AutoModelForCausalLM.from_pretrained(a))
    fb = weights_fingerprint(AutoModelForCausalLM.from_pretrained(b))
    target = a / "model.safetensors"
    st = target.stat()
    assert st.st_size == (b / "model.safetensors").stat().st_size
    shutil.copy2(b / "model.safetensors", tmp_path / "copy")
    os.utime(tmp_path / "copy", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp_path / "copy", target)
    assert fa != fb and weights_fingerprint(AutoModelForCausalLM.from_pretrained(a)) == fb


def test_a_second_run_keeps_the_work_in_progress_of_a_live_one(tmp_path):
    """clean_partial removed every temporary directory, also those of a run working beside it."""
    import subprocess

    cache = PieceCache(tmp_path)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        busy = tmp_path / f".job.pid{live.pid}.x"
        busy.mkdir()
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
        gone = tmp_path / f".job.pid{int(dead.stdout)}.y"
        gone.mkdir()
        legacy = tmp_path / ".job-old"
        legacy.mkdir()
        assert cache.clean_partial() == 2
        assert busy.is_dir() and not gone.exists() and not legacy.exists()
    finally:
        live.kill()
        live.wait()


def test_a_piece_published_meanwhile_by_another_process_keeps_its_files(tmp_path):
    """Two processes computing one piece: the later one deleted the first's published piece and
    put its own files beside numbers the first caller holds. Now the later one keeps the first's."""
    cache = PieceCache(tmp_path)

    def ours(work):
        (work / "adapter.bin").write_text("ours")
        # meanwhile another process publishes the same piece
        other = PieceCache(tmp_path)
        other.run("k", {"x": 1}, lambda w: (w / "adapter.bin").write_text("theirs") and {"m": "theirs"})
        return {"m": "ours"}

    piece, where = cache.run("k", {"x": 1}, ours)
    assert piece["result"] == {"m": "theirs"} and (where / "adapter.bin").read_text() == "theirs"


def test_compare_keys_the_shipped_evaluation_data(monkeypatch):
    """KL/perplexity, MMLU and the neutral prompts were read in worker processes, untracked."""
    from vsteer import compare, data

    before = compare._eval_data_key()
    monkeypatch.setattr(data, "wikitext2_raw", lambda: ["another text"])
    assert compare._eval_data_key() != before
