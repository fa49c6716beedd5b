"""Trainable interventions at a site: identity at init, per-row use, positions under the KV cache,
files with checked metadata, exact merging into W_V, and training through vsteer.train."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_model, random_ids

from vsteer.errors import RecipeError
from vsteer.hooks import hook_count
from vsteer.interventions import (
    Intervention,
    InterventionError,
    apply_intervention,
    merge,
    parameter_count,
    rank_for_budget,
)
from vsteer.recipes import load_recipe

KINDS = ("loreft", "bias", "dynamic")


def _trained(model, kind="loreft", site="v", rank=3, positions="all", seed=0, size=0.3):
    """An intervention with random (non-identity) parameters."""
    iv = Intervention.for_model(model, kind, site, rank=rank, positions=positions, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in iv.parameters():
            p.add_(torch.randn(p.shape, generator=g) * size)
    return iv


# --- the modules -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("site", ["v", "resid", "z"])
def test_untrained_intervention_leaves_logits_bit_identical(kind, site):
    model, ids = make_tiny_model("llama"), random_ids()
    base = model(ids).logits
    before = hook_count(model)
    with apply_intervention(model, Intervention.for_model(model, kind, site, rank=2)):
        out = model(ids).logits
    assert torch.equal(out, base) and hook_count(model) == before


@pytest.mark.parametrize("kind", KINDS)
def test_trained_intervention_changes_logits(kind):
    model, ids = make_tiny_model("llama"), random_ids()
    with apply_intervention(model, _trained(model, kind)):
        out = model(ids).logits
    assert (out - model(ids).logits).abs().max() > 1e-3


def test_loreft_rotation_keeps_orthonormal_rows_after_an_update():
    iv = Intervention.for_model(make_tiny_model("llama"), "loreft", "v", rank=3)
    edit = iv.edits["0"]
    with torch.no_grad():
        edit.rotate.parametrizations.weight.original.add_(0.5)
    r = edit.rotate.weight
    assert r.shape == (3, 16) and torch.allclose(r @ r.t(), torch.eye(3), atol=1e-5)


def test_weight_decay_on_the_rotation_parameter_does_not_collapse_it():
    """torch's Householder map casts its diagonal to int signs: decay from 1.0 to 0.99 zeroed a row."""
    edit = Intervention.for_model(make_tiny_model("llama"), "loreft", "v", rank=3).edits["0"]
    before = edit.rotate.weight.detach().clone()
    with torch.no_grad():
        edit.rotate.parametrizations.weight.original.mul_(0.99)
    torch.testing.assert_close(edit.rotate.weight, before)


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_count_is_the_documented_formula(kind):
    model = make_tiny_model("llama")  # v: 2 kv heads x 8 = 16 wide, input d_model 32, 3 layers
    iv = Intervention.for_model(model, kind, "v", rank=4)
    assert iv.num_parameters() == 3 * parameter_count(kind, 16, 4, 32)
    assert {"loreft": 2 * 4 * 16 + 4, "bias": 16, "dynamic": 4 * 32 + 4 + 16 * 4 + 32 + 1}[kind] == (
        parameter_count(kind, 16, 4, 32)
    )


def test_rank_for_budget_is_the_largest_rank_within_it():
    rank = rank_for_budget("loreft", 16, 3, budget=3 * parameter_count("loreft", 16, 5))
    assert rank == 5
    assert rank_for_budget("loreft", 16, 3, budget=3 * parameter_count("loreft", 16, 5) - 1) == 4


def test_rank_above_site_width_is_one_error_line():
    model = make_tiny_model("llama")
    with pytest.raises(InterventionError, match=r"rank 17 is above the width of site 'v' \(16") as err:
        Intervention.for_model(model, "loreft", "v", rank=17)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "lora"}, "unknown intervention kind"),
        ({"site": "k"}, "interventions act at sites"),
        ({"positions": "last:0"}, "positions 'last:0'"),
        ({"rank": 0}, "rank must be a positive int"),
    ],
)
def test_bad_construction_is_one_error(kwargs, match):
    with pytest.raises(InterventionError, match=match):
        Intervention.for_model(make_tiny_model("llama"), **kwargs)


# --- applying: rows, padding, positions, cache -------------------------------------------------
def test_per_row_interventions_edit_only_their_rows():
    model, ids = make_tiny_model("llama"), random_ids(batch=3)
    a, b = _trained(model, seed=0), _trained(model, "dynamic", seed=1)
    with apply_intervention(model, [a, None, b]):
        mixed = model(ids).logits
    with apply_intervention(model, a):
        only_a = model(ids).logits
    with apply_intervention(model, b):
        only_b = model(ids).logits
    base = model(ids).logits
    torch.testing.assert_close(mixed[0], only_a[0])
    torch.testing.assert_close(mixed[1], base[1])
    torch.testing.assert_close(mixed[2], only_b[2])


def test_per_row_list_of_the_wrong_length_is_one_error():
    model = make_tiny_model("llama")
    with pytest.raises(InterventionError, match="2 rows given but the batch has 3"):
        with apply_intervention(model, [_trained(model), None]):
            model(random_ids(batch=3))


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_row_generates_as_it_does_alone_under_the_kv_cache(kind):
    model = make_tiny_model("llama")
    iv = _trained(model, kind)
    ids = random_ids(batch=2, seq=6)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # row 1 left-padded by two
    kw = dict(
        max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0
    )
    with apply_intervention(model, iv):
        both = model.generate(input_ids=ids, attention_mask=mask, **kw)
        alone = model.generate(input_ids=ids[1:, 2:], attention_mask=mask[1:, 2:], **kw)
    for s_both, s_alone in zip(both.scores, alone.scores):
        torch.testing.assert_close(s_both[1], s_alone[0], atol=1e-5, rtol=1e-4)


def test_cached_generation_matches_a_full_forward_with_the_edit_everywhere():
    model, ids = make_tiny_model("llama"), random_ids(batch=1, seq=5)
    iv = _trained(model, "loreft")
    with apply_intervention(model, iv):
        gen = model.generate(
            input_ids=ids, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        full = model(gen.sequences).logits
    for i, score in enumerate(gen.scores):
        torch.testing.assert_close(score[0], full[0, ids.shape[1] - 1 + i], atol=1e-5, rtol=1e-4)


def test_generated_positions_leave_the_prompt_and_first_prediction_alone():
    model, ids = make_tiny_model("llama"), random_ids(batch=1, seq=5)
    kw = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    base = model.generate(input_ids=ids, **kw)
    with apply_intervention(model, _trained(model, "bias", positions="generated", size=1.0)):
        gen = model.generate(input_ids=ids, **kw)
    assert torch.equal(gen.scores[0], base.scores[0])  # predicted from the prompt pass
    assert not torch.allclose(gen.scores[2], base.scores[2])


def test_last_k_positions_edit_only_the_last_prompt_tokens():
    model, ids = make_tiny_model("llama"), random_ids(batch=1, seq=6)
    base = model(ids).logits
    with apply_intervention(model, _trained(model, "bias", positions="last:2", size=1.0)):
        out = model(ids).logits
    torch.testing.assert_close(out[0, :4], base[0, :4])  # causal: nothing before the edited tokens moves
    assert not torch.allclose(out[0, 4:], base[0, 4:])


def test_gradients_reach_only_the_intervention():
    model, ids = make_tiny_model("llama"), random_ids()
    model.requires_grad_(False)
    iv = Intervention.for_model(model, "loreft", "v", rank=2)
    with apply_intervention(model, iv):
        model(ids).logits.square().mean().backward()
    assert all(p.grad is not None for p in iv.parameters() if p.requires_grad)


# --- files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_round_trip_gives_the_same_logits(kind, tmp_path):
    model, ids = make_tiny_model("llama"), random_ids()
    iv = _trained(model, kind, positions="last:3")
    path = iv.save(tmp_path / "iv.safetensors")
    loaded = Intervention.load(path, model, site="v")
    assert (loaded.kind, loaded.site, loaded.layers, loaded.rank, loaded.positions) == (
        kind,
        "v",
        [0, 1, 2],
        iv.rank,
        "last:3",
    )
    with apply_intervention(model, iv):
        want = model(ids).logits
    with apply_intervention(model, loaded):
        got = model(ids).logits
    assert torch.equal(want, got)
    assert [p.name for p in tmp_path.iterdir()] == ["iv.safetensors"]  # no temporary file left


def test_file_metadata_records_model_site_layers_positions_kind_rank(tmp_path):
    from safetensors import safe_open

    from vsteer.models import config_fingerprint

    model = make_tiny_model("llama")
    path = _trained(model).save(tmp_path / "iv.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["vsteer"])
    assert meta["fingerprint"] == config_fingerprint(model.config)
    assert {k: meta[k] for k in ("site", "layers", "positions", "kind", "rank")} == {
        "site": "v",
        "layers": [0, 1, 2],
        "positions": "all",
        "kind": "loreft",
        "rank": 3,
    }


def test_loading_against_another_model_is_one_error_line(tmp_path):
    path = _trained(make_tiny_model("llama")).save(tmp_path / "iv.safetensors")
    with pytest.raises(InterventionError, match="was made for model") as err:
        Intervention.load(path, make_tiny_model("qwen2"))
    assert "\n" not in str(err.value)


def test_loading_for_another_site_is_one_error_line(tmp_path):
    model = make_tiny_model("llama")
    path = _trained(model, site="resid").save(tmp_path / "iv.safetensors")
    with pytest.raises(InterventionError, match="acts at site 'resid'; expected site 'v'"):
        Intervention.load(path, model, site="v")


def test_rank_above_this_models_site_width_is_refused_on_load(tmp_path):
    iv = Intervention.for_model(make_tiny_model("llama"), "loreft", "v", rank=12)  # v: 2 kv heads x 8
    iv.fingerprint = None  # of unknown origin: only the shapes can be checked
    path = iv.save(tmp_path / "iv.safetensors")
    narrow = make_tiny_model("gemma3")  # v: 1 kv head x 8
    with pytest.raises(InterventionError, match=r"rank 12 is above the width of this model's site 'v' \(8\)"):
        Intervention.load(path, narrow)


def test_a_steering_vector_file_is_not_an_intervention(tmp_path):
    from vsteer.vectors import SteeringVector

    path = SteeringVector({0: torch.ones(4)}, site="resid").save(tmp_path / "vec.safetensors")
    with pytest.raises(InterventionError, match="expected 'vsteer.intervention/1'"):
        Intervention.load(path)


# --- merging ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("kind", ["loreft", "bias"])
def test_merged_weights_give_the_logits_of_the_applied_intervention(family, kind):
    """llama/gemma3: GQA, no v bias; qwen2: v bias; phi3: fused QKV with GQA, no bias; gpt2: fused
    Conv1D; gpt_neox: fused per-head interleaved QKV."""
    model, ids = make_tiny_model(family), random_ids()
    iv = _trained(model, kind)
    with apply_intervention(model, iv):
        want = model(ids).logits
    merged = merge(copy.deepcopy(model), iv)
    got = merged(ids).logits
    assert (want - model(ids).logits).abs().max() > 1e-3  # the edit matters
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "dynamic"}, "a dynamic intervention cannot be merged"),
        ({"positions": "prompt"}, "positions 'prompt' cannot be merged"),
        ({"site": "resid"}, "merge folds v-site interventions"),
    ],
)
def test_unmergeable_interventions_are_refused_with_one_line(kwargs, match):
    model = make_tiny_model("llama")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InterventionError, match=match) as err:
        merge(model, _trained(model, **kwargs))
    assert "\n" not in str(err.value)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # nothing changed


# --- training -------------------------------------------------------------------------------------
def _sft_recipe(data_file, **adapter):
    return {
        "name": "tiny-iv",
        "method": "sft",
        "data": {"train": str(data_file), "eval_size": 8},
        "adapter": {"kind": "intervention", "intervention": "loreft", "site": "v", "rank": 4, **adapter},
        "training": {"max_steps": 10, "batch_size": 4, "learning_rate": 3e-2, "max_length": 32},
    }


@pytest.fixture
def sft_file(tmp_path):
    rows = [{"prompt": f"review {i}:", "completion": " great fun, loved it!"} for i in range(40)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_sft_trains_only_the_intervention_and_the_planted_loss_falls(kind, sft_file, tmp_path):
    from test_train import char_tokenizer

    from vsteer.train import evaluate_sft_loss, train_from_recipe

    model, tok = make_tiny_model("llama"), char_tokenizer()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = _sft_recipe(sft_file, intervention=kind)
    result = train_from_recipe(recipe, output_dir=tmp_path / "out", model=model, tokenizer=tok)
    m = result.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.05
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # base untouched
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == ["intervention.safetensors", "vsteer.json"]
    iv = Intervention.load(result.adapter_dir, model, site="v")
    assert result.adapter["trainable_params_measured"] == iv.num_parameters()
    with apply_intervention(model, iv):  # the file holds the trained parameters
        again = evaluate_sft_loss(model, tok, recipe)
    assert again == pytest.approx(m["eval_loss_after"], abs=1e-4)


def test_dpo_trains_an_intervention_toward_the_chosen_answers(tmp_path):
    from test_train import char_tokenizer

    from vsteer.train import train_from_recipe

    rows = [{"prompt": f"q{i}? ", "chosen": "(A)", "rejected": "(B)"} for i in range(40)]
    data = tmp_path / "dpo.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {**_sft_recipe(data), "method": "dpo"}
    result = train_from_recipe(
        recipe, output_dir=tmp_path / "out", model=make_tiny_model("llama"), tokenizer=char_tokenizer()
    )
    assert result.metrics["preference_margin_after"] > result.metrics["preference_margin_before"] + 0.1


def test_dpo_intervention_trains_from_rows_that_carry_reference_logps(tmp_path):
    """vsteer compare passes the base's reference log-probs on the rows (computed once for its LoRA
    runs): an intervention trained from such rows equals one trained from the plain rows."""
    from test_train import char_tokenizer

    from vsteer.train import reference_logps, train_from_recipe

    rows = [{"prompt": f"q{i}? ", "chosen": "(A)", "rejected": "(B)"} for i in range(40)]
    plain, given = tmp_path / "dpo.jsonl", tmp_path / "dpo-refs.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = char_tokenizer()
    every_row = {**_sft_recipe(plain), "method": "dpo"}
    every_row["data"] = {**every_row["data"], "eval_size": 0}  # every row a training row, in order
    refs = reference_logps(every_row, make_tiny_model("llama"), tok)
    assert len(refs) == len(rows)
    with_refs = [{**r, **ref} for r, ref in zip(rows, refs)]
    given.write_text("".join(json.dumps(r) + "\n" for r in with_refs))
    trained = []
    for data in (plain, given):
        recipe = {**_sft_recipe(data), "method": "dpo"}
        model = make_tiny_model("llama")
        result = train_from_recipe(recipe, output_dir=tmp_path / data.stem, model=model, tokenizer=tok)
        trained.append(Intervention.load(result.adapter_dir, model, site="v").state_dict())
    assert trained[0].keys() == trained[1].keys()
    for k in trained[0]:
        torch.testing.assert_close(trained[1][k], trained[0][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "adapter, key",
    [
        ({"intervention": "lora"}, "adapter.intervention"),
        ({"site": "k"}, "adapter.site"),
        ({"positions": "prompt"}, "adapter.positions"),
        ({"match": "v"}, "adapter.match"),
        ({"kind": "reft"}, "adapter.kind"),
    ],
)
def test_bad_intervention_recipe_keys_fail_before_any_model_loads(sft_file, adapter, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe(_sft_recipe(sft_file, **adapter))


@pytest.mark.slow
def test_value_site_loreft_lowers_held_out_loss_on_the_embedded_model(tmp_path):
    from vsteer.models import load_model
    from vsteer.train import train_from_recipe

    model, tok = load_model("smollm2-135m-instruct")
    overrides = [
        "adapter.kind=intervention",
        "adapter.intervention=loreft",
        "adapter.rank=4",
        "training.max_steps=6",
        "training.batch_size=4",
        "training.max_length=48",
        "training.learning_rate=1e-2",
        "data.n_eval=16",
    ]
    result = train_from_recipe("value_only_sft", overrides, output_dir=tmp_path, model=model, tokenizer=tok)
    m = result.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.01, m
    iv = Intervention.load(result.adapter_dir, model, site="v")
    assert iv.layers == list(range(30)) and iv.width == 3 * 64
    assert iv.num_parameters() == 30 * (2 * 4 * 192 + 4) == result.adapter["trainable_params_measured"]


# --- as arms of a comparison -------------------------------------------------------------------------
def test_value_site_intervention_arms_run_in_a_comparison_at_the_budget(tmp_path):
    from test_train import char_tokenizer

    from vsteer.cli import main

    model_dir = tmp_path / "model"
    make_tiny_model("llama").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"great fun, loved it {i}!"}) + "\n" for i in range(24)))
    ev = [{"text": f"loved it, great {i}", "label": 1} for i in range(10)]
    ev += [{"text": f"awful, hated it {i}", "label": 0} for i in range(10)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ev))
    recipe = {
        "name": "tiny",
        "model": str(model_dir),
        "task": "sft",
        "data": {"source": "user", "train": str(train), "eval": str(tmp_path / "eval.jsonl")},
        "arms": ["v", "v-reft", "v-bias"],
        "learning_rates": [1e-3, 3e-2],
        "steps": 3,
        "batch_size": 4,
        "max_length": 32,
        "seeds": [0, 1],
        "checkpoints": [2],
        "metrics": [],
        "precision": "fp32",
        "workers": 1,
        "n_kl_windows": 2,
        "kl_window": 16,
    }
    import yaml

    (tmp_path / "cmp.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "cmp.yaml"), "--output", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["chosen_lr"]) == {"v", "v-reft", "v-bias"}
    params = {r["arm"]: r["params"] for r in results["arms"] if r["arm"] != "base"}
    budget = results["budget"]  # v LoRA at rank 8 on 3 layers
    # the largest LoReFT rank within it: never above, below by less than one rank step (3 x (2 x 16 + 1))
    assert budget - 3 * 33 < params["v-reft"] <= budget
    assert params["v-bias"] == 3 * 16  # fixed size: width x layers
    frontier = {r["arm"]: r for r in results["frontier"]}
    assert frontier["v-reft"]["kl"] > 0  # the snapshot at step 2 is scored, not the untrained base


@pytest.mark.parametrize("kind, budget", [("loreft", 50), ("dynamic", 50), ("bias", 10)])
def test_a_budget_below_the_smallest_intervention_is_one_line(kind, budget, sft_file, tmp_path):
    """Found in review: rank 1 (or the bias's fixed size) was trained above adapter.budget silently."""
    from test_train import char_tokenizer

    from vsteer.errors import RecipeError
    from vsteer.train import train_from_recipe

    recipe = _sft_recipe(sft_file, intervention=kind, budget=budget)
    with pytest.raises(RecipeError, match=f"adapter.budget {budget} is below") as err:
        train_from_recipe(
            recipe, output_dir=tmp_path / "out", model=make_tiny_model("llama"), tokenizer=char_tokenizer()
        )
    assert "\n" not in str(err.value) and not (tmp_path / "out" / "tiny-iv").exists()


def test_cli_train_of_an_intervention_prints_its_summary(sft_file, tmp_path, monkeypatch, capsys):
    """Found in review: the CLI's summary read LoRA-only keys (KeyError after the adapter was written)."""
    import yaml
    from test_train import char_tokenizer

    import vsteer.train
    from vsteer.cli import main

    real = vsteer.train.train_from_recipe
    monkeypatch.setattr(
        vsteer.train,
        "train_from_recipe",
        lambda recipe, *a, **kw: real(
            recipe, *a, model=make_tiny_model("llama"), tokenizer=char_tokenizer(), **kw
        ),
    )
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {**_sft_recipe(sft_file), "training": {"max_steps": 1, "batch_size": 4, "max_length": 32}}
        )
    )
    assert main(["train", str(path), "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "loreft intervention at v, rank 4" in out and "trainable" in out
