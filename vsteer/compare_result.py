"""What a comparison (:func:`vsteer.compare.run_compare`) measured: tables, findings, plot, files.

Findings carry the measurements only; verdicts come from rules (:mod:`vsteer.verdicts`): the
main job's rules live in ``vsteer/recipes/verdicts.yaml`` (``adapters.<task>.*``), a
``vsteer compare`` recipe states its own region of practical equivalence (``rope``) and gets
rules built from it (:meth:`CompareResult.rules`).

If the positive control's interval does not lie wholly above the ROPE, the comparison is
*underpowered*: it says so and draws no verdict from the other arms (a null there would not be
evidence of no effect).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vsteer.compare_stats import preference_accuracy, projection_ablation, shift_effect
from vsteer.evaluate import Estimate, Finding

TASK_LABEL = {"sft": "style", "dpo": "alignment"}
KINDS = ("control_moves", "v_moves", "v_vs_qk", "value_share")


def _est(e: Estimate) -> dict:
    return {"value": e.value, "low": e.low, "high": e.high, "n": e.n}


@dataclass
class CompareResult:
    spec: object
    budget: int
    plans: dict
    data: object
    runs: dict
    chosen: dict
    seconds: float
    # two-level bootstraps, each read by the tables, the notes and results.json: computed once
    _seed_item: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- numbers ---------------------------------------------------------------------------
    @property
    def first(self) -> int:
        return self.spec.seeds[0]

    def _labels(self, split: str):
        items = self.data.val if split == "val" else self.data.test
        groups = [i.group for i in items]
        return np.array([i.label for i in items]), (groups if all(g is not None for g in groups) else None)

    def _base(self, split: str) -> np.ndarray:
        return np.array(self.runs[("base",)][split])

    @property
    def per_seed(self) -> bool:
        return self.spec.test_items == "per-seed"

    def block(self, seed: int) -> np.ndarray:
        """Indices of the test items the runs of ``seed`` were scored on."""
        from vsteer.compare import scored_index

        index = scored_index(self.spec, self.data.test, seed)
        return np.arange(len(self.data.test)) if index is None else np.array(index, dtype=int)

    def test_shifts(self, arm: str) -> np.ndarray:
        """``[n_seeds, n_test]`` per-item shift of the arm's log p relative to the base; NaN where
        a seed's runs did not score the item (``test_items: per-seed``)."""
        base = self._base("test")
        out = np.full((len(self.spec.seeds), len(base)), np.nan)
        for j, s in enumerate(self.spec.seeds):
            idx = self.block(s)
            out[j, idx] = np.array(self.runs[("eval", arm, s)]["test"]) - base[idx]
        return out

    def item_shifts(self, arm: str) -> np.ndarray:
        """``[n_test]`` one shift per item: the mean over the seeds that scored it."""
        return np.nanmean(self.test_shifts(arm), axis=0)

    def effect(self, arm: str, minus: str | None = None) -> Estimate:
        """The arm's shift over all test items (``minus``: paired item by item against another
        arm's runs of the same seeds); 95% bootstrap over items (by label; pairs whole)."""
        labels, groups = self._labels("test")
        d = self.item_shifts(arm)
        if minus is not None:
            d = d - self.item_shifts(minus)
        return shift_effect(d, labels, groups, seed=self.first)

    def seed_item_effect(self, arm: str, minus: str | None = None) -> Estimate:
        """:meth:`effect` with seeds resampled too (:func:`vsteer.compare_stats.seed_item_effect`)."""
        from vsteer.compare_stats import seed_item_effect

        if (arm, minus) not in self._seed_item:
            labels, groups = self._labels("test")
            s = self.test_shifts(arm)
            if minus is not None:
                s = s - self.test_shifts(minus)
            blocks = [self.block(x) for x in self.spec.seeds] if self.per_seed else None
            self._seed_item[(arm, minus)] = seed_item_effect(s, labels, groups, blocks, seed=self.first)
        return self._seed_item[(arm, minus)]

    def seed_effects(self, arm: str) -> list[float]:
        labels, _ = self._labels("test")
        out = []
        for s, d in zip(self.spec.seeds, self.test_shifts(arm), strict=True):
            idx = self.block(s)
            d, lab = d[idx], labels[idx]
            out.append(float(d[lab == 1].mean() - d[lab == 0].mean()))
        return out

    def controlled(self) -> bool:
        """Whether the positive control moved the primary metric beyond the ROPE."""
        from vsteer.compare import CONTROL

        if CONTROL not in self.spec.arms:
            return True  # nothing to gate on; said in the notes
        return self.effect(CONTROL).low > self.spec.rope[1]

    def _ablation_runs(self) -> list[tuple[int, dict]]:
        """``(seed index, evaluation)`` of every ablated positive-control run: the first seed's,
        and with ``ablation_seeds: all`` the later seeds' too."""
        from vsteer.compare import CONTROL

        out = []
        for j, s in enumerate(self.spec.seeds):
            ev = self.runs.get(("eval", CONTROL, s) if j == 0 else ("ablate", CONTROL, s), {})
            if "ablation" in ev:
                out.append((j, ev))
        return out

    def ablation(self) -> dict | None:
        """The projection ablation over the items of every ablated control run: per test item the
        mean over the runs that ablated it (each run's removed shift measured against that run),
        so an item scored by several seeds (``test_items: shared``) stays one unit of the resample."""
        from vsteer.compare import CONTROL

        runs = self._ablation_runs()
        if not runs:
            return None
        labels, groups = self._labels("test")
        base = self._base("test")
        shifts = self.test_shifts(CONTROL)  # [seeds, items], NaN off a seed's block
        names = [p for p in runs[0][1]["ablation"] if all(p in ev["ablation"] for _, ev in runs)]
        count = np.zeros(len(base))
        full = np.zeros(len(base))
        abl = {p: np.zeros(len(base)) for p in names}
        for j, ev in runs:
            index = np.array(ev.get("ablation_index", range(len(base))), dtype=int)  # the scored subset
            count[index] += 1
            full[index] += shifts[j, index]
            for p in names:
                abl[p][index] += np.array(ev["ablation"][p]) - base[index]
        keep = np.flatnonzero(count)
        n = count[keep]
        return {
            **projection_ablation(
                full[keep] / n,
                {p: v[keep] / n for p, v in abl.items()},
                labels[keep],
                None if groups is None else [groups[i] for i in keep],
                seed=self.first,
            ),
            "norms": runs[0][1].get("update_norms", {}),
            "seeds": [self.spec.seeds[j] for j, _ in runs],
        }

    # ---- findings and rules ----------------------------------------------------------------
    def findings(self, prefix: str | None = None, command: str = "") -> list[Finding]:
        from vsteer.compare import CONTROL

        task = TASK_LABEL[self.spec.task]
        prefix = prefix or "compare"
        arms, out = self.spec.arms, []
        unit = "nats/token"
        what = "test likelihood shift of target over contrast items vs the base"
        n_seeds = len(self.spec.seeds)
        seeds = (
            f"{n_seeds} seeds, each scored on its own {len(self.block(self.first))} test items"
            if self.per_seed
            else f"mean of {n_seeds} seeds"
        )
        if CONTROL in arms:
            out.append(
                Finding(
                    f"{prefix}.control_moves",
                    f"the positive control (all projections) moves {task}",
                    f"{what}, {CONTROL} arm, {seeds} ({unit})",
                    self.effect(CONTROL),
                    command,
                )
            )
        if not self.controlled():
            return out  # underpowered: no verdict from the other arms
        if "v" in arms:
            out.append(
                Finding(
                    f"{prefix}.v_moves",
                    f"a value-only LoRA shifts {task}",
                    f"{what}, v arm, {seeds} ({unit})",
                    self.effect("v"),
                    command,
                )
            )
        if "v" in arms and "qk" in arms:
            out.append(
                Finding(
                    f"{prefix}.v_vs_qk",
                    f"at equal budget, v-only shifts {task} more than qk-only",
                    f"paired difference of shifts, v minus qk ({unit})",
                    self.effect("v", "qk"),
                    command,
                )
            )
        abl = self.ablation()
        if abl and "gap" in abl:
            share_gap = abl["share_gap"]
            out.append(
                Finding(
                    f"{prefix}.value_share",
                    f"{task}: the value path carries the largest share of the positive control's gain",
                    "test shift removed by dropping v's update minus the largest shift removed by dropping "
                    f"another projection type's ({unit}; as shares of the control's shift {share_gap.value:.3g} "
                    f"[{share_gap.low:.3g}, {share_gap.high:.3g}])",
                    abl["gap"],
                    command,
                )
            )
        return out

    def rules(self, prefix: str = "compare") -> dict:
        """Rules from the recipe's ROPE (nats/token), for the shifts and for the ablation's removal gap."""
        from vsteer.verdicts import Rule

        rope = tuple(self.spec.rope)
        out = {
            f"{prefix}.{k}": Rule(0.0, True, rope, what="likelihood shift (nats/token)") for k in KINDS[:3]
        }
        out[f"{prefix}.value_share"] = Rule(0.0, True, rope, what="difference of removed shifts (nats/token)")
        return out

    # ---- tables ----------------------------------------------------------------------------
    def arm_records(self) -> list[dict]:
        rows = []
        base_cost = self.runs[("base",)]
        labels, _ = self._labels("test")
        base_row = {"arm": "base", "lr": "-", "params": 0, "shift": 0.0, "ci_low": 0.0, "ci_high": 0.0}
        base_row.update(self._cost_cols(base_cost, None))
        for arm in self.spec.arms:
            e = self.effect(arm)
            seeds = self.seed_effects(arm)
            tr = self.runs[("train", arm, self.chosen[arm], self.first)]
            row = {
                "arm": arm,
                "lr": self.chosen[arm],
                "params": tr["effective_params"],
                "shift": e.value,
                "ci_low": e.low,
                "ci_high": e.high,
                "seed_sd": float(np.std(seeds, ddof=1)) if len(seeds) > 1 else 0.0,
                **self._seed_item_cols(arm),
                "seeds": " ".join(f"{s:+.3f}" for s in seeds),
                "train_s": float(
                    np.mean(
                        [self.runs[("train", arm, self.chosen[arm], s)]["train_s"] for s in self.spec.seeds]
                    )
                ),
            }
            row.update(self._cost_cols(self.runs[("eval", arm, self.first)], base_cost))
            rows.append(row)
        return [base_row, *rows]

    def _seed_item_cols(self, arm: str) -> dict:
        if len(self.spec.seeds) < 2:
            return {}
        e = self.seed_item_effect(arm)
        return {"seeds_ci_low": e.low, "seeds_ci_high": e.high}

    def _cost_cols(self, ev: dict, base: dict | None) -> dict:
        """Cost columns of a first-seed evaluation ``ev`` (the base's when ``base`` is None)."""
        out = {}
        if "kl" in ev:
            out["kl"] = ev["kl"]
            out["wikitext_ppl"] = ev["wikitext_ppl"]
        if "mmlu_acc" in ev:
            out["mmlu_acc"] = ev["mmlu_acc"]
        if "vader" in ev:
            out["vader"] = float(np.mean(ev["vader"]))
        if self.spec.task == "dpo" and "test" in ev:
            items = self.data.test
            if len(ev["test"]) != len(items):  # a first-seed run scored on its own block
                items = [items[i] for i in self.block(self.first)]
            out["pref_acc"] = preference_accuracy(np.array(ev["test"]), items)
        return out

    def selection_records(self) -> list[dict]:
        from vsteer.compare import val_effect

        base_val = self._base("val")
        rows = []
        for arm in self.spec.arms:
            for lr in self.spec.learning_rates:
                r = self.runs[("train", arm, lr, self.first)]
                rows.append(
                    {
                        "arm": arm,
                        "lr": lr,
                        "val_shift": val_effect(r["val"], base_val, self.data.val),
                        "train_loss": r["train_loss"],
                        "chosen": "yes" if self.chosen[arm] == lr else "",
                    }
                )
        return rows

    def frontier_records(self) -> list[dict]:
        from vsteer.compare import val_effect

        base_val = self._base("val")
        rows = []
        for arm in self.spec.arms:
            ev = self.runs[("eval", arm, self.first)]
            for pt in ev.get("frontier", []):
                rows.append(
                    {
                        "arm": arm,
                        "step": pt["step"],
                        "kl": pt["kl"],
                        "val_shift": val_effect(pt["val"], base_val, self.data.val),
                    }
                )
            tr = self.runs[("train", arm, self.chosen[arm], self.first)]
            if "kl" in ev:
                rows.append(
                    {
                        "arm": arm,
                        "step": self.spec.steps,
                        "kl": ev["kl"],
                        "val_shift": val_effect(tr["val"], base_val, self.data.val),
                    }
                )
        return rows

    def _ablation_scope(self) -> str:
        runs = self._ablation_runs()
        scored = {i for _, ev in runs for i in ev.get("ablation_index", range(len(self.data.test)))}
        n, total = len(scored), len(self.data.test)
        if len(runs) > 1:
            seeds = ", ".join(str(self.spec.seeds[j]) for j, _ in runs)
            return f"seeds {seeds}, each on its own scored items: {n} of the {total} test items, pooled"
        scope = "the test split" if n == total else f"a fixed random {n} of the {total} test items"
        return f"seed {self.spec.seeds[runs[0][0]]}, {scope}"

    def ablation_records(self) -> list[dict]:
        abl = self.ablation()
        if not abl:
            return []
        rows = []
        for proj, e in abl["shares"].items():
            r = abl["removed"][proj]
            rows.append(
                {
                    "dropped": proj,
                    "removed": r.value,
                    "removed_low": r.low,
                    "removed_high": r.high,
                    "share_removed": e.value,
                    "ci_low": e.low,
                    "ci_high": e.high,
                    "rel_update_norm": abl["norms"].get(proj, float("nan")),
                }
            )
        return rows

    def notes(self) -> list[str]:
        from vsteer.compare import CONTROL
        from vsteer.experiments.result import records_to_markdown

        s = self.spec
        notes = [
            f"Task {s.task} on {self.data.describe()}; every arm at an effective budget of {self.budget:,} trainable "
            f"parameters ({'; '.join(self.plans.values())}); {s.steps} steps of {s.batch_size}, precision {s.precision}, "
            f"{len(s.learning_rates)} learning rates {s.learning_rates} tried on seed {self.first} and chosen per arm on the val "
            f"split, then seeds {s.seeds} at the chosen rate scored on the test split; ROPE {s.rope} nats/token, stated in the recipe. "
            "Primary metric: per item, the arm's mean token log p minus the base's, target-label mean minus contrast-label mean "
            "(so a shift in format that moves both labels cancels); "
            + (
                f"each seed's runs scored on their own disjoint block of {len(self.block(self.first))} test items "
                f"({len(self.data.test)} in all, every arm on the same blocks, so arm differences stay paired item by item), "
                "95% bootstrap over all items"
                if self.per_seed
                else "per-item shifts averaged over seeds, 95% bootstrap over items"
            )
            + (" (pairs resampled whole)." if s.task == "dpo" else " (stratified by label).")
            + f" Training precision {s.precision}, scoring precision {s.eval_precision}.",
            "",
        ]
        if len(s.seeds) > 1:
            pairs = [(a, None) for a in s.arms] + ([("v", "qk")] if {"v", "qk"} <= set(s.arms) else [])
            two = "; ".join(
                f"{a if m is None else f'{a} minus {m}'} {self.seed_item_effect(a, m)}" for a, m in pairs
            )
            notes += [
                "The intervals above hold the trained seeds fixed. With seeds resampled as well as items "
                f"(two-level bootstrap over {len(s.seeds)} seeds: crude, but it counts the seed-to-seed spread; "
                f"columns seeds_ci_low/high): {two}. The verdicts use the item intervals.",
                "",
            ]
        if CONTROL in s.arms and not self.controlled():
            e = self.effect(CONTROL)
            notes.append(
                f"**Underpowered**: the positive control's shift {e} does not lie above the ROPE {s.rope}, so no verdict is drawn "
                "from the other arms (that would not be evidence of no effect)."
            )
            notes.append("")
        elif CONTROL not in s.arms:
            notes.append(
                "No positive control among the arms: a null result cannot be told from an underpowered one."
            )
            notes.append("")
        notes += [
            f"Learning-rate selection (val split, seed {self.first}):",
            "",
            records_to_markdown(self.selection_records()),
            "",
        ]
        abl = self.ablation_records()
        if abl:
            notes += [
                f"Projection ablation of the positive control ({self._ablation_scope()}): the "
                "part of its shift removed by dropping one projection type's learned update (nats/token, "
                "and as a share of the control's shift on these items), and the type's relative update "
                "norm ||ΔW||/||W||:",
                "",
                records_to_markdown(abl),
                "",
            ]
        fr = self.frontier_records()
        if fr:
            notes += [
                f"Frontier (val shift vs per-token KL(arm || base) on WikiText-2, over checkpoints; seed {self.first}):",
                "",
                records_to_markdown(fr),
                "",
            ]
        return notes

    # ---- outputs ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        eff = {a: _est(self.effect(a)) for a in self.spec.arms}
        return {
            "spec": self.spec.to_dict(),
            "budget": self.budget,
            "plans": self.plans,
            "chosen_lr": self.chosen,
            "effects": eff,
            "seed_effects": {a: self.seed_effects(a) for a in self.spec.arms},
            "seed_item_effects": (
                {a: _est(self.seed_item_effect(a)) for a in self.spec.arms}
                if len(self.spec.seeds) > 1
                else {}
            ),
            "controlled": self.controlled(),
            "arms": self.arm_records(),
            "selection": self.selection_records(),
            "frontier": self.frontier_records(),
            "ablation": self.ablation_records(),
            "findings": [f.to_dict() for f in self.findings()],
            "seconds": self.seconds,
            "precision": self.spec.precision,
        }

    def to_experiment(self, name: str, title: str, prefix: str, command: str):
        """The main job's view: an :class:`~vsteer.experiments.result.ExperimentResult`."""
        from vsteer.experiments.result import ExperimentResult

        return ExperimentResult(
            name=name,
            title=title,
            records=self.arm_records(),
            findings=self.findings(prefix, command),
            meta={"compare": self.to_dict(), "seconds": self.seconds},
            columns=None,
            notes=self.notes(),
            plotter=lambda recs, path: plot_frontier([(TASK_LABEL[self.spec.task], self)], path),
        )

    def write(self, out_dir: str | os.PathLike) -> Path:
        """Write ``report.md``, ``results.json`` and ``frontier.png`` into ``out_dir``."""
        from vsteer.experiments.result import atomic_write, records_to_markdown
        from vsteer.verdicts import judge_all

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rules = self.rules()
        verdicts = judge_all(self.findings(), rules)
        lines = [f"# Adapter comparison: {self.spec.name}", ""]
        lines += [
            f"- **{v.claim}**: {v.verdict}, {v.holm_verdict} after Holm over the {len(verdicts)} verdicts "
            f"({v.measured} = {v.effect}; rule: {v.rule})"
            for v in verdicts
        ]
        lines += [
            "",
            records_to_markdown(self.arm_records()),
            "",
            *self.notes(),
            "![frontier](frontier.png)",
            "",
            f"Run time {self.seconds:.0f} s.",
        ]
        d = self.to_dict()
        d["verdicts"] = [v.to_dict() if hasattr(v, "to_dict") else str(v) for v in verdicts]
        atomic_write(out / "results.json", json.dumps(d, indent=2, default=str))
        plot_frontier([(TASK_LABEL[self.spec.task], self)], out / "frontier.png")
        return atomic_write(out / "report.md", "\n".join(lines) + "\n")


def plot_frontier(results: list[tuple[str, CompareResult]], path) -> None:
    """One panel per comparison: val shift vs KL over checkpoints, one line per arm; and the
    ablation shares of the positive control when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"v": "tab:red", "qk": "tab:blue", "o": "tab:green", "qkvo": "tab:purple", "all": "black"}
    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(5 * n, 7), squeeze=False)
    for j, (label, res) in enumerate(results):
        ax = axes[0, j]
        fr = res.frontier_records()
        for arm in res.spec.arms:
            pts = sorted((r["kl"], r["val_shift"]) for r in fr if r["arm"] == arm)
            if pts:
                ax.plot(*zip(*[(0.0, 0.0), *pts]), "o-", color=colours.get(arm, "gray"), label=arm)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_xlabel("per-token KL(arm || base), WikiText-2, nats")
        ax.set_ylabel("val likelihood shift, nats/token")
        ax.set_title(f"{label}: metric vs KL over checkpoints")
        ax.legend(fontsize=8)
        ax2 = axes[1, j]
        ab = res.ablation_records()
        if ab:
            names = [r["dropped"] for r in ab]
            vals = [r["removed"] for r in ab]  # the verdict's statistic (shares: results.json)
            err = [
                [r["removed"] - r["removed_low"] for r in ab],
                [r["removed_high"] - r["removed"] for r in ab],
            ]
            ax2.bar(names, vals, yerr=err, color=[colours.get(x, "gray") for x in names])
            ax2.axhline(0, color="gray", lw=0.5)
            ax2.set_ylabel("control's shift removed, nats/token")
            ax2.set_title(f"{label}: projection ablation (positive control)")
        else:
            ax2.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
