"""Recipes and TRL training: validation before loading, adapter outputs, overwrite, resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, make_tiny_model

from vsteer.errors import DataError, RecipeError, VsteerError
from vsteer.recipes import load_recipe
from vsteer.train import ADAPTER_META, EAGER_MAX_LENGTH, preference_accuracy, train_from_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is ~10x faster than two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CHARS = [chr(c) for c in range(32, 32 + VOCAB - 3)]


def char_tokenizer():
    """A character-level fast tokenizer over the tiny models' 97-token vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<s>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<s>"
    )


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sft_file(tmp_path):
    rows = [{"prompt": f"review {i}:", "completion": " great fun, loved it!"} for i in range(40)]
    return _write_jsonl(tmp_path / "sft.jsonl", rows)


@pytest.fixture
def dpo_file(tmp_path):
    rows = [{"prompt": f"q{i}? ", "chosen": "(A)", "rejected": "(B)"} for i in range(40)]
    return _write_jsonl(tmp_path / "dpo.jsonl", rows)


def _recipe(data_file, **training):
    return {
        "name": "tiny",
        "method": "sft",
        "data": {"train": str(data_file), "eval_size": 8},
        "adapter": {"targets": "v", "r": 4},
        "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "max_length": 32, **training},
    }


def _run(recipe, tmp_path, family="llama", **kwargs):
    return train_from_recipe(
        recipe,
        output_dir=tmp_path / "adapters",
        model=make_tiny_model(family),
        tokenizer=char_tokenizer(),
        **kwargs,
    )


# recipes ------------------------------------------------------------------------------------
def test_recipe_fills_defaults_and_applies_dotted_and_short_overrides(sft_file):
    r = load_recipe(_recipe(sft_file), ["training.max_steps=7", "r=2", "adapter.layers=[0, 1]"])
    assert (r["training.max_steps"], r["adapter.r"], r["adapter.layers"]) == (7, 2, [0, 1])
    assert r["training.max_length"] == 32 and r["model"] == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    "change, key",
    [
        ({"training": {"max_step": 3}}, "training.max_step"),
        ({"adapter": {"r": "8"}}, "adapter.r"),
        ({"adapter": {"r": True}}, "adapter.r"),
        ({"training": {"learning_rate": -1.0}}, "training.learning_rate"),
        ({"method": "ppo"}, "method"),
        ({"adapter": {"targets": "vx"}}, "vx"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_recipe_key_or_value_is_a_recipe_error_naming_it(sft_file, change, key):
    recipe = _recipe(sft_file)
    for k, v in change.items():
        recipe[k] = {**recipe[k], **v} if isinstance(v, dict) else v
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe(recipe)


def test_yaml_recipe_resolves_data_next_to_it(tmp_path, sft_file):
    path = tmp_path / "r.yaml"
    path.write_text("name: tiny\ndata:\n  train: sft.jsonl\n")
    assert load_recipe(path).data_path("data.train") == sft_file.resolve()


def test_missing_data_file_fails_before_any_model_loads(tmp_path):
    recipe = {"name": "x", "model": "no-such-model", "data": {"train": "nope.jsonl"}}
    with pytest.raises(DataError, match="nope.jsonl"):
        train_from_recipe(recipe, output_dir=tmp_path)


def test_rows_without_the_method_fields_are_a_data_error(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "hi"}] * 10)
    with pytest.raises(DataError, match="prompt\\+completion"):
        _run(_recipe(bad), tmp_path)


# training -----------------------------------------------------------------------------------
def test_sft_writes_a_plain_peft_adapter_with_vsteer_metadata(tmp_path, sft_file):
    from peft import PeftModel

    result = _run(_recipe(sft_file), tmp_path)
    meta = json.loads((result.adapter_dir / ADAPTER_META).read_text())
    assert result.adapter_dir == tmp_path / "adapters" / "tiny"
    assert meta["adapter"]["targets"] == "v"
    assert meta["adapter"]["effective_params"] == meta["adapter"]["effective_params_measured"] == 3 * 4 * 48
    assert len(meta["data"]["train"]["sha256"]) == 64 and meta["data"]["train"]["rows_used"] == 32
    assert meta["seed"] == 0 and meta["metrics"]["steps"] == 4
    assert result.metrics["eval_loss_after"] < result.metrics["eval_loss_before"]
    PeftModel.from_pretrained(make_tiny_model("llama"), result.adapter_dir)
    assert not list((tmp_path / "adapters").glob(".tiny*"))  # no partial or temp dirs left


def test_existing_adapter_is_refused_without_overwrite(tmp_path, sft_file):
    _run(_recipe(sft_file, max_steps=1), tmp_path)
    with pytest.raises(VsteerError, match="overwrite"):
        _run(_recipe(sft_file, max_steps=1), tmp_path)
    result = _run(_recipe(sft_file, max_steps=2), tmp_path, overwrite=True)
    assert json.loads((result.adapter_dir / ADAPTER_META).read_text())["metrics"]["steps"] == 2


def test_failed_overwrite_keeps_the_old_adapter(tmp_path, sft_file):
    first = _run(_recipe(sft_file, max_steps=1), tmp_path)
    before = (first.adapter_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="stop"):
        _run(_recipe(sft_file, max_steps=4), tmp_path, overwrite=True, callbacks=[_stop_at(2)])
    assert (first.adapter_dir / "adapter_model.safetensors").read_bytes() == before


def _stop_at(step):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise RuntimeError("stop")

    return Stop()


def test_resume_continues_from_the_last_checkpoint_to_the_same_adapter(tmp_path, sft_file):
    from safetensors.torch import load_file

    recipe = _recipe(sft_file, max_steps=4, save_steps=2)
    straight = _run({**recipe, "name": "straight"}, tmp_path)
    with pytest.raises(RuntimeError, match="stop"):
        _run(recipe, tmp_path, callbacks=[_stop_at(3)])
    assert (tmp_path / "adapters" / ".tiny.partial" / "checkpoint-2").is_dir()
    resumed = _run(recipe, tmp_path, resume=True)
    assert resumed.metrics["steps"] == 4
    a = load_file(straight.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_a_fresh_run_never_clears_an_interrupted_runs_checkpoints_unasked(tmp_path, sft_file):
    """Found in review: a run without resume deleted the checkpoints of an interrupted run (hours of
    training lost to a forgotten --resume). Now one line; overwrite starts over, resume continues."""
    recipe = _recipe(sft_file, max_steps=4, save_steps=2)
    with pytest.raises(RuntimeError, match="stop"):
        _run(recipe, tmp_path, callbacks=[_stop_at(3)])
    partial = tmp_path / "adapters" / ".tiny.partial"
    with pytest.raises(VsteerError, match="interrupted run .*checkpoint-2.*resume") as err:
        _run(recipe, tmp_path)
    assert "\n" not in str(err.value) and (partial / "checkpoint-2").is_dir()
    started_over = _run(recipe, tmp_path, overwrite=True)
    assert started_over.metrics["steps"] == 4 and not partial.exists()


@pytest.mark.parametrize(
    "override, key", [("training.learning_rate=0.5", "learning_rate"), ("r=8", "adapter.r")]
)
def test_resume_under_a_changed_recipe_is_one_line_and_keeps_the_checkpoints(
    tmp_path, sft_file, override, key
):
    """Found in review: a resumed run restored the checkpoint's optimizer and schedule (a changed
    learning rate was silently unused) while vsteer.json recorded the new recipe; a changed rank
    was a state-dict traceback. More steps may still be asked for."""
    recipe = _recipe(sft_file, max_steps=4, save_steps=2)
    with pytest.raises(RuntimeError, match="stop"):
        _run(recipe, tmp_path, callbacks=[_stop_at(3)])
    partial = tmp_path / "adapters" / ".tiny.partial"
    with pytest.raises(VsteerError, match=f"another recipe .*{key}") as err:
        train_from_recipe(
            recipe,
            [override],
            output_dir=tmp_path / "adapters",
            model=make_tiny_model("llama"),
            tokenizer=char_tokenizer(),
            resume=True,
        )
    assert "\n" not in str(err.value) and (partial / "checkpoint-2").is_dir()
    resumed = _run(_recipe(sft_file, max_steps=6, save_steps=2), tmp_path, resume=True)
    assert resumed.metrics["steps"] == 6


@pytest.mark.parametrize(
    "recipe_change, words",
    [
        ({"adapter": {"targets": "v", "rank": 16}}, "a LoRA adapter's rank is adapter.r"),
        ({"training": {"max_steps": 4, "eval_steps": 2}}, "'training.eval_steps' is set by vsteer"),
        ({"training": {"max_steps": 4, "beta": 0.5}}, "applies to method: dpo"),
    ],
)
def test_recipe_keys_the_run_would_ignore_are_one_line(sft_file, recipe_change, words):
    recipe = {**_recipe(sft_file), **recipe_change}
    with pytest.raises(RecipeError, match=words) as err:
        load_recipe(recipe)
    assert "\n" not in str(err.value)
    assert (
        load_recipe(load_recipe(_recipe(sft_file))).values == load_recipe(_recipe(sft_file)).values
    )  # defaults round-trip


def test_resume_without_a_checkpoint_is_an_error(tmp_path, sft_file):
    with pytest.raises(VsteerError, match="nothing to resume"):
        _run(_recipe(sft_file), tmp_path, resume=True)


def test_trainer_keeps_masked_fused_rows_at_zero_with_weight_decay(tmp_path, sft_file):
    from safetensors.torch import load_file

    import vsteer

    result = _run(_recipe(sft_file, weight_decay=0.5), tmp_path, family="gpt2")
    rows = vsteer.get_arch(make_tiny_model("gpt2")).rows("v")
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    for name, w in weights.items():
        if "lora_B" in name:
            mask = torch.ones(w.shape[0], dtype=torch.bool)
            mask[rows] = False
            assert torch.count_nonzero(w[mask]) == 0 and torch.count_nonzero(w[~mask]) > 0


def test_match_v_budget_arm_trains_with_equal_effective_params(tmp_path, sft_file):
    recipe = _recipe(sft_file, max_steps=1)
    recipe["adapter"] = {"targets": "o", "r": 4, "match": "v"}
    result = _run(recipe, tmp_path)
    assert abs(result.adapter["effective_params"] - 3 * 4 * 48) <= 0.02 * 3 * 4 * 48


def test_dpo_raises_held_out_preference_accuracy(tmp_path, dpo_file):
    recipe = _recipe(dpo_file, max_steps=6, learning_rate=5e-2)
    recipe["method"] = "dpo"
    result = _run(recipe, tmp_path)
    assert result.metrics["preference_accuracy_after"] == 1.0
    assert result.metrics["preference_margin_after"] > result.metrics["preference_margin_before"]


def test_preference_accuracy_scores_only_completion_tokens():
    model, tok = make_tiny_model("llama"), char_tokenizer()
    same = [{"prompt": "abc", "chosen": "xy", "rejected": "xy"}]
    assert preference_accuracy(model, tok, same)["preference_margin"] == 0.0


# two processes -------------------------------------------------------------------------------
_TWO_PROC_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from conftest import make_tiny_model
from test_train import char_tokenizer
from vsteer.train import train_from_recipe

recipe = json.loads({recipe!r})
result = train_from_recipe(recipe, output_dir={out!r}, model=make_tiny_model("phi3"), tokenizer=char_tokenizer())
if int(os.environ.get("RANK", "0")) == 0:
    info = dict(world_size=dist.get_world_size() if dist.is_initialized() else 1,
                backend=dist.get_backend() if dist.is_initialized() else None, metrics=result.metrics)
    with open(os.path.join({out!r}, "info.json"), "w") as f:
        json.dump(info, f)
"""


@pytest.mark.slow
def test_cpu_2proc_config_starts_two_processes_and_matches_one_process(tmp_path, sft_file):
    """Same recipe, same global batch (4): 2 gloo processes x 2 vs 1 process x 4.

    Step 1 sees the same examples and gives the same loss; afterwards the runs differ only by float
    summation order, which Adam amplifies on the zero-initialised lora_B (its first update is
    lr * sign(grad)). Tolerance: held-out loss after training within 10% of the improvement.
    """
    import pathlib
    import subprocess
    import sys

    from safetensors.torch import load_file

    import vsteer

    repo = pathlib.Path(__file__).resolve().parents[1]
    recipe = _recipe(sft_file, max_steps=4, num_threads=1)
    recipe["name"] = "two"
    script = tmp_path / "two.py"
    out = tmp_path / "adapters"
    script.write_text(
        _TWO_PROC_SCRIPT.format(tests=str(repo / "tests"), recipe=json.dumps(recipe), out=str(out))
    )
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(repo / "accelerate_configs" / "cpu_2proc.yaml"), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "info.json").read_text())
    assert (info["world_size"], info["backend"], info["metrics"]["processes"]) == (2, "gloo", 2)

    one = _run({**recipe, "name": "one"}, tmp_path, family="phi3")
    two = info["metrics"]
    gain = one.metrics["eval_loss_before"] - one.metrics["eval_loss_after"]
    assert gain > 0 and two["eval_loss_before"] == pytest.approx(one.metrics["eval_loss_before"], abs=1e-6)
    assert abs(two["eval_loss_after"] - one.metrics["eval_loss_after"]) < 0.1 * gain
    rows = vsteer.get_arch(make_tiny_model("phi3")).rows("v")
    for name, w in load_file(out / "two" / "adapter_model.safetensors").items():
        if "lora_B" in name:
            keep = torch.zeros(w.shape[0], dtype=torch.bool)
            keep[rows] = True
            assert torch.count_nonzero(w[~keep]) == 0


def test_evaluate_sft_loss_of_the_base_model_is_the_loss_before_training(tmp_path, sft_file):
    from vsteer.train import evaluate_sft_loss

    result = _run(_recipe(sft_file, max_steps=1), tmp_path)
    loss = evaluate_sft_loss(make_tiny_model("llama"), char_tokenizer(), _recipe(sft_file))
    assert loss == pytest.approx(result.metrics["eval_loss_before"], abs=1e-6)


# the real embedded model and the shipped data ---------------------------------------------------
REPO_RECIPES = __import__("pathlib").Path(__file__).resolve().parents[1] / "recipes"
QUICK = ["training.batch_size=4", "training.max_length=48", "data.n_eval=16", "training.logging_steps=1"]


@pytest.mark.slow
def test_real_model_equal_budget_arms_match_v_within_two_percent():
    from vsteer.lora import plan_adapter
    from vsteer.models import load_model

    model, _ = load_model("smollm2-135m-instruct")
    v = plan_adapter(model, "v", r=8)
    assert v.effective == v.trainable == 30 * 8 * (576 + 192)
    for arm in ("qk", "o", "qkvo"):
        plan = plan_adapter(model, arm, r=8, match="v")
        assert abs(plan.effective - v.effective) <= 0.02 * v.effective, plan.summary()


@pytest.mark.slow
def test_real_sft_v_adapter_lowers_held_out_loss(tmp_path):
    result = train_from_recipe(
        REPO_RECIPES / "value_only_sft.yaml", [*QUICK, "training.max_steps=6"], output_dir=tmp_path
    )
    m = result.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.01, m
    meta = json.loads((result.adapter_dir / ADAPTER_META).read_text())
    assert meta["base_model"]["name"] == "smollm2-135m-instruct" and meta["base_model"]["config_fingerprint"]
    assert meta["data"]["eval"]["path"].endswith("imdb_positive_sft_eval.jsonl.gz")


@pytest.mark.slow
def test_real_dpo_v_adapter_raises_held_out_preference_margin(tmp_path):
    result = train_from_recipe(
        REPO_RECIPES / "value_only_dpo.yaml",
        [*QUICK, "training.max_steps=6", "training.max_length=112"],
        output_dir=tmp_path,
    )
    m = result.metrics
    assert m["preference_margin_after"] > m["preference_margin_before"], m


def test_cli_check_validates_recipe_and_data_without_loading_a_model(tmp_path, sft_file, capsys):
    from vsteer.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(f"name: tiny\nmodel: not-a-model\ndata:\n  train: {sft_file}\n")
    assert main(["train", str(path), "--check", "--set", "data.eval_size=4"]) == 0
    assert "36 train rows, 4 eval rows" in capsys.readouterr().out
    assert main(["train", str(path), "--check", "--set", "training.max_step=3"]) == 2
    assert "training.max_steps" in capsys.readouterr().err


def test_float_keys_accept_exponents_without_a_dot(sft_file):
    assert load_recipe(_recipe(sft_file), ["training.learning_rate=5e-3"])["training.learning_rate"] == 0.005


# precision, TRL config keys, launchers ---------------------------------------------------------
def _train_dtypes(recipe, tmp_path, **kwargs):
    """Train; return the dtypes of one MLP activation seen in training-mode forwards, and the meta."""
    model = make_tiny_model("llama")
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, a, out: seen.append(out.dtype) if m.training else None
    )
    result = train_from_recipe(
        recipe, output_dir=tmp_path / "adapters", model=model, tokenizer=char_tokenizer(), **kwargs
    )
    return seen, json.loads((result.adapter_dir / ADAPTER_META).read_text()), result


def test_bf16_recipe_trains_under_bf16_autocast_and_records_it(tmp_path, sft_file):
    seen, meta, result = _train_dtypes(_recipe(sft_file, max_steps=2, precision="bf16"), tmp_path)
    assert seen and set(seen) == {torch.bfloat16}
    run = meta["training_run"]
    assert (run["precision"], run["mixed_precision"], run["autocast"]) == ("bf16", "bf16", True)
    assert run["weights_dtype"] == "float32" and run["optim"] == "adamw_torch_fused"
    assert result.metrics["precision"] == "bf16" and meta["metrics"]["mixed_precision"] == "bf16"
    import accelerate
    import peft
    import transformers
    import trl

    for module in (torch, transformers, peft, trl, accelerate):  # resolved, installed versions
        assert meta["versions"][module.__name__] == module.__version__


def test_launcher_mixed_precision_does_not_override_an_fp32_recipe(tmp_path, sft_file, monkeypatch, caplog):
    """What ``accelerate launch`` with ``mixed_precision: bf16`` exports: the recipe still wins."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level("WARNING", logger="vsteer.train"):
        seen, meta, _ = _train_dtypes(_recipe(sft_file, max_steps=2), tmp_path)
    assert seen and set(seen) == {torch.float32}
    assert meta["training_run"]["mixed_precision"] == "no"
    assert meta["training_run"]["launcher_mixed_precision"] == "bf16"
    assert any("not the launcher's 'bf16'" in r.getMessage() for r in caplog.records)


def test_trl_fields_pass_through_and_optimizer_and_checkpointing_are_recorded(tmp_path, sft_file):
    recipe = _recipe(sft_file, max_steps=2, optim="sgd", gradient_checkpointing=True, adam_beta2=0.95)
    _, meta, _ = _train_dtypes(recipe, tmp_path)
    assert meta["recipe"]["training"]["adam_beta2"] == 0.95
    assert (meta["training_run"]["optim"], meta["training_run"]["gradient_checkpointing"]) == ("sgd", True)


@pytest.mark.parametrize(
    "key, value, match",
    [
        (
            "adam_beta",
            0.9,
            r"unknown recipe key 'training\.adam_beta' \(did you mean 'training\.adam_beta\d'\?\); valid training keys: .*batch_size.*precision.*trl\.SFTConfig",
        ),
        ("bf16", True, r"'training\.bf16' is set by vsteer; use training\.precision"),
        ("precision", "fp8", r"training\.precision.*fp32, bf16, fp16"),
        ("attention", "fast", r"'training\.attention' must be one of auto, model, eager, sdpa"),
        ("frozen_weights", "bf16", r"'training\.frozen_weights' must be one of auto, keep, got 'bf16'"),
        ("lm_head", "tiled", r"'training\.lm_head' must be one of auto, fused"),
    ],
)
def test_bad_training_key_is_one_line_naming_it_and_the_valid_ones(sft_file, key, value, match):
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe(_recipe(sft_file, **{key: value}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "training, match",
    [({"optim": "no_such_optimizer"}, "trl.SFTConfig"), ({"precision": "fp16"}, "fp16 needs a GPU")],
)
def test_values_trl_rejects_fail_before_the_model_loads(tmp_path, sft_file, training, match, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    recipe = {**_recipe(sft_file, **training), "model": "no-such-model", "device": "cpu"}
    with pytest.raises(RecipeError, match=match) as err:
        train_from_recipe(recipe, output_dir=tmp_path)
    assert "\n" not in str(err.value)


# training numerics: attention implementation and frozen weights while training ---------------------
def _adapter_tensors(result):
    from safetensors.torch import load_file

    name = (
        "intervention.safetensors"
        if result.adapter.get("kind") == "intervention"
        else "adapter_model.safetensors"
    )
    return load_file(str(result.adapter_dir / name))


@pytest.mark.parametrize("family", ["llama", "phi3"])  # phi3: v is the V slice of a fused qkv_proj
@pytest.mark.parametrize("kind", ["lora", "intervention"])
def test_frozen_weights_in_the_autocast_dtype_train_bit_identically_and_are_put_back(
    tmp_path, sft_file, family, kind
):
    """``frozen_weights: auto`` stores the frozen Linear weights in bf16 while training: autocast
    would cast them to the same values at every forward, so loss and adapter match bit for bit."""
    out = {}
    for mode in ("keep", "auto"):
        recipe = _recipe(sft_file, max_steps=3, precision="bf16", attention="model", frozen_weights=mode)
        if kind == "intervention":
            recipe["adapter"] = {"kind": "intervention", "intervention": "loreft", "site": "v", "rank": 2}
        model = make_tiny_model(family)
        params = {n: (p, p.dtype) for n, p in model.named_parameters()}
        result = train_from_recipe(
            recipe, output_dir=tmp_path / mode, model=model, tokenizer=char_tokenizer()
        )
        after = dict(_base_named_parameters(model))
        # the loaded weights are back: the very Parameter objects, fp32
        assert all(after[n] is p and p.dtype == dt for n, (p, dt) in params.items() if n in after)
        assert len(after) >= len(params)
        meta = json.loads((result.adapter_dir / ADAPTER_META).read_text())
        out[mode] = (
            result.metrics["train_loss"],
            _adapter_tensors(result),
            meta["training_run"]["frozen_weights"],
        )
    assert out["keep"][2] is None and out["auto"][2] == "bfloat16"
    assert out["auto"][0] == out["keep"][0]
    assert out["auto"][1].keys() == out["keep"][1].keys()
    for name, t in out["keep"][1].items():
        assert torch.equal(out["auto"][1][name], t), name


def _base_named_parameters(model):
    """Parameters by their name in the plain model (PEFT's ``base_layer.`` inserts removed)."""
    for name, p in model.named_parameters():
        if "lora_" not in name and "vsteer_intervention" not in name:
            yield name.replace("base_layer.", ""), p


def test_frozen_weights_stay_fp32_under_fp32_training(tmp_path, sft_file):
    result = _run(_recipe(sft_file, max_steps=1, precision="fp32"), tmp_path)
    assert (
        json.loads((result.adapter_dir / ADAPTER_META).read_text())["training_run"]["frozen_weights"] is None
    )


def test_cpu_training_uses_eager_attention_and_puts_the_loaded_one_back(tmp_path, sft_file):
    model = make_tiny_model("llama")
    model.set_attn_implementation("sdpa")
    seen = []
    model.model.layers[0].self_attn.register_forward_hook(
        lambda m, a, out: seen.append((m.training, m.config._attn_implementation))
    )
    result = train_from_recipe(
        _recipe(sft_file, max_steps=2), output_dir=tmp_path / "a", model=model, tokenizer=char_tokenizer()
    )
    assert {impl for training, impl in seen if training} == {"eager"}
    assert {impl for training, impl in seen if not training} == {"sdpa"}  # evaluation before and after
    assert model.config._attn_implementation == "sdpa"
    assert json.loads((result.adapter_dir / ADAPTER_META).read_text())["training_run"]["attention"] == "eager"
    model = make_tiny_model("llama")
    model.set_attn_implementation("sdpa")
    kept = train_from_recipe(
        _recipe(sft_file, max_steps=1, attention="model"),
        output_dir=tmp_path / "b",
        model=model,
        tokenizer=char_tokenizer(),
    )
    assert json.loads((kept.adapter_dir / ADAPTER_META).read_text())["training_run"]["attention"] == "sdpa"
    model = make_tiny_model("llama")
    model.set_attn_implementation("sdpa")
    long = train_from_recipe(  # auto keeps SDPA past EAGER_MAX_LENGTH, where eager stops paying
        _recipe(sft_file, max_steps=1, max_length=EAGER_MAX_LENGTH + 1),
        output_dir=tmp_path / "c",
        model=model,
        tokenizer=char_tokenizer(),
    )
    assert json.loads((long.adapter_dir / ADAPTER_META).read_text())["training_run"]["attention"] == "sdpa"


# quiet output ------------------------------------------------------------------------------------
def test_training_is_quiet_by_default_and_progress_is_one_bar(tmp_path, sft_file, capfd):
    _run(_recipe(sft_file, logging_steps=1), tmp_path)
    out, err = capfd.readouterr()
    assert "'loss'" not in out + err and "Tokenizing" not in err and "Map" not in err, (out, err)
    _run({**_recipe(sft_file, logging_steps=1), "name": "bar"}, tmp_path, progress=True)
    out, err = capfd.readouterr()
    assert "'loss'" not in out and "Tokenizing" not in err
    assert "train bar" in err and err.count("4/4") >= 1 and "train tiny" not in err


def test_verbose_training_shows_the_trainer_logs(tmp_path, sft_file, capfd):
    _run(_recipe(sft_file, logging_steps=1), tmp_path, verbose=True)
    out, err = capfd.readouterr()
    assert "'loss'" in out + err


def test_dpo_with_precomputed_reference_logps_trains_as_with_the_reference_forward(tmp_path):
    """Rows carrying TRL's own precomputed reference log-probs (vsteer.train.reference_logps)
    train to the same adapter as TRL's in-loop reference forward; wrong values change the run,
    so the columns are really read."""
    from safetensors.torch import load_file

    from vsteer.train import reference_logps

    rows = [
        {"prompt": f"q{i}? ", "chosen": " yes, gladly" if i % 2 else "(A)", "rejected": "(B) no"}
        for i in range(24)
    ]
    plain = _write_jsonl(tmp_path / "plain.jsonl", rows)

    def recipe(path, name):
        r = _recipe(path, max_steps=5, learning_rate=5e-2, eval_before=False)
        r.update(method="dpo", name=name, data={"train": str(path), "eval_size": 0})
        return r

    refs = reference_logps(recipe(plain, "r"), make_tiny_model("llama"), char_tokenizer())
    assert len(refs) == len(rows) and all(v["ref_chosen_logps"] < 0 for v in refs)
    given = _write_jsonl(tmp_path / "given.jsonl", [{**r, **v} for r, v in zip(rows, refs)])
    wrong = _write_jsonl(
        tmp_path / "wrong.jsonl", [{**r, "ref_chosen_logps": 0.0, "ref_rejected_logps": -50.0} for r in rows]
    )
    out = {}
    for path, name in ((plain, "plain"), (given, "given"), (wrong, "wrong")):
        res = _run(recipe(path, name), tmp_path)
        out[name] = (res.metrics["train_loss"], load_file(res.adapter_dir / "adapter_model.safetensors"))
    assert out["given"][0] == pytest.approx(out["plain"][0], abs=1e-4)
    for key, tensor in out["plain"][1].items():
        torch.testing.assert_close(out["given"][1][key], tensor, rtol=1e-3, atol=1e-5)
    assert abs(out["wrong"][0] - out["plain"][0]) > 1e-2
    with pytest.raises(RecipeError, match="precompute_ref_log_probs"):
        _run(
            {
                **recipe(given, "both"),
                "training": {**recipe(given, "both")["training"], "precompute_ref_log_probs": True},
            },
            tmp_path,
        )
