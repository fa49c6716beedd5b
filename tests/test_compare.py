"""``vsteer compare``: equal-budget arms, lr chosen on val only, statistics, ablation, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from test_train import char_tokenizer

from vsteer.compare import load_compare_recipe, plan_budgets, run_compare, select_lr
from vsteer.compare_eval import ablate
from vsteer.compare_stats import projection_ablation, shift_effect
from vsteer.data.compare_data import Item
from vsteer.errors import DataError, RecipeError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny llama and a character tokenizer saved as a model directory (what a user passes)."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def user_files(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"text": f"great fun, loved it {i}!"} for i in range(24)])
    ev = [{"text": f"loved it, great {i}", "label": 1} for i in range(10)]
    ev += [{"text": f"awful, hated it {i}", "label": 0} for i in range(10)]
    return train, _jsonl(tmp_path / "eval.jsonl", ev)


def _recipe(tiny_dir, train, ev, **kw):
    r = {
        "name": "tiny",
        "model": str(tiny_dir),
        "task": "sft",
        "data": {"source": "user", "train": str(train), "eval": str(ev)},
        "arms": ["v", "qk", "all"],
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
    r.update(kw)
    return r


def test_compare_cli_on_user_jsonl_writes_report_results_and_frontier(tiny_dir, user_files, tmp_path):
    import yaml

    from vsteer.cli import main

    recipe = tmp_path / "cmp.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_dir, *user_files)))
    out = tmp_path / "out"
    assert main(["compare", str(recipe), "--output", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["chosen_lr"]) == {"v", "qk", "all"}
    assert results["precision"] == "fp32"
    # every arm at one budget (within 2%), and the plans say so
    params = [r["params"] for r in results["arms"] if r["arm"] != "base"]
    assert max(params) <= 1.02 * results["budget"] and min(params) >= 0.98 * results["budget"]
    assert {r["arm"] for r in results["frontier"]} == {"v", "qk", "all"}
    assert {r["dropped"] for r in results["ablation"]} == {"q", "k", "v", "o", "mlp"}
    assert (out / "frontier.png").stat().st_size > 0
    assert "Learning-rate selection" in (out / "report.md").read_text()
    # every verdict is also judged under Holm over the comparison's verdicts, and says so
    assert results["verdicts"] and all(v["holm_verdict"] is not None for v in results["verdicts"])
    n = len(results["verdicts"])
    assert (out / "report.md").read_text().count(f"after Holm over the {n} verdicts") == n


def test_lr_selection_never_looks_at_the_test_split(tiny_dir, user_files, tmp_path, monkeypatch):
    """Scrambling the test split changes no chosen rate, and only chosen runs are ever scored on test."""
    import vsteer.compare as compare

    train, ev = user_files
    val = _jsonl(tmp_path / "val.jsonl", [json.loads(x) for x in ev.read_text().splitlines()[::2]])
    test_a = _jsonl(tmp_path / "test_a.jsonl", [json.loads(x) for x in ev.read_text().splitlines()[1::2]])
    flipped = [
        {**json.loads(x), "label": 1 - json.loads(x)["label"]} for x in test_a.read_text().splitlines()
    ]
    test_b = _jsonl(tmp_path / "test_b.jsonl", [{**r, "text": r["text"][::-1]} for r in flipped])
    scored = []
    real_scores = compare._scores

    def spy(model, ctx, split, index=None):
        scored.append((split, ctx["data"].source["test"]))
        return real_scores(model, ctx, split, index)

    monkeypatch.setattr(compare, "_scores", spy)
    chosen = []
    for test in (test_a, test_b):
        data = {"source": "user", "train": str(train), "val": str(val), "test": str(test)}
        res = run_compare(
            load_compare_recipe(_recipe(tiny_dir, train, ev, data=data, seeds=[0])), progress=False
        )
        chosen.append(res.chosen)
        # test scores exist for the chosen rate of each arm only
        assert {k for k in res.runs if k[0] == "eval"} == {("eval", a, 0) for a in res.spec.arms}
    assert chosen[0] == chosen[1]
    n_test = sum(1 for split, _ in scored if split == "test")
    # per comparison: the base once, each arm's chosen run once, the ablation (5 types) once
    assert n_test == 2 * (1 + 3 + 5)


def test_select_lr_takes_the_best_val_metric_and_the_smaller_rate_on_ties():
    assert select_lr({1e-3: 0.1, 3e-3: 0.3, 1e-2: 0.2}) == 3e-3
    assert select_lr({1e-3: 0.2, 1e-2: 0.2}) == 1e-3


def test_shift_effect_recovers_a_known_shift_and_resamples_pairs_whole():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 300 + [0] * 300)
    d = np.where(labels == 1, 0.1, 0.0) + rng.normal(0, 0.2, 600)
    e = shift_effect(d, labels)
    assert e.low < 0.1 < e.high and e.low > 0.05
    # a pair-level common shift cancels: paired resampling gives a much narrower interval
    common = rng.normal(0, 1.0, 300)
    dp = np.concatenate([common + 0.1, common]) + rng.normal(0, 0.01, 600)
    groups = list(range(300)) + list(range(300))
    paired, unpaired = shift_effect(dp, labels, groups), shift_effect(dp, labels)
    assert paired.high - paired.low < 0.2 * (unpaired.high - unpaired.low)
    assert paired.low < 0.1 < paired.high


def test_projection_ablation_gap_is_a_difference_of_removed_shifts_and_stays_bounded():
    """The verdict statistic: removed[v] - max other removed (nats/token), no division by the
    control's shift. With a control shift whose resamples straddle zero the share gap's interval
    blows up; the removal gap's stays within a few item standard errors."""
    rng = np.random.default_rng(1)
    labels = np.array([1] * 60 + [0] * 60)
    noise = lambda: rng.normal(0, 0.3, 120)  # noqa: E731
    full = np.where(labels == 1, 0.04, 0.0) + noise()  # a weak control shift: 0.04 +- 0.055
    ablated = {"v": full - np.where(labels == 1, 0.01, 0.0), "k": full - np.where(labels == 1, 0.03, 0.0)}
    ablated["k"] = ablated["k"] + rng.normal(0, 0.05, 120)
    out = projection_ablation(full, ablated, labels, n_boot=1000)
    r = out["removed"]
    shift = full[labels == 1].mean() - full[labels == 0].mean()
    for n, d in ablated.items():  # removed = shift(full) - shift(ablated), share = removed / shift(full)
        want = shift - (d[labels == 1].mean() - d[labels == 0].mean())
        assert r[n].value == pytest.approx(want)
        assert out["shares"][n].value == pytest.approx(want / shift)
    assert out["gap"].value == pytest.approx(r["v"].value - r["k"].value)
    assert out["gap"].value < 0  # dropping k removes more here: the claim's direction fails
    # same ordering as the share gap at the point (one positive denominator) ...
    assert np.sign(out["share_gap"].value) == np.sign(out["gap"].value)
    # ... but the share gap's interval is thrown far out by resamples near a zero shift
    assert out["share_gap"].high - out["share_gap"].low > 5 * (out["gap"].high - out["gap"].low)
    assert out["gap"].high - out["gap"].low < 0.1


def test_ablation_drops_one_projection_type_and_restores_it():
    from vsteer.lora import add_adapter

    model = add_adapter(make_tiny_model("gpt2"), "all", r=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_B" in n}
    from vsteer.arch import get_arch

    v_rows = get_arch(model.get_base_model()).rows("v")
    with ablate(model, "v") as n:
        assert n > 0
        for name, p in model.named_parameters():
            if "c_attn" in name and "lora_B" in name:
                assert p[v_rows].abs().sum() == 0  # V rows of the fused projection dropped
                keep = torch.ones(p.shape[0], dtype=torch.bool)
                keep[v_rows] = False
                assert torch.equal(p[keep], before[name][keep])  # Q and K rows kept
            elif "lora_B" in name:
                assert torch.equal(p, before[name])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert torch.equal(p, before[name])


# ---- bad input: one clear line, nothing written ----------------------------------------------


def test_an_arm_the_architecture_lacks_is_one_clear_error(tiny_dir, user_files):
    model = make_tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp = torch.nn.Identity()
    spec = load_compare_recipe(_recipe(tiny_dir, *user_files))
    with pytest.raises(RecipeError, match="arm 'all' does not exist on this model"):
        plan_budgets(model, spec)


def test_a_budget_no_arm_can_meet_is_one_clear_error(tiny_dir, user_files):
    spec = load_compare_recipe(_recipe(tiny_dir, *user_files, budget=10))
    with pytest.raises(RecipeError, match="budget 10 is below what arm"):
        plan_budgets(make_tiny_model("llama"), spec)


def test_a_metric_without_data_is_one_clear_error(tiny_dir, user_files):
    train, _ = user_files
    with pytest.raises(DataError, match="a metric without data"):
        load_compare_recipe(_recipe(tiny_dir, train, None, data={"source": "user", "train": str(train)}))
    with pytest.raises(RecipeError, match="metric 'vader'.*needs task: sft"):
        load_compare_recipe(_recipe(tiny_dir, *user_files, task="dpo", metrics=["vader"]))


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "no rows"),
        (['{"text": "fine", "label": 1}', "{not json"], r"eval.jsonl:2: not valid JSON"),
        (
            ['{"text": "fine", "label": 1}', '{"text": "", "label": 0}'],
            r"eval.jsonl:2: field 'text' must be a non-empty",
        ),
        (['{"text": "fine", "label": 1}', '{"text": "bad", "label": 7}'], r"eval.jsonl:2: 'label' must be 1"),
    ],
)
def test_empty_or_malformed_rows_are_one_clear_error_and_nothing_is_overwritten(
    tiny_dir, user_files, tmp_path, capsys, lines, message
):
    import re

    import yaml

    from vsteer.cli import main

    train, _ = user_files
    bad = tmp_path / "eval.jsonl"
    bad.write_text("\n".join(lines) + ("\n" if lines else ""))
    recipe = tmp_path / "cmp.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_dir, train, bad)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("old report")
    assert main(["compare", str(recipe), "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert (out / "report.md").read_text() == "old report"
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]


def test_items_of_a_pair_stay_together_when_eval_is_split():
    from vsteer.data.compare_data import split_items

    items = [Item("p", f"c{i}", 1, i) for i in range(20)] + [Item("p", f"r{i}", 0, i) for i in range(20)]
    val, test = split_items(items, 0.3, seed=0)
    assert {i.group for i in val}.isdisjoint({i.group for i in test})
    assert len(val) + len(test) == 40


@pytest.mark.parametrize("profile", ["cpu", "full", "smoke"])
def test_every_profile_gives_valid_comparisons_and_verdict_arms_have_three_seeds(profile):
    from pathlib import Path

    import yaml

    from vsteer.experiments.adapters import AdapterComparisonConfig, specs

    root = Path(__file__).resolve().parent.parent / "vsteer" / "recipes" / "profiles"
    block = yaml.safe_load((root / f"{profile}.yaml").read_text())["adapters"]
    for task, spec in specs(AdapterComparisonConfig(**block), "smollm2-135m-instruct").items():
        assert spec.task == task
        if profile != "smoke":
            assert {"v", "qk", "all"} <= set(spec.arms)
            assert len(spec.seeds) >= 3  # every verdict-carrying arm: at least 3 seeds


def test_the_main_job_rules_exist_for_every_finding_kind():
    from vsteer.compare_result import KINDS
    from vsteer.verdicts import shipped_rules

    rules = shipped_rules()
    for label in ("style", "alignment"):
        for kind in KINDS:
            assert f"adapters.{label}.{kind}" in rules


@pytest.mark.slow
def test_positive_control_moves_style_on_the_embedded_model():
    """SmolLM2, 24 SFT steps of 8 positive SST-2 sentences (bf16): the all-projection arm's
    likelihood shift of 150 held-out positive over 150 negative SST-2 test sentences has an
    interval above zero (measured: +0.153 [0.030, 0.270] nats/token)."""
    spec = load_compare_recipe(
        "vsteer/recipes/compare_style_sft.yaml",
        [
            "arms=[all]",
            "learning_rates=[0.003]",
            "seeds=[0]",
            "steps=24",
            "checkpoints=[]",
            "ablation=false",
            "data.n_val=16",
            "data.n_test=150",
            "metrics=[]",
            "workers=1",
        ],
    )
    res = run_compare(spec, progress=False)
    e = res.effect("all")
    assert e.low > 0, e


def test_length_buckets_keep_every_row_group_similar_lengths_and_depend_on_the_seed():
    from vsteer.compare import length_buckets

    tok = char_tokenizer()
    rng = np.random.default_rng(3)
    rows = [{"text": "x" * int(n)} for n in rng.integers(1, 60, size=64)]
    a = length_buckets(rows, tok, 8, seed=0)
    assert sorted(r["text"] for r in a) == sorted(r["text"] for r in rows)

    def padded(order):  # tokens a batch of 8 pads to, summed over batches
        return sum(max(len(r["text"]) for r in order[i : i + 8]) for i in range(0, len(order), 8))

    assert padded(a) < 0.8 * padded(rows)
    b = length_buckets(rows, tok, 8, seed=1)
    assert [r["text"] for r in a] != [r["text"] for r in b]
    assert [r["text"] for r in a] == [r["text"] for r in length_buckets(rows, tok, 8, seed=0)]


def test_sft_trains_on_the_bucketed_order(tiny_dir, user_files, monkeypatch):
    """The SFT job writes its rows bucketed and asks TRL for a sequential sampler (else TRL's
    random sampler would undo the buckets); with length_buckets: false it does neither."""
    import vsteer.compare as compare
    import vsteer.train as train_mod

    seen = []
    real = train_mod.train_from_recipe

    def spy(recipe, **kw):
        rows = [json.loads(x) for x in open(recipe["data"]["train"])]
        seen.append((recipe["training"].get("train_sampling_strategy"), [r["text"] for r in rows]))
        return real(recipe, **kw)

    monkeypatch.setattr(train_mod, "train_from_recipe", spy)
    for buckets in (True, False):
        spec = load_compare_recipe(
            _recipe(
                tiny_dir, *user_files, arms=["v"], learning_rates=[1e-3], seeds=[0], length_buckets=buckets
            )
        )
        run_compare(spec, progress=False)
    (strategy_on, rows_on), (strategy_off, rows_off) = seen
    assert strategy_on == "sequential" and strategy_off is None
    ctx = compare._context(spec.to_dict())
    expected = compare.length_buckets(ctx["data"].train, ctx["tokenizer"], spec.batch_size, 0)
    assert rows_on == [r["text"] for r in expected]
    assert rows_off == [r["text"] for r in ctx["data"].train]


def test_comparisons_sharing_one_pool_equal_each_run_alone(tiny_dir, user_files, tmp_path):
    """Two comparisons driven side by side through one 2-process pool give the numbers each
    gives alone in this process (workers: 1): sharing workers changes no result."""
    from vsteer.experiments.adapters import run_concurrently

    base = dict(arms=["v", "qk"], learning_rates=[1e-3, 3e-2], seeds=[0, 1], checkpoints=[])
    specs = {
        name: load_compare_recipe(_recipe(tiny_dir, *user_files, name=name, rank=r, **base))
        for name, r in (("a", 2), ("b", 4))
    }
    alone = {k: run_compare(s, progress=False) for k, s in specs.items()}
    for s in specs.values():
        s.workers = 2
    shared = run_concurrently(specs, cache=tmp_path / "cache", progress=False)
    for k in specs:
        assert shared[k].chosen == alone[k].chosen
        for key, run in alone[k].runs.items():
            if "test" in run:
                np.testing.assert_allclose(shared[k].runs[key]["test"], run["test"], atol=1e-5)


def test_dpo_comparison_with_a_shared_reference_equals_the_per_step_reference(tiny_dir, tmp_path):
    """DPO runs given the comparison's reference log-probs (computed once) score as runs that
    compute the reference in every step."""
    train = _jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": f"q{i}:", "chosen": " great, loved it", "rejected": " awful, hated it"}
            for i in range(16)
        ],
    )
    ev = [{"prompt": f"r{i}:", "chosen": " loved it", "rejected": " hated it"} for i in range(12)]
    ev = _jsonl(tmp_path / "pairs_eval.jsonl", ev)
    runs = {}
    for shared in (True, False):
        recipe = _recipe(tiny_dir, train, ev, task="dpo", arms=["v"], seeds=[0, 1], shared_reference=shared)
        runs[shared] = run_compare(load_compare_recipe(recipe), progress=False)
    assert runs[True].chosen == runs[False].chosen
    assert ("reference",) in runs[True].runs and ("reference",) not in runs[False].runs
    for key, run in runs[False].runs.items():
        if "test" in run:
            np.testing.assert_allclose(runs[True].runs[key]["test"], run["test"], atol=1e-4)


def test_ablation_subset_is_fixed_stratified_and_keeps_pairs_whole(tiny_dir, user_files):
    from vsteer.compare_eval import item_subset

    items = [Item("", f"t{i}", i % 2) for i in range(20)]
    idx = item_subset(items, 3, seed=0)
    assert len(idx) == 6 and sum(items[i].label for i in idx) == 3 and idx == sorted(idx)
    assert idx == item_subset(items, 3, seed=0) and item_subset(items, None) == list(range(20))
    pairs = [Item("p", f"t{i}", i % 2, group=i // 2) for i in range(20)]
    kept = item_subset(pairs, 4, seed=1)
    assert len(kept) == 8 and all((i ^ 1) in kept for i in kept)  # both items of each kept pair
    spec = load_compare_recipe(
        _recipe(tiny_dir, *user_files, arms=["v", "all"], learning_rates=[3e-2], seeds=[0], ablation_items=3)
    )
    res = run_compare(spec, progress=False)
    ev = res.runs[("eval", "all", 0)]
    assert len(ev["ablation_index"]) == 6 and all(len(v) == 6 for v in ev["ablation"].values())
    assert res.ablation()["shares"]["v"].n == 6


def test_ablation_of_every_seed_pools_each_seeds_own_items(tiny_dir, user_files, tmp_path):
    """``ablation_seeds: all``: each later seed's control is ablated on its own scored block, the
    pooled ablation is the first seed's items plus theirs (none shared), a seed's removed shift is
    measured against its own run, and the first seed's pieces are reused from the cache as they were."""
    kw = dict(arms=["v", "all"], learning_rates=[3e-2], seeds=[0, 1], test_items="per-seed", ablation_items=2)
    kw["data"] = {"source": "user", "train": str(user_files[0]), "eval": str(user_files[1]), "n_test": 4}
    cache = tmp_path / "cache"
    one = run_compare(load_compare_recipe(_recipe(tiny_dir, *user_files, **kw)), cache=cache, progress=False)
    both = run_compare(
        load_compare_recipe(_recipe(tiny_dir, *user_files, **kw, ablation_seeds="all")),
        cache=cache,
        progress=False,
    )
    assert ("ablate", "all", 1) in both.runs and ("ablate", "all", 1) not in one.runs
    first, later = both.runs[("eval", "all", 0)], both.runs[("ablate", "all", 1)]
    assert first == one.runs[("eval", "all", 0)]  # a cache hit: the first seed's piece is unchanged
    assert "test" not in later and set(later["ablation"]) == set(first["ablation"])
    assert not set(first["ablation_index"]) & set(later["ablation_index"])
    assert set(later["ablation_index"]) <= set(both.block(1).tolist())
    a1, a2 = one.ablation(), both.ablation()
    assert a1["removed"]["v"].n == 4 and a2["removed"]["v"].n == 8 and a2["seeds"] == [0, 1]
    # the pooled statistic by hand: each seed's full shift (its own run) minus its ablated shift
    labels, _ = both._labels("test")
    base = both._base("test")
    shifts = both.test_shifts("all")
    full, abl, lab = [], [], []
    for j, ev in ((0, first), (1, later)):
        idx = np.array(ev["ablation_index"])
        full.append(shifts[j, idx])
        abl.append(np.array(ev["ablation"]["v"]) - base[idx])
        lab.append(labels[idx])
    full, abl, lab = np.concatenate(full), np.concatenate(abl), np.concatenate(lab)
    want = (full[lab == 1].mean() - full[lab == 0].mean()) - (abl[lab == 1].mean() - abl[lab == 0].mean())
    assert a2["removed"]["v"].value == pytest.approx(want)
    # shared test items, both seeds' controls ablated on all of them: each item is one unit (the
    # mean of the two runs' shifts), not two
    data = {k: v for k, v in kw["data"].items() if k != "n_test"}
    kw.update(test_items="shared", data=data, ablation_items=None)
    shared = run_compare(
        load_compare_recipe(_recipe(tiny_dir, *user_files, **kw, ablation_seeds="all")),
        cache=cache,
        progress=False,
    )
    n_test = len(shared.data.test)
    assert len(shared.runs[("ablate", "all", 1)]["ablation_index"]) == n_test
    assert shared.ablation()["removed"]["v"].n == n_test
    with pytest.raises(RecipeError, match="ablation_seeds must be one of first, all"):
        load_compare_recipe(_recipe(tiny_dir, *user_files, ablation_seeds="every"))


def test_loads_from_two_threads_leave_no_meta_tensors(tiny_dir):
    """Two comparisons driven side by side load models from two threads; transformers' loading
    swaps process-wide state, so without vsteer's load lock later loads came out on the meta
    device (every real-model test after the shared-pool test failed that way)."""
    from concurrent.futures import ThreadPoolExecutor

    from vsteer.models import load_model

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: load_model(str(tiny_dir)), range(8)))
    model, _ = load_model(str(tiny_dir))
    assert not any(p.is_meta for p in model.parameters())


def test_item_blocks_are_disjoint_cover_every_item_balance_labels_and_keep_pairs_whole():
    from vsteer.compare_eval import item_blocks

    items = [Item("", f"t{i}", int(i < 7)) for i in range(16)]  # 7 positives, 9 negatives
    blocks = item_blocks(items, 3)
    assert sorted(i for b in blocks for i in b) == list(range(16))
    for b in blocks:  # each label dealt out in turn: block sizes per label differ by at most one
        assert sum(items[i].label for i in b) in (2, 3) and sum(1 - items[i].label for i in b) == 3
    pairs = [Item("p", f"t{i}", i % 2, group=i // 2) for i in range(14)]
    for b in item_blocks(pairs, 3):
        assert all((i ^ 1) in b for i in b)  # both sides of a pair in one block
    assert item_blocks(items, 1) == [list(range(16))]


def test_per_seed_test_items_score_each_seed_on_its_own_block(tiny_dir, user_files, tmp_path, monkeypatch):
    """test_items: per-seed: every run is scored on its seed's block only, every arm on the same
    blocks; the effect pools all items with one shift each; the arms' difference stays paired."""
    import vsteer.compare as compare
    from vsteer.compare_eval import item_blocks

    train, _ = user_files
    ev = [{"text": f"loved it, great {i}", "label": 1} for i in range(12)]
    ev += [{"text": f"awful, hated it {i}", "label": 0} for i in range(12)]
    val = _jsonl(tmp_path / "val.jsonl", ev[::3])
    test = _jsonl(tmp_path / "test.jsonl", [r for i, r in enumerate(ev) if i % 3])
    data = {"source": "user", "train": str(train), "val": str(val), "test": str(test)}
    scored = []
    real_scores = compare._scores

    def spy(model, ctx, split, index=None):
        scored.append((split, None if index is None else tuple(index)))
        return real_scores(model, ctx, split, index)

    monkeypatch.setattr(compare, "_scores", spy)
    recipe = _recipe(
        tiny_dir,
        train,
        None,
        data=data,
        arms=["v", "qk"],
        learning_rates=[3e-2],
        seeds=[0, 1],
        checkpoints=[],
    )
    res = run_compare(load_compare_recipe({**recipe, "test_items": "per-seed"}), progress=False)
    blocks = item_blocks(res.data.test, 2)
    test_calls = [index for split, index in scored if split == "test"]
    assert test_calls.count(None) == 1  # the base scores every item
    assert sorted(test_calls[1:], key=str) == sorted([tuple(blocks[0])] * 2 + [tuple(blocks[1])] * 2, key=str)
    for arm in ("v", "qk"):
        for j, s in enumerate((0, 1)):
            assert len(res.runs[("eval", arm, s)]["test"]) == len(blocks[j])
    shifts = res.test_shifts("v")
    assert np.isnan(shifts).sum() == len(res.data.test)  # each item scored by exactly one seed
    d = res.item_shifts("v") - res.item_shifts("qk")
    labels = np.array([i.label for i in res.data.test])
    assert res.effect("v", "qk").value == pytest.approx(d[labels == 1].mean() - d[labels == 0].mean())
    assert res.effect("v").n == len(res.data.test)
    seeds = res.seed_effects("v")
    for j in range(2):  # each seed's effect on its own block
        b = np.array(blocks[j])
        e = shifts[j, b]
        assert seeds[j] == pytest.approx(e[labels[b] == 1].mean() - e[labels[b] == 0].mean())
    assert "own" in res.findings()[0].measured or "own" in " ".join(res.notes())


def test_per_seed_test_items_on_a_shipped_task_take_n_test_per_seed():
    from vsteer.compare import build_data

    spec = load_compare_recipe(
        "compare_sentiment_dpo",
        [
            "steps=2",
            "batch_size=2",
            "checkpoints=[]",
            "data.n_val=3",
            "data.n_test=5",
            "seeds=[0,1,2]",
            "data.completion_tokens=160",
        ],
    )
    assert spec.test_items == "per-seed"
    data = build_data(spec, char_tokenizer())
    assert len(data.test) == 2 * 5 * 3 and len(data.val) == 2 * 3
    texts = lambda items: {i.text for i in items}  # noqa: E731
    assert not texts(data.val) & texts(data.test)
    trained = {r["chosen"] for r in data.train} | {r["rejected"] for r in data.train}
    assert not trained & texts(data.val) and not trained & texts(data.test)
    with pytest.raises(DataError, match="held-out IMDB pairs"):
        build_data(load_compare_recipe("compare_sentiment_dpo", ["data.n_test=67"]), char_tokenizer())
    with pytest.raises(RecipeError, match="test_items must be one of"):
        load_compare_recipe("compare_style_sft", ["test_items=each"])


def test_seed_item_effect_counts_the_spread_between_seeds():
    """Two-level bootstrap: with seeds that agree it is about as wide as the item bootstrap
    (conservative: resampling both levels counts the item noise of block means twice, ~1.4x
    here); with one seed far off it widens to cover the seeds' spread; the item bootstrap does not."""
    from vsteer.compare_eval import item_blocks
    from vsteer.compare_stats import seed_item_effect

    rng = np.random.default_rng(0)
    items = [Item("", f"t{i}", i % 2) for i in range(600)]
    labels = np.array([i.label for i in items])
    blocks = item_blocks(items, 3)
    noise = rng.normal(0, 0.3, len(items))
    for seed_effects, wide in (((0.1, 0.1, 0.1), False), ((0.02, 0.04, 0.3), True)):
        shifts = np.full((3, len(items)), np.nan)
        for j, b in enumerate(blocks):
            shifts[j, b] = noise[b] + seed_effects[j] * labels[b]
        d = np.nanmean(shifts, 0)
        items_only = shift_effect(d, labels)
        two = seed_item_effect(shifts, labels, blocks=blocks)
        assert two.value == pytest.approx(items_only.value)
        ratio = (two.high - two.low) / (items_only.high - items_only.low)
        assert (ratio > 2.5) if wide else (0.9 < ratio < 1.6), ratio
    # shared items: seeds (rows) and items (columns) cross
    shared = np.stack([noise + e * labels for e in (0.02, 0.04, 0.3)])
    two = seed_item_effect(shared, labels)
    assert two.low < 0.05 and two.high > 0.2
    pairs = [Item("p", f"t{i}", i % 2, group=i // 2) for i in range(40)]
    s = np.tile(np.where(np.arange(40) % 2, 0.2, 0.0), (2, 1))
    e = seed_item_effect(s, np.array([i.label for i in pairs]), [i.group for i in pairs])
    assert e.low == pytest.approx(0.2) and e.high == pytest.approx(0.2)  # every pair differs by 0.2


def test_statistics_code_is_not_an_input_of_a_comparison_piece():
    """Pieces store per-item scores; the statistics and tables are computed afresh from them, so
    their modules stay out of the pieces' code fingerprint while the scoring code is in it."""
    from vsteer.compare import PIECE_CODE_EXCLUDED
    from vsteer.pieces import code_closure

    closure = code_closure(["vsteer.compare", "vsteer.compare_eval", "vsteer.train"], PIECE_CODE_EXCLUDED)
    assert "vsteer.compare_eval" in closure and "vsteer.train" in closure
    assert "vsteer.compare_stats" not in closure and "vsteer.compare_result" not in closure


def test_per_seed_test_items_on_too_small_a_test_split_is_one_clear_error(tiny_dir, user_files, tmp_path):
    train, ev = user_files
    rows = [json.loads(x) for x in ev.read_text().splitlines()]
    val, test = (
        _jsonl(tmp_path / "v.jsonl", rows[:3] + rows[-3:]),
        _jsonl(tmp_path / "t.jsonl", rows[-5:-3] + rows[3:4]),
    )
    data = {"source": "user", "train": str(train), "val": str(val), "test": str(test)}
    spec = load_compare_recipe(
        {**_recipe(tiny_dir, train, ev, data=data, seeds=[0, 1, 2]), "test_items": "per-seed"}
    )
    out = tmp_path / "cache"
    with pytest.raises(
        DataError, match=r"per-seed needs at least 6 test items for 3 seeds, the test split has 3"
    ):
        run_compare(spec, cache=out, progress=False)
    assert not out.exists()  # bad input leaves nothing behind


def test_caa_behaviour_task_holds_out_the_caa_test_items_and_validates_its_keys():
    """The behavioural DPO set: chat-templated A/B questions, chosen = the behaviour's answer;
    train, val and test share no question; test starts with CAA's own 50 held-out items."""
    from test_serve import tiny_tokenizer

    from vsteer.compare import build_data
    from vsteer.data.readers import caa_ab

    tok = tiny_tokenizer()
    spec = load_compare_recipe("compare_behaviour_dpo", ["data.n_test=70", "seeds=[0,1,2]"])
    assert spec.task == "dpo" and spec.test_items == "per-seed"
    data = build_data(spec, tok)
    assert len(data.train) == spec.steps * spec.batch_size and len(data.val) == 2 * 30
    assert len(data.test) == 2 * 70 * 3  # per seed: pairs, chosen and rejected
    test_caa = caa_ab("corrigible-neutral-HHH", "test")
    everything = test_caa + caa_ab("corrigible-neutral-HHH")

    def question(prompt):
        return next(it for it in everything if it.question in prompt)

    first = data.test[0]
    assert any(it.question in first.prompt for it in test_caa) and first.prompt.startswith("user : ")
    held_caa = sum(any(it.question in i.prompt for it in test_caa) for i in data.test if i.label == 1)
    assert held_caa == len(test_caa)  # all of CAA's own test items are in the test split
    assert first.text in (" (A)", " (B)") and first.label == 1
    assert data.test[1].label == 0 and data.test[1].group == first.group and data.test[1].text != first.text
    for row in data.train:
        it = question(row["prompt"])
        assert (row["chosen"], row["rejected"]) == (" " + it.matching, " " + it.not_matching)
    prompts = lambda items: {i.prompt for i in items}  # noqa: E731
    train = {r["prompt"] for r in data.train}
    assert not train & prompts(data.val) and not train & prompts(data.test)
    assert not prompts(data.val) & prompts(data.test)
    for split in (data.val, data.test, [{"text": r["chosen"]} for r in data.train]):
        letters = [
            i["text"] if isinstance(i, dict) else i.text for i in split if isinstance(i, dict) or i.label == 1
        ]
        assert abs(letters.count(" (A)") - letters.count(" (B)")) <= 1  # a letter preference cannot score
    with pytest.raises(DataError, match="held-out CAA corrigible-neutral-HHH pairs"):
        build_data(load_compare_recipe("compare_behaviour_dpo", ["data.n_test=100"]), tok)
    with pytest.raises(RecipeError, match="is not a CAA behaviour; expected one of coordinate-other-ais"):
        load_compare_recipe("compare_behaviour_dpo", ["data.behaviour=honesty"])
    with pytest.raises(RecipeError, match=r"unknown keys \['behavior'\]"):
        load_compare_recipe("compare_behaviour_dpo", ["data.behavior=refusal"])


def test_reordered_seeds_on_a_cache_score_each_seed_on_its_own_block(tiny_dir, user_files, tmp_path):
    """``test_items: per-seed``: a seed's test block depends on its place in ``seeds``, so a rerun
    with the seeds reordered must not reuse another block's scores (found in review: the cached
    rerun's per-item scores differed from a fresh run's by up to 0.01, silently)."""
    kw = dict(arms=["v", "all"], learning_rates=[3e-2], steps=2, checkpoints=[], test_items="per-seed")
    kw["ablation"] = False
    cache = tmp_path / "cache"
    run_compare(
        load_compare_recipe(_recipe(tiny_dir, *user_files, seeds=[0, 1, 2], **kw)),
        cache=cache,
        progress=False,
    )
    spec = load_compare_recipe(_recipe(tiny_dir, *user_files, seeds=[0, 2, 1], **kw))
    cached = run_compare(spec, cache=cache, progress=False)
    fresh = run_compare(
        load_compare_recipe(_recipe(tiny_dir, *user_files, seeds=[0, 2, 1], **kw)), progress=False
    )
    for seed in (0, 1, 2):
        a = np.array(cached.runs[("eval", "v", seed)]["test"])
        b = np.array(fresh.runs[("eval", "v", seed)]["test"])
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cached.seed_effects("v"), fresh.seed_effects("v"), rtol=0, atol=1e-9)


def test_select_lr_never_chooses_a_diverged_run():
    nan = float("nan")
    cases = [
        ({1e-3: nan, 3e-3: 0.2, 1e-2: 0.1}, 3e-3),
        ({1e-3: 0.1, 3e-3: nan, 1e-2: 0.2}, 1e-2),
        ({1e-3: 0.1, 3e-3: 0.2, 1e-2: nan}, 3e-3),
    ]
    for effects, best in cases:
        assert select_lr(effects) == best
    assert select_lr({1e-3: float("inf"), 3e-3: 0.0}) == 3e-3
    with pytest.raises(Exception, match="NaN or infinite"):
        select_lr({1e-3: nan, 3e-3: nan})


@pytest.mark.parametrize(
    "override, words",
    [
        ({"seeds": [0, 0, 1]}, "seeds repeat"),
        ({"seeds": [True]}, "seeds must be"),
        ({"checkpoints": 8}, "checkpoints must be a list"),
        ({"checkpoints": None}, "checkpoints must be a list"),
        ({"metrics": "kl"}, "metrics must be a list"),
        ({"rope": ["a", "b"]}, "rope must be"),
        ({"learning_rates": [True]}, "learning_rates must be"),
        ({"learning_rates": [float("nan")]}, "learning_rates must be"),
        ({"beta": -1.0}, "beta must be"),
        ({"warmup_steps": -5}, "warmup_steps must be"),
        ({"n_mmlu": 0}, "n_mmlu must be"),
        ({"data": {"source": "sst2-sentiment", "n_test": "many"}}, "data.n_test must be"),
        ({"data": {"source": "sst2-sentiment", "n_test": 0}}, "data.n_test must be"),
        ({"data": {"source": ["user"]}}, "data.source must be a name"),
        (
            {"data": {"source": "user", "train": "t.jsonl", "eval": "e.jsonl", "val_fraction": 2}},
            "val_fraction",
        ),
    ],
)
def test_malformed_recipe_values_are_one_line(override, words):
    with pytest.raises(RecipeError, match=words) as err:
        load_compare_recipe({"data": {"source": "sst2-sentiment"}, **override})
    assert "\n" not in str(err.value)
