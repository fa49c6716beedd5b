"""Claim (c): replacing a token's value vectors with another token's changes its identity.

Counterfactual pairs differ in one entity ("I live in Paris. ..." / "I live in Tokyo. ...").
The donor prompt's activations at a site are patched into the source prompt at every token of
every mention of the entity (positions aligned token by token), at one layer or all layers.
Metric: the share of the clean-to-donor logit difference recovered,

    LD = logit(donor answer) - logit(source answer)     (first answer token, last position)
    recovered = mean(LD_patched - LD_clean) / mean(LD_donor - LD_clean)

a ratio of means over pairs (stable where single pairs have small denominators), with a
bootstrap interval over pairs. 1 means the patched source answers like the donor.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

from vsteer.arch import get_arch
from vsteer.encoding import pad_batch, pad_token_id, to_numpy
from vsteer.errors import DataError
from vsteer.evaluate import bootstrap, finding
from vsteer.experiments.common import batched, forward_logits, progress, require_items, rng
from vsteer.experiments.result import ExperimentResult
from vsteer.hooks import capture, intervene, replace
from vsteer.models import model_device
from vsteer.sites import check_site_name

PATCH_SITES = ("v", "k", "q", "z", "resid")
THRESHOLD = 0.5


@dataclass(frozen=True)
class CounterfactualPair:
    """Two prompts that differ only in one entity (every mention of it), and their answers."""

    source: str
    donor: str
    source_entity: str
    donor_entity: str
    source_answer: str
    donor_answer: str
    relation: str = ""


@dataclass
class AlignedPair:
    """A pair tokenised: equal-length ids, the entity token positions, the answers' first tokens."""

    pair: CounterfactualPair
    source_ids: list[int]
    donor_ids: list[int]
    positions: list[int]
    source_answer_id: int
    donor_answer_id: int


def _entity_positions(tokenizer, text: str, entity: str) -> tuple[list[int], list[int]]:
    spans = [(m.start(), m.end()) for m in re.finditer(re.escape(entity), text)]
    if not spans:
        raise DataError(f"entity {entity!r} does not occur in prompt {text!r}")
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    pos = [i for i, (s, e) in enumerate(offsets) if e > s and any(s < b and e > a for a, b in spans)]
    return ids, pos


def answer_token(tokenizer, answer: str) -> int:
    """First token of the answer as it follows the prompt (with its leading space)."""
    ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"answer {answer!r} tokenises to nothing")
    return int(ids[0])


def align_pair(tokenizer, pair: CounterfactualPair) -> AlignedPair:
    """Tokenise a pair and check that its prompts align token by token outside the entity."""
    src_ids, src_pos = _entity_positions(tokenizer, pair.source, pair.source_entity)
    don_ids, don_pos = _entity_positions(tokenizer, pair.donor, pair.donor_entity)
    if len(src_pos) != len(don_pos) or src_pos != don_pos or len(src_ids) != len(don_ids):
        raise DataError(
            f"counterfactual pair does not align: {pair.source_entity!r} spans {len(src_pos)} tokens at "
            f"{src_pos} of {len(src_ids)}, {pair.donor_entity!r} spans {len(don_pos)} at {don_pos} of "
            f"{len(don_ids)}; entities must tokenise to the same number of tokens at the same positions"
        )
    outside = [i for i in range(len(src_ids)) if i not in set(src_pos)]
    if any(src_ids[i] != don_ids[i] for i in outside):
        raise DataError(
            f"counterfactual pair does not align: {pair.source!r} and {pair.donor!r} differ outside "
            f"the entity tokens"
        )
    a_src, a_don = answer_token(tokenizer, pair.source_answer), answer_token(tokenizer, pair.donor_answer)
    if a_src == a_don:
        raise DataError(
            f"answers {pair.source_answer!r} and {pair.donor_answer!r} share their first token; "
            f"the pair cannot tell them apart"
        )
    return AlignedPair(pair, src_ids, don_ids, src_pos, a_src, a_don)


# the issue's own example prompt for cities; otherwise the relation's first template
DEFAULT_TEMPLATES = {"city_country": "I live in {}. The country I live in is"}


def _template(relation: str, template: str | None) -> str:
    if template is None:
        template = DEFAULT_TEMPLATES.get(relation)
    if template is None:
        from vsteer.data import relation_template

        template = relation_template(relation)[0]
    if "{subject}" in template:
        template = template.replace("{subject}", "{}")
    if "{}" not in template:
        raise DataError(f"template {template!r} has no '{{}}' slot for the entity")
    return template


def pairs_from_facts(
    tokenizer,
    relation: str,
    template: str | None = None,
    facts: list | None = None,
    n_pairs: int | None = None,
    seed: int = 0,
) -> list[AlignedPair]:
    """Counterfactual pairs from a fact list: each fact is the source once, its donor a fact whose
    entity has the same token length in the prompt and whose answer starts with another token."""
    template = _template(relation, template)
    if facts is None:
        from vsteer.data import facts as load_facts

        facts = load_facts(relation)
    require_items(facts, f"fact list {relation!r}")
    seen, items = set(), []
    for f in facts:
        subject, answer = (f.subject, f.answer) if hasattr(f, "subject") else f
        if subject in seen:
            continue
        seen.add(subject)
        prompt = template.format(subject)
        ids, pos = _entity_positions(tokenizer, prompt, subject)
        items.append((subject, answer, prompt, len(ids), tuple(pos), answer_token(tokenizer, answer)))
    order = rng(seed).permutation(len(items))
    groups: dict = {}
    for i in order:
        it = items[i]
        groups.setdefault((it[3], it[4]), []).append(it)
    out = []
    for group in groups.values():
        for j, src in enumerate(group):
            for k in range(1, len(group)):
                don = group[(j + k) % len(group)]
                if don[5] == src[5]:
                    continue
                pair = CounterfactualPair(src[2], don[2], src[0], don[0], src[1], don[1], relation)
                try:
                    out.append(align_pair(tokenizer, pair))
                    break
                except DataError:
                    continue
    if not out:
        raise DataError(f"no counterfactual pairs of equal entity length in relation {relation!r}")
    out.sort(key=lambda p: p.pair.source_entity)
    if n_pairs is not None and n_pairs < len(out):
        idx = np.sort(rng(seed).choice(len(out), size=n_pairs, replace=False))
        out = [out[i] for i in idx]
    return out


def aligned_pairs(tokenizer, pairs) -> list[AlignedPair]:
    """Aligned pairs from :class:`AlignedPair`s (as :func:`pairs_from_facts` returns them, kept),
    :class:`CounterfactualPair`s, dicts, a JSONL path or a ``datasets.Dataset`` of rows with the fields
    of :class:`CounterfactualPair` (``source``, ``donor``, ``source_entity``, ``donor_entity``,
    ``source_answer``, ``donor_answer``, optional ``relation``)."""
    from pathlib import Path

    from vsteer.data.user import validate

    if (
        isinstance(pairs, str | Path)
        or hasattr(pairs, "_fingerprint")
        or (isinstance(pairs, list | tuple) and pairs and all(isinstance(p, dict) for p in pairs))
    ):
        pairs = [CounterfactualPair(**row) for row in validate(pairs, "patching")]
    out = []
    for i, p in enumerate(require_items(pairs, "counterfactual pairs")):
        if isinstance(p, AlignedPair):
            out.append(p)
        elif isinstance(p, CounterfactualPair):
            out.append(align_pair(tokenizer, p))
        else:
            raise DataError(
                f"counterfactual pair {i} is a {type(p).__name__}; expected an AlignedPair (pairs_from_facts), "
                f"a CounterfactualPair or a dict with {', '.join(f.name for f in fields(CounterfactualPair))}"
            )
    return out


@dataclass
class PatchConfig:
    """What to patch. Every site in ``sites`` is patched at all layers at once; the sites in
    ``sweep_sites`` are also patched at each layer of ``layers`` alone (None: every layer; the
    default is ``n_sweep`` evenly spaced layers, to keep a CPU run in minutes).
    ``n_pairs``: pairs per relation (None: every pair the whole fact set gives)."""

    relations: tuple[str, ...] = ("city_country", "animal_class")
    sites: tuple[str, ...] = PATCH_SITES
    sweep_sites: tuple[str, ...] = ("v", "resid")
    layers: list[int] | None = None
    n_sweep: int = 6
    n_pairs: int | None = None
    batch_size: int = 64
    templates: dict = field(default_factory=dict)

    def sweep_layers(self, n_layers: int) -> list[int]:
        if self.layers is not None:
            return list(self.layers)
        return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(self.n_sweep, n_layers))})


def _logit_diff(logits: torch.Tensor, src: torch.Tensor, don: torch.Tensor) -> np.ndarray:
    last = logits[:, -1]
    return to_numpy(last.gather(1, don[:, None]) - last.gather(1, src[:, None]))[:, 0].astype(np.float64)


def patch_pairs(
    model: nn.Module,
    tokenizer,
    pairs: list[AlignedPair],
    sites=PATCH_SITES,
    layers: list[int] | None = None,
    sweep_sites=None,
    batch_size: int = 64,
    progress_bar: bool | None = None,
) -> dict:
    """Run clean, donor and patched forwards. Returns per-pair arrays:
    ``clean``, ``donor`` (LD, ``[n]``), ``patched[(site, layer or "all")]`` (LD, ``[n]``) and
    ``top_is_donor[(site, layer)]`` (bool, the patched top-1 token is the donor answer)."""
    arch = get_arch(model)
    require_items(pairs, "counterfactual pairs")
    for s in sites:
        check_site_name(s)
    layers = list(range(arch.n_layers)) if layers is None else [arch.check_layer(x) for x in layers]
    sweep_sites = sites if sweep_sites is None else sweep_sites
    configs = [(s, layer) for s in sweep_sites for layer in layers] + [(s, "all") for s in sites]
    pad, device = pad_token_id(tokenizer), model_device(model)
    out = {"clean": [], "donor": [], "donor_top": [], "patched": {c: [] for c in configs}}
    out["top_is_donor"] = {c: [] for c in configs}
    chunks = list(batched(pairs, batch_size))
    all_sites = [(s, layer) for s in sites for layer in range(arch.n_layers)]
    for chunk in progress(chunks, "patching", progress_bar):
        src = pad_batch([p.source_ids for p in chunk], pad, device=device)
        don = pad_batch([p.donor_ids for p in chunk], pad, device=device)
        width = src["input_ids"].shape[1]
        positions = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, p in enumerate(chunk):
            shift = width - len(p.source_ids)
            positions[row, [shift + i for i in p.positions]] = True
        a_src = torch.tensor([p.source_answer_id for p in chunk], device=device)
        a_don = torch.tensor([p.donor_answer_id for p in chunk], device=device)
        clean = forward_logits(model, last_only=True, **src)
        with torch.no_grad(), capture(model, all_sites) as acts:
            donor = forward_logits(model, last_only=True, **don)
        out["clean"].append(_logit_diff(clean, a_src, a_don))
        out["donor"].append(_logit_diff(donor, a_src, a_don))
        out["donor_top"].append(to_numpy(donor[:, -1].argmax(-1) == a_don))
        for site, layer in configs:
            targets = range(arch.n_layers) if layer == "all" else [layer]
            ops = {(site, t): replace(acts[(site, t)], positions=positions) for t in targets}
            with intervene(model, ops):
                logits = forward_logits(model, last_only=True, **src)
            out["patched"][(site, layer)].append(_logit_diff(logits, a_src, a_don))
            out["top_is_donor"][(site, layer)].append(to_numpy(logits[:, -1].argmax(-1) == a_don))
    cat = np.concatenate
    return {
        "clean": cat(out["clean"]),
        "donor": cat(out["donor"]),
        "donor_top": cat(out["donor_top"]),
        "patched": {c: cat(v) for c, v in out["patched"].items()},
        "top_is_donor": {c: cat(v) for c, v in out["top_is_donor"].items()},
    }


def _ratio_of_means(x: np.ndarray) -> float:
    den = x[:, 1].mean()
    return float(x[:, 0].mean() / den) if den != 0 else float("nan")


def recovered_fraction(patched, clean, donor, seed: int = 0, n_boot: int = 2000):
    """Ratio of means ``mean(patched - clean) / mean(donor - clean)`` with a bootstrap CI over pairs."""
    x = np.stack([patched - clean, donor - clean], axis=1)
    return bootstrap(x, statistic=_ratio_of_means, seed=seed, n_boot=n_boot)


def run_patching(
    model: nn.Module,
    tokenizer,
    config: PatchConfig | None = None,
    pairs=None,
    seed: int = 0,
    progress_bar: bool | None = None,
) -> ExperimentResult:
    """Patch each site at each layer (and all layers) at the entity positions of each pair.

    ``pairs``: your own counterfactual pairs, anything :func:`aligned_pairs` takes (what
    :func:`pairs_from_facts` returns, :class:`CounterfactualPair`s, a JSONL path or a ``datasets.Dataset``
    of ``patching`` rows); each must align, or a :class:`DataError` names it. By default pairs are
    built from the package's fact lists for ``config.relations``.
    """
    config = config or PatchConfig()
    arch = get_arch(model)
    for s in config.sites:
        check_site_name(s)
    if pairs is not None:
        groups = {}
        for p in aligned_pairs(tokenizer, pairs):
            groups.setdefault(p.pair.relation or "custom", []).append(p)
    else:
        require_items(config.relations, "relations")
        groups = {
            r: pairs_from_facts(tokenizer, r, config.templates.get(r), n_pairs=config.n_pairs, seed=seed)
            for r in config.relations
        }
    layers = sorted({arch.check_layer(x) for x in config.sweep_layers(arch.n_layers)})
    sweep = [s for s in config.sweep_sites if s in config.sites]
    runs = {
        r: patch_pairs(model, tokenizer, ps, config.sites, layers, sweep, config.batch_size, progress_bar)
        for r, ps in groups.items()
    }
    records = []
    for rel, res in runs.items():
        for site in config.sites:
            for layer in [*(layers if site in sweep else []), "all"]:
                key = (site, layer)
                full = layer == "all"
                est = recovered_fraction(
                    res["patched"][key], res["clean"], res["donor"], seed, 2000 if full else 500
                )
                top = res["top_is_donor"][key]
                records.append(
                    {
                        "relation": rel,
                        "site": site,
                        "layer": layer,
                        "n_pairs": int(len(top)),
                        "recovered": est.value,
                        "ci_low": est.low,
                        "ci_high": est.high,
                        "top1_donor_answer": float(top.mean()),
                    }
                )
    pooled = {
        key: np.concatenate([res[key] for res in runs.values()]) for key in ("clean", "donor", "donor_top")
    }
    pooled_patch = {
        c: np.concatenate([res["patched"][c] for res in runs.values()])
        for c in [(s, "all") for s in config.sites]
    }
    verdicts, headline = [], {}
    for site in config.sites:
        headline[site] = recovered_fraction(
            pooled_patch[(site, "all")], pooled["clean"], pooled["donor"], seed
        )
    if "v" in config.sites:
        cmd = "vsteer patch"
        e = headline["v"]
        verdicts.append(
            finding(
                "patching.v_recovers",
                claim="patching the donor entity's value vectors (all layers, entity tokens only) makes "
                "the model answer for the donor entity",
                measured=f"recovered share of the clean→donor logit difference, {len(pooled['clean'])} pairs "
                f"({', '.join(runs)})",
                effect=e,
                command=cmd,
            )
        )
        for rel, res in runs.items():
            er = recovered_fraction(res["patched"][("v", "all")], res["clean"], res["donor"], seed)
            verdicts.append(
                finding(
                    "patching.v_recovers",
                    claim=f"same, relation {rel}",
                    measured=f"recovered share, v all layers, {len(res['clean'])} pairs",
                    effect=er,
                    command=cmd,
                )
            )
    lines = [
        "| site (all layers, entity tokens) | recovered [95% CI] | top-1 = donor answer |",
        "|---|---|---|",
    ]
    for site, e in headline.items():
        top = np.concatenate([res["top_is_donor"][(site, "all")] for res in runs.values()])
        lines.append(f"| {site} | {e} | {top.mean():.2f} |")
    notes = [
        f"Donor run itself: top-1 = donor answer on {pooled['donor_top'].mean():.2f} of pairs; "
        f"mean LD clean {pooled['clean'].mean():.3g}, donor {pooled['donor'].mean():.3g} "
        "(LD = logit(donor answer) − logit(source answer), first answer token).",
        "",
        "\n".join(lines),
    ]
    meta = {
        "config": {**asdict(config), "relations": list(runs)},
        "seed": seed,
        "pairs": {
            r: [
                {"source": p.pair.source_entity, "donor": p.pair.donor_entity, "positions": p.positions}
                for p in ps
            ]
            for r, ps in groups.items()
        },
        "headline": {s: e.to_dict() for s, e in headline.items()},
        "n_layers": arch.n_layers,
    }
    return ExperimentResult(
        name="patching",
        title="Claim (c): patching a token's value vectors from another entity changes the answer",
        records=records,
        findings=verdicts,
        meta=meta,
        columns=[
            "relation",
            "site",
            "layer",
            "n_pairs",
            "recovered",
            "ci_low",
            "ci_high",
            "top1_donor_answer",
        ],
        notes=notes,
        plotter=_plot,
    )


def _plot(records, path) -> None:
    import matplotlib.pyplot as plt

    rels = list(dict.fromkeys(r["relation"] for r in records))
    fig, axes = plt.subplots(1, len(rels), figsize=(6.5 * len(rels), 4.2), squeeze=False)
    for ax, rel in zip(axes[0], rels):
        rows = [r for r in records if r["relation"] == rel]
        for site in dict.fromkeys(r["site"] for r in rows):
            per = [r for r in rows if r["site"] == site and r["layer"] != "all"]
            full = next(r for r in rows if r["site"] == site and r["layer"] == "all")
            x = [r["layer"] for r in per]
            line = ax.plot(x, [r["recovered"] for r in per], marker=".", label=f"{site}")[0]
            ax.fill_between(
                x, [r["ci_low"] for r in per], [r["ci_high"] for r in per], alpha=0.15, color=line.get_color()
            )
            ax.axhline(full["recovered"], color=line.get_color(), ls="--", lw=1)
        ax.axhline(THRESHOLD, color="k", lw=0.6, ls=":")
        ax.set_title(f"{rel}: single-layer patches (dashed: all layers)")
        ax.set_xlabel("layer")
        ax.set_ylabel("recovered share of logit difference")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
