"""Any device, any dtype: explicit device and dtype arguments, and outputs that leave a model safely.

These machines have no GPU, so the CUDA path is tested by what it shares with an explicit
``device="cpu"`` / ``dtype="bfloat16"`` run, by faking CUDA's availability where only the choice
of device is under test, and by running the experiments under a model whose outputs require
grad (``.numpy()`` on such a tensor raises, as it does on a GPU tensor).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from test_encoding import TEXTS, ChatTok, _pair
from test_experiments import TOK

import vsteer
from vsteer.errors import ModelError, RecipeError
from vsteer.models import default_device, load_model, model_device, resolve_device, resolve_dtype

PACKAGE = Path(vsteer.__file__).parent
WIKI = " ".join(f"word{i % 13} and thing{i % 7}." for i in range(200))


# ---- choosing a device and a dtype ----------------------------------------------------------
def test_auto_is_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize(
    "device, message", [("cuda", "no CUDA device"), ("gpu9", "torch device"), ("cuda:5", "does not exist")]
)
def test_a_device_that_cannot_be_used_is_one_error_line(monkeypatch, device, message):
    if device == "cuda:5":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match=message) as err:
        resolve_device(device)
    assert "\n" not in str(err.value)


def test_dtype_names_aliases_and_auto():
    assert (
        resolve_dtype("bfloat16") is resolve_dtype("bf16") is resolve_dtype(torch.bfloat16) is torch.bfloat16
    )
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("auto", "cpu") is torch.float32  # bfloat16 only on a CUDA device
    with pytest.raises(ModelError, match="floating torch dtype"):
        resolve_dtype("int8")


# ---- experiments on an explicit device and dtype --------------------------------------------
@pytest.fixture(scope="module")
def bf16_model():
    model = make_tiny_model("llama").to(device="cpu", dtype=torch.bfloat16)
    assert model_device(model) == torch.device("cpu")
    return model


def test_experiments_run_in_bfloat16_and_return_float_arrays(bf16_model):
    from vsteer.experiments.basis import BasisConfig, run_basis
    from vsteer.experiments.patching import align_pair, patch_pairs
    from vsteer.experiments.probing import collect_features
    from vsteer.experiments.steering import p_matching
    from vsteer.experiments.swaps import SwapConfig, run_swaps
    from vsteer.metrics import next_token_logprobs

    feats = collect_features(bf16_model, TOK, TEXTS, layers=[1], progress_bar=False)
    assert all(f.dtype == np.float32 and np.isfinite(f).all() for f in feats.values())
    pairs = [align_pair(TOK, _pair("Rome", "Oslo", "Italy", "Norway", "I live in {}. It is in"))]
    res = patch_pairs(bf16_model, TOK, pairs, sites=("v",), layers=[1], progress_bar=False)
    assert res["clean"].dtype == np.float64 and np.isfinite(res["patched"][("v", 1)]).all()
    config = SwapConfig(n_pairs=1, n_windows=1, window=16, matrices=("v", "k"))
    records = run_swaps(bf16_model, TOK, config, text=WIKI, prompts=TEXTS, progress_bar=False).records
    assert all(np.isfinite(r["kl"]) for r in records)
    items = [(f"x {'good' if i % 2 else 'bad'} {i}", i % 2) for i in range(8)]
    run_basis(bf16_model, TOK, BasisConfig(n_shuffles=3, n_boot=5), items=items, progress_bar=False)
    ab = [SimpleNamespace(question=t, matching="(A)", not_matching="(B)") for t in TEXTS]
    assert np.all((p_matching(bf16_model, ChatTok(), ab) > 0) & (p_matching(bf16_model, ChatTok(), ab) < 1))
    assert next_token_logprobs(bf16_model, TOK, TEXTS).dtype == torch.float32


# ---- outputs leave the model through one helper ---------------------------------------------
def test_to_numpy_takes_tensors_that_require_grad_and_bfloat16():
    from vsteer.encoding import to_numpy

    t = torch.ones(3, dtype=torch.bfloat16, requires_grad=True) * 2
    with pytest.raises(RuntimeError):
        t.numpy()  # what a bare .numpy() does with a model output outside no_grad
    out = to_numpy(t)
    assert out.dtype == np.float32 and out.tolist() == [2.0, 2.0, 2.0]
    assert to_numpy(torch.tensor([True, False])).dtype == np.bool_


def test_no_module_calls_numpy_on_a_tensor_but_the_encoding_helper():
    """``x.numpy()`` fails on a GPU tensor and on one that requires grad; every conversion goes
    through :func:`vsteer.encoding.to_numpy`, which a CPU machine can check."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        # models.py hashes the raw bytes of the weights, which must not pass a dtype conversion
        if path.name in ("encoding.py", "models.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "numpy"
            ):
                if not _detached_on_cpu(node.func.value):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, f".numpy() outside vsteer.encoding.to_numpy: {offenders}"


def _detached_on_cpu(receiver: ast.expr) -> bool:
    """``x.detach()....cpu()`` right before ``.numpy()`` is safe too."""
    calls = []
    while isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Attribute):
        calls.append(receiver.func.attr)
        receiver = receiver.func.value
    return bool(calls) and calls[0] == "cpu" and "detach" in calls


class _GradOutputs:
    """Makes every decoder layer's output and the logits require grad, even under ``torch.no_grad``,
    so any bare ``.numpy()`` on a model output downstream raises (as it does on a GPU tensor)."""

    def __init__(self, model):
        from vsteer.arch import get_arch

        self.zero = torch.zeros((), requires_grad=True)
        arch = get_arch(model)
        modules = [arch.layer(i) for i in range(arch.n_layers)] + [model.get_output_embeddings()]
        self.handles = [m.register_forward_hook(self.hook) for m in modules]

    def hook(self, module, args, output):
        with torch.enable_grad():
            if isinstance(output, tuple):
                return (output[0] + self.zero,) + tuple(output[1:])
            return output + self.zero

    def remove(self):
        for h in self.handles:
            h.remove()


def test_experiments_survive_model_outputs_that_require_grad():
    from vsteer.experiments.patching import align_pair, patch_pairs
    from vsteer.experiments.probing import collect_features
    from vsteer.experiments.swaps import SwapConfig, run_swaps
    from vsteer.metrics import kl_rows, next_token_logprobs

    model = make_tiny_model("gpt2")
    grads = _GradOutputs(model)
    try:
        with torch.no_grad():  # the hook outruns no_grad: the outputs really require grad
            assert model(input_ids=torch.tensor([[5, 6]])).logits.requires_grad
        collect_features(model, TOK, TEXTS, layers=[1], progress_bar=False)
        pairs = [align_pair(TOK, _pair("Rome", "Oslo", "Italy", "Norway", "I live in {}. It is in"))]
        patch_pairs(model, TOK, pairs, sites=("v",), layers=[1], progress_bar=False)
        config = SwapConfig(n_pairs=1, n_windows=1, window=16, matrices=("v", "k"))
        run_swaps(model, TOK, config, text=WIKI, prompts=TEXTS, progress_bar=False)
        logp = next_token_logprobs(model, TOK, TEXTS)
        assert np.isfinite(kl_rows(logp, logp)).all()
    finally:
        grads.remove()


# ---- commands take --device and --dtype -----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from test_models import _tiny_config, _tiny_tokenizer
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("models") / "tiny-llama"
    LlamaForCausalLM(_tiny_config()).save_pretrained(directory)
    _tiny_tokenizer().save_pretrained(directory)
    return directory


def test_load_model_honours_an_explicit_device_and_dtype(tiny_dir):
    model, _ = load_model(str(tiny_dir), device="cpu", dtype="bfloat16")
    assert model_device(model) == torch.device("cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_every_model_loading_command_takes_device_and_dtype():
    from vsteer.cli import build_parser

    parser = build_parser()
    for argv in (
        ["patch"],
        ["swap"],
        ["probe"],
        ["basis"],
        ["extract", "--data", "sst2", "-o", "x"],
        ["generate", "hi"],
        ["chat"],
        ["model", "info"],
        ["adapter", "budget", "v"],
        ["train", "r.yaml"],
        ["run", "claims"],
    ):
        args = parser.parse_args([*argv, "--device", "cpu", "--dtype", "bfloat16"])
        assert (args.device, args.dtype) == ("cpu", "bfloat16"), argv


def test_cli_runs_on_the_device_and_in_the_dtype_it_is_given(tiny_dir, tmp_path, capsys):
    from vsteer.cli import main
    from vsteer.vectors import SteeringVector

    dev = ["--model", str(tiny_dir), "--device", "cpu", "--dtype", "bfloat16"]
    assert main(["model", "info", str(tiny_dir), "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"positive": f"w{i} w1 w2", "negative": f"w{i} w3"}) + "\n" for i in range(4))
    )
    out = tmp_path / "v.safetensors"
    assert main(["extract", *dev, "--data", str(data), "--layers", "0,1", "-o", str(out)]) == 0
    vec = SteeringVector.load(out)
    assert vec.layers == [0, 1] and all(torch.isfinite(t).all() for t in vec.directions.values())
    assert main(["generate", *dev, "--raw", "--max-new-tokens", "3", "--vector", str(out), "w1 w2"]) == 0
    swap = ["swap", *dev, "--n-pairs", "1", "--n-windows", "1", "--window", "8", "--n-prompts", "2"]
    assert main([*swap, "--matrices", "v,k", "--no-progress", "--out", str(tmp_path / "swap")]) == 0
    assert json.loads((tmp_path / "swap" / "result.json").read_text())["records"]


def test_cli_swap_takes_the_early_layer_strata_and_refuses_a_negative_count(tiny_dir, tmp_path, capsys):
    from vsteer.cli import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["swap"]).early_layers == 2
    assert parser.parse_args(["swap", "--early-layers", "0"]).early_layers == 0
    small = ["--n-windows", "1", "--window", "8", "--n-prompts", "2", "--matrices", "v,k", "--no-progress"]
    out = tmp_path / "swap"
    assert main(["swap", "--model", str(tiny_dir), "--early-layers", "-1", *small, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vsteer: error: early_layers must be >= 0, got -1" and not out.exists()
    assert main(["swap", "--model", str(tiny_dir), "--early-layers", "0", *small, "--out", str(out)]) == 0
    meta = json.loads((out / "result.json").read_text())["meta"]
    assert meta["config"]["early_layers"] == 0
    # the early stratum's share of the sample: one line when it is too small for a spread
    bad = ["swap", "--model", str(tiny_dir), "--early-pairs", "1"]
    assert main([*bad, *small, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vsteer: error: early_pairs must be >= 2 (a stratum's spread needs 2 pairs), got 1"
    assert json.loads((out / "result.json").read_text())["meta"]["config"]["early_layers"] == 0  # kept


def test_a_recipe_sets_device_and_dtype_and_a_bad_one_is_one_error_line(tmp_path):
    from vsteer.recipes import load_recipe

    base = {"name": "r", "data": {"train": str(tmp_path / "t.jsonl")}}
    recipe = load_recipe({**base, "device": "cpu", "dtype": "bfloat16"})
    assert (recipe["device"], recipe["dtype"]) == ("cpu", "bfloat16")
    assert (load_recipe(base)["device"], load_recipe(base)["dtype"]) == ("auto", "float32")
    for key, value in (("device", "gpu9"), ("dtype", "int8")):
        with pytest.raises(RecipeError, match=f"recipe key '{key}'") as err:
            load_recipe({**base, key: value})
        assert "\n" not in str(err.value)
