"""Role-named LoRA adapters: targets, fused V-slice masking, exact counts, equal budgets."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, FUSED_FAMILIES, make_tiny_model, random_ids

import vsteer
from vsteer.errors import RecipeError, VsteerError
from vsteer.lora import (
    add_adapter,
    budget_ranks,
    check_masked_rows,
    count_parameters,
    parse_targets,
    plan_adapter,
    resolve_targets,
    watch_optimizer,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is ~10x faster than two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(peft_model, steps: int = 4, weight_decay: float = 0.1, lr: float = 1e-2):
    """A plain PyTorch loop (no Trainer): AdamW with decoupled weight decay."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    watch_optimizer(peft_model, opt)
    peft_model.train()
    for step in range(steps):
        ids = random_ids(seed=step)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model.eval()


@pytest.mark.parametrize(
    "spec, roles",
    [("v", ("v",)), ("vo", ("v", "o")), ("qkvo", ("q", "k", "v", "o")), (["v", "mlp"], ("v", "mlp"))],
)
def test_targets_parse_to_roles(spec, roles):
    assert parse_targets(spec) == roles


@pytest.mark.parametrize("bad", ["x", "vv", "", [], ["v", 3]])
def test_unknown_target_is_a_recipe_error(bad):
    with pytest.raises(RecipeError):
        parse_targets(bad)


def test_v_target_on_separate_projections_is_v_proj_of_every_layer():
    model = make_tiny_model("llama")
    mods = resolve_targets(model, "v")
    assert [m.name for m in mods] == [f"model.layers.{i}.self_attn.v_proj" for i in range(3)]
    assert all(not m.masked for m in mods)


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_v_target_on_fused_projection_keeps_only_v_rows(family):
    model = make_tiny_model(family)
    arch = vsteer.get_arch(model)
    (mod, *_) = resolve_targets(model, "v", layers=[0])
    assert mod.name == arch.module_path(0, "v")
    assert torch.equal(mod.keep_rows, torch.sort(arch.rows("v")).values)
    assert mod.out_features == arch.fused_width()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", ["v", "qk", "o", "qkvo", "mlp"])
def test_planned_counts_equal_counts_measured_on_the_model(family, targets):
    peft_model = add_adapter(make_tiny_model(family), targets, r=4)
    plan = peft_model.vsteer_plan
    assert count_parameters(peft_model) == {"trainable": plan.trainable, "effective": plan.effective}


def test_lora_params_per_module_are_rank_times_in_plus_out():
    model = make_tiny_model("llama")  # v_proj: 32 -> 2 kv heads * 8
    plan = plan_adapter(model, "v", r=4)
    assert plan.trainable == plan.effective == 3 * 4 * (32 + 16)


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_masked_fused_rows_count_as_trainable_not_effective(family):
    model = make_tiny_model(family)
    arch = vsteer.get_arch(model)
    plan = plan_adapter(model, "v", r=2)
    n_v = arch.n_kv_heads * arch.head_dim
    assert plan.trainable == 3 * 2 * (arch.d_model + arch.fused_width())
    assert plan.effective == 3 * 2 * (arch.d_model + n_v)


@pytest.mark.parametrize("arm", ["o", "qk", "qkvo", "mlp"])
def test_match_v_gives_equal_effective_budget_within_two_percent(arm):
    model = make_tiny_model("llama")
    v = plan_adapter(model, "v", r=8)
    other = plan_adapter(model, arm, r=8, match="v")
    assert abs(other.effective - v.effective) <= 0.02 * v.effective


def test_budget_ranks_spread_extra_ranks_over_layers():
    model = make_tiny_model("llama")
    mods = resolve_targets(model, "o")  # 32 -> 32: 64 params per rank
    ranks = budget_ranks(mods, 64 * 7)
    assert sorted(ranks.values()) == [2, 2, 3]


def test_impossible_budget_is_an_error_with_the_closest_count():
    mods = resolve_targets(make_tiny_model("llama"), "o")
    with pytest.raises(VsteerError, match="closest"):
        budget_ranks(mods, 64 * 3 + 32)


def test_budget_and_match_together_are_rejected():
    with pytest.raises(RecipeError, match="either"):
        plan_adapter(make_tiny_model("llama"), "o", budget=100, match="v")


def test_uneven_ranks_keep_alpha_over_rank_constant():
    peft_model = add_adapter(make_tiny_model("llama"), "o", budget=64 * 7, lora_alpha_per_rank=2.0)
    for name in peft_model.vsteer_plan.ranks:
        layer = peft_model.get_base_model().get_submodule(name)
        assert layer.scaling["default"] == pytest.approx(2.0)


def _base_and_adapted(peft_model, ids):
    """Per layer: (q, k, v) of the adapted model, and of the base projection on the same input."""
    arch = vsteer.get_arch(peft_model)
    inputs, handles = {}, []
    for layer in range(arch.n_layers):
        module = arch.projection(layer, "v")
        handles.append(module.register_forward_pre_hook(lambda m, a, i=layer: inputs.__setitem__(i, a[0])))
    try:
        with (
            torch.no_grad(),
            vsteer.capture(peft_model, [(r, i) for r in "qkv" for i in range(arch.n_layers)]) as acts,
        ):
            peft_model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    out = []
    for layer in range(arch.n_layers):
        with torch.no_grad():
            base = arch.projection(layer, "v").base_layer(inputs[layer])
        for role in "qkv":
            by_base = base[..., arch.rows(role)].unflatten(-1, acts[role, layer].shape[-2:])
            out.append((layer, role, acts[role, layer], by_base))
    return out


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_training_v_slice_leaves_q_and_k_exactly_unchanged(family):
    """After real optimizer steps, every layer's Q and K rows equal the base projection's bit for bit."""
    peft_model = _train(add_adapter(make_tiny_model(family), "v", r=4))
    for layer, role, adapted, base in _base_and_adapted(peft_model, random_ids()):
        if role == "v":
            assert not torch.allclose(adapted, base), layer
        else:
            assert torch.equal(adapted, base), (layer, role)


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_training_qk_slice_leaves_v_exactly_unchanged(family):
    peft_model = _train(add_adapter(make_tiny_model(family), "qk", r=4))
    for layer, role, adapted, base in _base_and_adapted(peft_model, random_ids()):
        if role == "v":
            assert torch.equal(adapted, base), layer
        else:
            assert not torch.allclose(adapted, base), (layer, role)


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_masked_lora_b_rows_stay_exactly_zero_under_adamw_weight_decay(family):
    peft_model = _train(add_adapter(make_tiny_model(family), "qk", r=4), weight_decay=0.5)
    arch = vsteer.get_arch(peft_model)
    for name in peft_model.vsteer_plan.ranks:
        b = peft_model.get_base_model().get_submodule(name).lora_B["default"].weight
        assert torch.count_nonzero(b[arch.rows("v")]) == 0
        assert torch.count_nonzero(b[arch.rows("q")]) > 0
    assert check_masked_rows(peft_model) == 3


def test_gpt2_conv1d_delta_is_nonzero_only_on_v_output_features():
    peft_model = _train(add_adapter(make_tiny_model("gpt2"), "v", r=4))
    arch = vsteer.get_arch(peft_model)
    layer = peft_model.get_base_model().get_submodule(arch.module_path(0, "v"))
    delta = layer.get_delta_weight("default")  # Conv1D storage: [in, out]
    assert delta.shape == (arch.d_model, arch.fused_width())
    touched = delta.abs().sum(0).nonzero().flatten()
    assert set(touched.tolist()) <= set(arch.rows("v").tolist())
    assert len(touched) > 0


def test_check_after_step_catches_rows_changed_outside_the_gradient_path():
    peft_model = add_adapter(make_tiny_model("phi3"), "v", r=2)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    watch_optimizer(peft_model, opt)
    name = next(iter(peft_model.vsteer_plan.ranks))
    with torch.no_grad():
        peft_model.get_base_model().get_submodule(name).lora_B["default"].weight[0] = 1.0  # a q row
    with pytest.raises(VsteerError, match="masked rows"):
        opt.step()


def test_saved_adapter_loads_with_plain_peft(tmp_path):
    from peft import PeftModel

    peft_model = _train(add_adapter(make_tiny_model("gpt2"), "v", r=4))
    ids = random_ids()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_model("gpt2"), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-6)


_PLAIN_PEFT = """
import sys, torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ref = load_file(sys.argv[3])
with torch.no_grad():
    logits = model(input_ids=ref["ids"]).logits
assert "vsteer" not in sys.modules
print(float((logits - ref["logits"]).abs().max()))
"""


@pytest.mark.parametrize("family", FUSED_FAMILIES + ("llama",))
def test_plain_peft_without_vsteer_reproduces_the_logits(tmp_path, family):
    import subprocess
    import sys

    from safetensors.torch import save_file

    base = make_tiny_model(family)
    base.save_pretrained(tmp_path / "base")
    peft_model = _train(add_adapter(base, "v", r=4))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = random_ids()
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    save_file({"ids": ids, "logits": logits.contiguous()}, tmp_path / "ref.safetensors")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _PLAIN_PEFT,
            str(tmp_path / "base"),
            str(tmp_path / "adapter"),
            str(tmp_path / "ref.safetensors"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


def test_add_adapter_refuses_a_model_that_already_has_one():
    peft_model = add_adapter(make_tiny_model("llama"), "v", r=2)
    with pytest.raises(VsteerError, match="already"):
        add_adapter(peft_model, "o", r=2)


# the TRL route ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_lora_config_refuses_a_fused_slice_naming_the_route_that_works(family):
    """A bare LoraConfig handed to SFTTrainer(peft_config=...) would train the Q and K rows too."""
    with pytest.raises(
        VsteerError, match=r"add_adapter.*SFTTrainer\(model=\.\.\.\).*train_from_recipe"
    ) as err:
        vsteer.lora_config(make_tiny_model(family), "v", r=4)
    assert "\n" not in str(err.value)


def test_lora_config_is_a_plain_config_where_no_rows_need_masking():
    from peft import LoraConfig

    assert isinstance(vsteer.lora_config(make_tiny_model("llama"), "v", r=4), LoraConfig)
    whole = vsteer.lora_config(make_tiny_model("gpt2"), "qkv", r=4)  # all of c_attn: nothing to mask
    assert whole.target_modules == {f"transformer.h.{i}.attn.c_attn" for i in range(3)}


def test_sft_trainer_on_the_add_adapter_model_keeps_q_and_k_rows_exactly_zero(tmp_path):
    """The route the refusal names: SFTTrainer(model=vsteer.add_adapter(...)), real TRL steps."""
    from datasets import Dataset
    from test_train import char_tokenizer
    from trl import SFTConfig, SFTTrainer

    peft_model = add_adapter(make_tiny_model("gpt2"), "v", r=4)
    rows = [{"prompt": f"review {i}:", "completion": " great fun, loved it!"} for i in range(16)]
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        weight_decay=0.5, max_length=32, report_to="none", save_strategy="no", use_cpu=True,
        disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    trainer = SFTTrainer(
        model=peft_model, args=args, train_dataset=Dataset.from_list(rows), processing_class=char_tokenizer()
    )
    trainer.train()
    v_rows = vsteer.get_arch(peft_model).rows("v")
    for name in peft_model.vsteer_plan.ranks:
        b = peft_model.get_base_model().get_submodule(name).lora_B["default"].weight.detach()
        keep = torch.zeros(b.shape[0], dtype=torch.bool)
        keep[v_rows] = True
        assert torch.count_nonzero(b[~keep]) == 0 and torch.count_nonzero(b[keep]) > 0, name
