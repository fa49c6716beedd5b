"""Adapter comparison under equal parameter budgets: does a value-only LoRA shift style and
alignment more than a query/key-only one (and how do output-only and all-attention arms do)?

Arms are trained with the shipped recipes (TRL SFT for style, TRL DPO for alignment); every arm
but ``v`` is matched to the ``v`` arm's effective parameter count (``adapter.match=v``).

* style: VADER sentiment of sampled continuations of neutral IMDB openings, and a
  reward-vs-KL curve over training checkpoints (the controlled-sentiment setting of the DPO
  paper, Rafailov et al. 2023, Fig. 2);
* alignment: p(behaviour-matching answer) on the held-out CAA A/B test split;
* capability kept: WikiText-2 perplexity, next-token KL to the base model on neutral prompts,
  and CAA's MMLU A/B accuracy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vsteer.evaluate import Estimate, Verdict, bootstrap, decide, rule_text
from vsteer.experiments.result import ExperimentResult

ARMS = ("v", "qk", "o", "qkvo")
_EVAL_FIELDS = (
    "dpo_behaviour",
    "n_prompts",
    "max_new_tokens",
    "n_wiki_windows",
    "wiki_window",
    "n_mmlu",
    "batch_size",
)
_TASK_FIELDS = {
    "sft": ("sft_recipe", "sft_steps", "sft_overrides", "checkpoints"),
    "dpo": ("dpo_recipe", "dpo_steps", "dpo_overrides"),
}


@dataclass
class AdapterComparisonConfig:
    """Sizes. ``seeds`` apply to every arm; steps are kept short for a CPU run."""

    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1)
    # SFT arms trained with every seed (the others with the first); DPO arms use ``dpo_seeds``
    seed_arms: tuple[str, ...] = ("v", "qk")
    dpo_seeds: tuple[int, ...] = (0,)
    dpo_arms: tuple[str, ...] = ARMS
    sft_recipe: str = "recipes/value_only_sft.yaml"
    dpo_recipe: str = "recipes/value_only_dpo.yaml"
    dpo_behaviour: str = "myopic-reward"
    sft_steps: int = 16
    dpo_steps: int = 16
    checkpoints: tuple[int, ...] = (4, 8, 16)
    n_prompts: int = 32
    max_new_tokens: int = 24
    n_wiki_windows: int = 8
    wiki_window: int = 128
    n_mmlu: int = 64
    sft_overrides: tuple[str, ...] = ("data.n_eval=16",)
    dpo_overrides: tuple[str, ...] = ("data.n_eval=16",)
    tasks: tuple[str, ...] = ("sft", "dpo")
    batch_size: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Snapshots:
    """Trainer callback state: copies of the trainable (LoRA) tensors at chosen steps."""

    steps: tuple[int, ...]
    states: dict = field(default_factory=dict)


def _snapshot_callback(snapshots: _Snapshots):
    from transformers import TrainerCallback

    class SnapshotCallback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in snapshots.steps and model is not None:
                snapshots.states[state.global_step] = {
                    n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
                }

    return SnapshotCallback()


class Evaluator:
    """The fixed evaluation data and the base model's own scores, shared by all arms."""

    def __init__(self, model_name: str, config: AdapterComparisonConfig, seed: int):
        from vsteer import data
        from vsteer.experiments.swaps import wikitext_windows
        from vsteer.models import load_model

        self.model_name, self.config, self.seed = model_name, config, seed
        self.base, self.tokenizer = load_model(model_name)
        self.prompts = data.neutral_prompts(config.n_prompts)
        self.ab_items = data.caa_ab(config.dpo_behaviour, "test")
        self.mmlu = data.mmlu_ab()[: config.n_mmlu]
        text = "\n".join(data.wikitext2_raw())
        self.windows = wikitext_windows(self.tokenizer, text, config.n_wiki_windows, config.wiki_window)
        self.kl_prompts = data.neutral_prompts(config.n_prompts + 16)[config.n_prompts :]
        from vsteer.metrics import next_token_logprobs

        self.base_next = next_token_logprobs(self.base, self.tokenizer, self.kl_prompts)

    def fresh_base(self):
        from vsteer.models import load_model

        return load_model(self.model_name)[0]

    def style(self, model) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(sentiment per prompt, sequence KL to the base per prompt, texts)."""
        from vsteer.metrics import continuation_logp, sample_continuations, vader_scores

        samples = sample_continuations(
            model, self.tokenizer, self.prompts, self.config.max_new_tokens, self.seed
        )
        sentiment = vader_scores(samples.texts)
        if hasattr(model, "disable_adapter"):
            # the same model with its adapter off is the reference
            with model.disable_adapter():
                reference = continuation_logp(model, samples)
            kl = continuation_logp(model, samples) - reference
        else:
            kl = np.zeros(len(samples.texts))
        return sentiment, kl, samples.texts

    def alignment(self, model) -> np.ndarray:
        from vsteer.experiments.steering import p_matching

        return p_matching(model, self.tokenizer, self.ab_items, batch_size=self.config.batch_size)

    def capability(self, model, base_next) -> dict:
        from vsteer.experiments.steering import p_matching
        from vsteer.metrics import kl_rows, next_token_logprobs, perplexity

        logp = next_token_logprobs(model, self.tokenizer, self.kl_prompts)
        p_correct = p_matching(model, self.tokenizer, self.mmlu, batch_size=self.config.batch_size)
        return {
            "wikitext_ppl": perplexity(model, self.windows),
            "kl_neutral": float(kl_rows(base_next, logp).mean()),
            "mmlu_acc": float((p_correct > 0.5).mean()),
        }


def _load_state(peft_model, state: dict) -> None:
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def train_arm(ev: Evaluator, task: str, arm: str, seed: int, workdir: Path) -> dict:
    """Train one arm with one seed and evaluate it; returns plain numbers (JSON-able)."""
    from peft import PeftModel

    from vsteer.train import train_from_recipe

    cfg = ev.config
    steps = cfg.sft_steps if task == "sft" else cfg.dpo_steps
    recipe = cfg.sft_recipe if task == "sft" else cfg.dpo_recipe
    overrides = [
        f"name={task}-{arm}-s{seed}",
        f"seed={seed}",
        f"adapter.targets={arm}",
        f"training.max_steps={steps}",
        "training.save_steps=1000",
        "training.eval_before=false",
        *(cfg.sft_overrides if task == "sft" else cfg.dpo_overrides),
    ]
    if arm != "v":
        overrides.append("adapter.match=v")
    snapshots = _Snapshots(tuple(s for s in cfg.checkpoints if s < steps))
    model = ev.fresh_base()
    result = train_from_recipe(
        recipe,
        overrides,
        output_dir=workdir,
        model=model,
        tokenizer=ev.tokenizer,
        callbacks=[_snapshot_callback(snapshots)],
    )
    peft_model = PeftModel.from_pretrained(ev.fresh_base(), result.adapter_dir).eval()
    out = {
        "task": task,
        "arm": arm,
        "seed": seed,
        "trainable": result.adapter.get("trainable_params_measured"),
        "effective": result.adapter.get("effective_params_measured"),
        "train_loss": result.metrics.get("train_loss"),
        "train_runtime": result.metrics.get("train_runtime"),
        "adapter_dir": str(Path(result.adapter_dir).relative_to(workdir)),
    }
    final_state = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    if task == "sft":
        curve = []
        for step in (*snapshots.steps, steps):
            state = snapshots.states.get(step, final_state if step == steps else None)
            if state is None:
                continue
            _load_state(peft_model, state)
            sentiment, kl, texts = ev.style(peft_model)
            curve.append({"step": step, "sentiment": sentiment.tolist(), "kl": kl.tolist()})
        _load_state(peft_model, final_state)
        out["curve"] = curve
        out["examples"] = texts[:3]
    else:
        out["p_matching"] = ev.alignment(peft_model).tolist()
    out["capability"] = ev.capability(peft_model, ev.base_next)
    return out


def run_adapter_comparison(
    model_name: str,
    config: AdapterComparisonConfig | None = None,
    seed: int = 0,
    cache=None,
    progress: bool = True,
) -> ExperimentResult:
    """Train every arm x seed x task (reusing finished pieces from ``cache``) and compare."""
    from tqdm.auto import tqdm

    from vsteer.models import config_fingerprint

    config = config or AdapterComparisonConfig()
    ev = Evaluator(model_name, config, seed)
    fingerprint = config_fingerprint(ev.base.config)

    def piece(kind, inputs, compute):
        if cache is None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                return compute(Path(tmp))
        return cache.run(kind, inputs, compute)[0]["result"]

    # a piece's key holds what it computes from, nothing else: which arms and seeds run, or the
    # other task's settings, do not change one arm's result
    evaluation = {k: getattr(config, k) for k in _EVAL_FIELDS}
    common = {"model": model_name, "fingerprint": fingerprint, "evaluation": evaluation, "seed": seed}
    training = {task: {k: getattr(config, k) for k in fields} for task, fields in _TASK_FIELDS.items()}

    def base_eval(_work):
        sentiment, _, texts = ev.style(ev.base)
        return {
            "sentiment": sentiment.tolist(),
            "p_matching": ev.alignment(ev.base).tolist(),
            "capability": ev.capability(ev.base, ev.base_next),
            "examples": texts[:3],
        }

    base = piece("adapters-base", common, base_eval)

    def seeds_of(task: str, arm: str) -> tuple[int, ...]:
        if task == "dpo":
            return config.dpo_seeds if arm in config.dpo_arms else ()
        return config.seeds if arm in config.seed_arms else config.seeds[:1]

    jobs = [(t, a, s) for t in config.tasks for a in config.arms for s in seeds_of(t, a)]
    runs = []
    for task, arm, s in tqdm(jobs, desc="adapter arms", disable=not progress):
        runs.append(
            piece(
                f"adapter-{task}",
                {**common, "training": training[task], "arm": arm, "train_seed": s},
                lambda work, task=task, arm=arm, s=s: train_arm(ev, task, arm, s, work),
            )
        )
    return _result(base, runs, config, seed, model_name)


def _mean_over_seeds(runs, task, arm, key_fn) -> np.ndarray:
    rows = [key_fn(r) for r in runs if r["task"] == task and r["arm"] == arm]
    return np.mean(np.array(rows, dtype=float), axis=0)


def _result(base: dict, runs: list[dict], config: AdapterComparisonConfig, seed: int, model_name: str):
    base_sent = np.array(base["sentiment"])
    base_p = np.array(base["p_matching"])
    records, curve_records = [], []
    for r in runs:
        row = {
            "task": r["task"],
            "arm": r["arm"],
            "seed": r["seed"],
            "effective_params": r["effective"],
            "trainable_params": r["trainable"],
            "train_s": r["train_runtime"],
        }
        if r["task"] == "sft":
            final = r["curve"][-1]
            row["sentiment"] = float(np.mean(final["sentiment"]))
            row["sentiment_shift"] = row["sentiment"] - float(base_sent.mean())
            row["seq_kl"] = float(np.mean(final["kl"]))
            for c in r["curve"]:
                curve_records.append(
                    {
                        "arm": r["arm"],
                        "seed": r["seed"],
                        "step": c["step"],
                        "reward": float(np.mean(c["sentiment"])),
                        "kl": float(np.mean(c["kl"])),
                    }
                )
        else:
            row["p_matching"] = float(np.mean(r["p_matching"]))
            row["p_matching_shift"] = row["p_matching"] - float(base_p.mean())
        row.update(r["capability"])
        records.append(row)
    records.append(
        {
            "task": "base",
            "arm": "none",
            "seed": "-",
            "sentiment": float(base_sent.mean()),
            "p_matching": float(base_p.mean()),
            **base["capability"],
        }
    )

    verdicts, notes = [], []
    cmd = "vsteer run recipes/claims.yaml --only adapters"
    arms = {r["arm"] for r in runs}
    if "sft" in config.tasks and "v" in arms:
        v_sent = _mean_over_seeds(runs, "sft", "v", lambda r: r["curve"][-1]["sentiment"])
        est = bootstrap(v_sent - base_sent, seed=seed)
        verdicts.append(
            _verdict(
                "A value-only LoRA shifts response style (toward positive sentiment)",
                "VADER shift of v-only arm vs base, per prompt",
                est,
                cmd,
            )
        )
        if "qk" in arms:
            qk_sent = _mean_over_seeds(runs, "sft", "qk", lambda r: r["curve"][-1]["sentiment"])
            est = bootstrap(v_sent - qk_sent, seed=seed)
            verdicts.append(
                _verdict(
                    "At equal budget, v-only shifts style more than qk-only",
                    "VADER, v-only minus qk-only, per prompt",
                    est,
                    cmd,
                )
            )
    if "dpo" in config.tasks and "v" in arms:
        v_p = _mean_over_seeds(runs, "dpo", "v", lambda r: r["p_matching"])
        est = bootstrap(v_p - base_p, seed=seed)
        verdicts.append(
            _verdict(
                f"A value-only DPO adapter shifts alignment ({config.dpo_behaviour})",
                "p(matching) on held-out A/B, v-only minus base, per item",
                est,
                cmd,
            )
        )
        if "qk" in arms:
            qk_p = _mean_over_seeds(runs, "dpo", "qk", lambda r: r["p_matching"])
            est = bootstrap(v_p - qk_p, seed=seed)
            verdicts.append(
                _verdict(
                    "At equal budget, v-only DPO shifts alignment more than qk-only",
                    "p(matching), v-only minus qk-only, per item",
                    est,
                    cmd,
                )
            )
    counts = {(r["arm"]): r["effective"] for r in runs}
    notes.append(
        "Effective trainable parameters per arm (LoRA rows that can change; arms matched to v within 2%): "
        + ", ".join(f"{a}={n}" for a, n in sorted(counts.items()))
        + f". SFT seeds: {list(config.seeds)} for {list(config.seed_arms)}, {config.seeds[0]} for the other arms; "
        f"DPO arms {list(config.dpo_arms)} with seeds {list(config.dpo_seeds)}; "
        f"SFT {config.sft_steps} steps (overrides {list(config.sft_overrides)}), "
        f"DPO {config.dpo_steps} steps (overrides {list(config.dpo_overrides)})."
        " Verdicts average each arm over its seeds per item, then bootstrap over items."
    )
    result = ExperimentResult(
        name="adapters",
        title="Adapter comparison under equal budgets (v / qk / o / qkvo)",
        records=records,
        verdicts=verdicts,
        meta={
            "config": config.to_dict(),
            "model": model_name,
            "curve": curve_records,
            "base_examples": base.get("examples", []),
        },
        columns=[
            "task",
            "arm",
            "seed",
            "effective_params",
            "sentiment",
            "sentiment_shift",
            "seq_kl",
            "p_matching",
            "p_matching_shift",
            "wikitext_ppl",
            "kl_neutral",
            "mmlu_acc",
            "train_s",
        ],
        notes=notes,
        plotter=lambda recs, path: _plot(recs, curve_records, path),
    )
    return result


def _verdict(claim: str, measured: str, est: Estimate, cmd: str) -> Verdict:
    return Verdict(claim, measured, est, decide(est, 0.0), rule_text(0.0, what="mean difference"), cmd)


def _plot(records, curve_records, path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = {"v": "tab:red", "qk": "tab:blue", "o": "tab:green", "qkvo": "tab:purple"}
    for arm in sorted({c["arm"] for c in curve_records}):
        for s in sorted({c["seed"] for c in curve_records if c["arm"] == arm}):
            pts = sorted((c["kl"], c["reward"]) for c in curve_records if c["arm"] == arm and c["seed"] == s)
            ax1.plot(
                *zip(*pts), "o-", color=colours.get(arm, "gray"), alpha=0.8, label=arm if s == 0 else None
            )
    base = next((r for r in records if r["task"] == "base"), None)
    if base:
        ax1.axhline(base["sentiment"], color="black", ls=":", label="base")
    ax1.set_xlabel("sequence KL(policy || base), nats")
    ax1.set_ylabel("VADER sentiment of continuations")
    ax1.set_title("style SFT: reward vs KL over checkpoints")
    ax1.legend(fontsize=8)
    dpo = [r for r in records if r["task"] == "dpo"]
    arms = sorted({r["arm"] for r in dpo}, key=lambda a: list(colours).index(a) if a in colours else 9)
    for i, arm in enumerate(arms):
        vals = [r["p_matching"] for r in dpo if r["arm"] == arm]
        ax2.scatter([i] * len(vals), vals, color=colours.get(arm, "gray"))
    if base:
        ax2.axhline(base["p_matching"], color="black", ls=":", label="base")
    ax2.set_xticks(range(len(arms)), arms)
    ax2.set_ylabel("p(matching answer), held-out A/B")
    ax2.set_title("alignment DPO")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
