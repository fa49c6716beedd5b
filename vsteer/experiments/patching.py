"""Claim (c): replacing a token's value vectors with another token's changes its identity.

Counterfactual pairs differ in one entity ("I live in Paris. ..." / "I live in Tokyo. ...").
Metric: the share of the clean-to-donor logit difference recovered,

    LD = logit(donor answer) - logit(source answer)     (first answer token, last position)
    recovered = mean(LD_patched - LD_clean) / mean(LD_donor - LD_clean)

a ratio of means over pairs (stable where single pairs have small denominators), with a
bootstrap interval over pairs. 1 means the patched source answers like the donor.

The claim as the document states it, "replacing a *single* value vector", is tested with one
layer and one position: the donor's activation at the entity's last token, at one layer. The
pairs are split (per relation, seeded) into a selection split, on which each site's layer is
chosen (the candidate layer with the largest pooled recovered share), and a held-out split, on
which that one patch is reported for ``v``, ``k``, ``q`` and ``resid``: the share of pairs whose
top-1 token becomes the donor's answer (Wilson interval) and the recovered share (bootstrap).
The control patches, at v's layer and position, the value vector of an unrelated entity: another
entity of the same relation and template whose answer differs from both answers of the pair.

The loose form (the donor's activations at every token of every mention of the entity, at every
layer, and optionally at one layer) is kept as context: at ``v`` it is close to guaranteed by
construction, since with keys kept those values are the only content path from the entity.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from functools import partial

import numpy as np
import torch
from torch import nn

from vsteer.arch import get_arch
from vsteer.encoding import pad_batch, pad_token_id, to_numpy
from vsteer.errors import DataError
from vsteer.evaluate import Estimate, bootstrap, finding, paired_difference, wilson_interval
from vsteer.experiments.common import forward_logits, progress, require_items, rng
from vsteer.experiments.result import ExperimentResult
from vsteer.hooks import capture, captured_forward, intervene, replace
from vsteer.models import model_device
from vsteer.sites import check_site_name

PATCH_SITES = ("v", "k", "q", "z", "resid")
SINGLE_SITES = ("v", "k", "q", "resid")
CONTROL = "v:control"  # label of the control patch (v from an unrelated entity) in results
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
    """What to patch.

    The single-vector test: each site in ``single_sites`` is patched at the entity's last token
    at one layer; its layer is chosen among ``single_layers`` (None: ``n_single`` evenly spaced
    layers, None too: every layer) on a selection split of ``select_fraction`` of each relation's
    pairs and reported on the rest. ``()`` skips the test (and the split).

    Context: every site in ``sites`` is patched at all entity tokens of all layers at once; the
    sites in ``sweep_sites`` also at all entity tokens of each layer of ``layers`` alone (None:
    ``n_sweep`` evenly spaced layers). ``n_pairs``: pairs per relation (None: every pair the whole
    fact set gives)."""

    relations: tuple[str, ...] = ("city_country", "animal_class")
    sites: tuple[str, ...] = PATCH_SITES
    # the one-layer all-entity-token sweep is superseded by the single-position sweep below
    # (which also draws the plot); () keeps a CPU run within its budget
    sweep_sites: tuple[str, ...] = ()
    layers: list[int] | None = None
    n_sweep: int = 6
    n_pairs: int | None = None
    batch_size: int = 64
    templates: dict = field(default_factory=dict)
    # every layer is a candidate (v's peak is one layer wide on SmolLM2: a grid can miss it); a
    # small selection split pays for that, the held-out split keeps the rest
    single_sites: tuple[str, ...] = SINGLE_SITES
    single_layers: list[int] | None = None
    n_single: int | None = None
    select_fraction: float = 0.125

    def sweep_layers(self, n_layers: int) -> list[int]:
        if self.layers is not None:
            return list(self.layers)
        return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(self.n_sweep, n_layers))})

    def single_candidates(self, n_layers: int) -> list[int]:
        """Candidate layers of the single-vector test."""
        if self.single_layers is not None:
            return list(self.single_layers)
        if self.n_single is None or self.n_single >= n_layers:
            return list(range(n_layers))
        return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, self.n_single)})


def _logit_diff(logits: torch.Tensor, src: torch.Tensor, don: torch.Tensor) -> np.ndarray:
    last = logits[:, -1]
    return to_numpy(last.gather(1, don[:, None]) - last.gather(1, src[:, None]))[:, 0].astype(np.float64)


def _top_is(logits: torch.Tensor, answer: torch.Tensor) -> np.ndarray:
    return to_numpy(logits[:, -1].argmax(-1) == answer)


def patch_pairs(
    model: nn.Module,
    tokenizer,
    pairs: list[AlignedPair],
    sites=PATCH_SITES,
    layers: list[int] | None = None,
    sweep_sites=None,
    batch_size: int = 64,
    progress_bar: bool | None = None,
    last_token=(),
    controls: list[tuple[list[int], int]] | None = None,
    control_sites=(),
) -> dict:
    """Run clean, donor and patched forwards. Returns per-pair arrays:
    ``clean``, ``donor`` (LD, ``[n]``), ``clean_top``/``donor_top`` (bool ``[n]``: that run's top-1
    token is the donor answer), ``patched[(site, layer or "all")]`` (LD, ``[n]``, the donor's
    activations at every entity token) and ``top_is_donor[(site, layer)]`` (bool ``[n]``).

    ``last_token``: ``(site, layer)``s patched one at a time at the entity's last token only:
    ``last[(site, layer)]`` (LD) and ``last_top[(site, layer)]``.
    ``controls``: per pair, ``(token ids, position)`` of another prompt and the token there;
    that prompt's activation at each ``(site, layer)`` of ``control_sites`` replaces the pair's at
    its entity's last token: ``control[(site, layer)]`` (LD towards the pair's donor answer)
    and ``control_top[(site, layer)]``."""
    arch = get_arch(model)
    require_items(pairs, "counterfactual pairs")
    for s in sites:
        check_site_name(s)
    layers = list(range(arch.n_layers)) if layers is None else [arch.check_layer(x) for x in layers]
    sweep_sites = sites if sweep_sites is None else sweep_sites
    configs = [(s, layer) for s in sweep_sites for layer in layers] + [(s, "all") for s in sites]
    last_token = [(check_site_name(s), arch.check_layer(layer)) for s, layer in last_token]
    control_sites = [(check_site_name(s), arch.check_layer(layer)) for s, layer in control_sites]
    if control_sites and (controls is None or len(controls) != len(pairs)):
        raise DataError(
            f"control patches need one control prompt per pair: {len(pairs)} pairs, "
            f"{'no' if controls is None else len(controls)} control prompts"
        )
    pad, device = pad_token_id(tokenizer), model_device(model)
    out = {"clean": [], "donor": [], "clean_top": [], "donor_top": []}
    for key in ("patched", "top_is_donor"):
        out[key] = {c: [] for c in configs}
    for key in ("last", "last_top"):
        out[key] = {c: [] for c in last_token}
    for key in ("control", "control_top"):
        out[key] = {c: [] for c in control_sites}
    captured = [(s, layer) for s in sites for layer in range(arch.n_layers)] + last_token
    captured = list(dict.fromkeys(captured))
    for start in progress(range(0, len(pairs), batch_size), "patching", progress_bar):
        chunk = pairs[start : start + batch_size]
        src = pad_batch([p.source_ids for p in chunk], pad, device=device)
        don = pad_batch([p.donor_ids for p in chunk], pad, device=device)
        width = src["input_ids"].shape[1]
        positions = torch.zeros(len(chunk), width, dtype=torch.bool)
        last = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, p in enumerate(chunk):
            shift = width - len(p.source_ids)
            positions[row, [shift + i for i in p.positions]] = True
            last[row, shift + p.positions[-1]] = True
        a_src = torch.tensor([p.source_answer_id for p in chunk], device=device)
        a_don = torch.tensor([p.donor_answer_id for p in chunk], device=device)
        clean = forward_logits(model, last_only=True, **src)
        acts = {}
        if captured:
            with torch.no_grad(), capture(model, captured) as acts:
                donor = forward_logits(model, last_only=True, **don)
        else:
            donor = forward_logits(model, last_only=True, **don)
        out["clean"].append(_logit_diff(clean, a_src, a_don))
        out["donor"].append(_logit_diff(donor, a_src, a_don))
        out["clean_top"].append(_top_is(clean, a_don))
        out["donor_top"].append(_top_is(donor, a_don))

        def run(ops, ld_key, top_key, config, src=src, a_src=a_src, a_don=a_don):
            with intervene(model, ops):
                logits = forward_logits(model, last_only=True, **src)
            out[ld_key][config].append(_logit_diff(logits, a_src, a_don))
            out[top_key][config].append(_top_is(logits, a_don))

        for site, layer in configs:
            targets = range(arch.n_layers) if layer == "all" else [layer]
            ops = {(site, t): replace(acts[(site, t)], positions=positions) for t in targets}
            run(ops, "patched", "top_is_donor", (site, layer))
        for c in last_token:
            run({c: replace(acts[c], positions=last)}, "last", "last_top", c)
        if control_sites:
            ctrl = controls[start : start + len(chunk)]
            cb = pad_batch([ids for ids, _ in ctrl], pad, device=device)
            c_width = cb["input_ids"].shape[1]
            rows = torch.arange(len(chunk))
            at_src = torch.tensor([width - len(p.source_ids) + p.positions[-1] for p in chunk])
            at_ctrl = torch.tensor([c_width - len(ids) + pos for ids, pos in ctrl])
            cacts = captured_forward(model, control_sites, **cb)
            for c in control_sites:
                got = cacts[c]  # [batch, c_width, ...]: moved to the pair's last entity token
                rep = got.new_zeros((len(chunk), width, *got.shape[2:]))
                rep[rows, at_src] = got[rows, at_ctrl]
                run({c: replace(rep, positions=last)}, "control", "control_top", c)
    cat = np.concatenate
    res = {k: cat(out[k]) for k in ("clean", "donor", "clean_top", "donor_top")}
    for key in ("patched", "top_is_donor", "last", "last_top", "control", "control_top"):
        res[key] = {c: cat(v) for c, v in out[key].items()}
    return res


def _ratio_of_means(x: np.ndarray) -> float:
    den = x[:, 1].mean()
    return float(x[:, 0].mean() / den) if den != 0 else float("nan")


def recovered_fraction(patched, clean, donor, seed: int = 0, n_boot: int = 2000):
    """Ratio of means ``mean(patched - clean) / mean(donor - clean)`` with a bootstrap CI over pairs."""
    x = np.stack([patched - clean, donor - clean], axis=1)
    return bootstrap(x, statistic=_ratio_of_means, seed=seed, n_boot=n_boot)


def _share_difference(x: np.ndarray) -> float:
    den = x[:, 2].mean()
    return float((x[:, 0].mean() - x[:, 1].mean()) / den) if den != 0 else float("nan")


def share_difference(a, b, clean, donor, seed: int = 0, n_boot: int = 2000) -> Estimate:
    """``recovered(a) - recovered(b)`` for two patches of the same pairs, bootstrapped over pairs
    (both shares from the same resamples)."""
    x = np.stack([a - clean, b - clean, donor - clean], axis=1)
    return bootstrap(x, statistic=_share_difference, seed=seed, n_boot=n_boot)


def share_ratio(a, b, clean, seed: int = 0, n_boot: int = 2000) -> Estimate:
    """``mean(a - clean) / mean(b - clean)``: what patch ``a`` recovers as a share of what ``b``
    recovers on the same pairs, bootstrapped over pairs."""
    return bootstrap(
        np.stack([a - clean, b - clean], axis=1), statistic=_ratio_of_means, seed=seed, n_boot=n_boot
    )


def rate(hits: np.ndarray) -> Estimate:
    """A share of pairs (bool ``[n]``) with its Wilson 95% interval."""
    k, n = int(np.sum(hits)), len(hits)
    if n == 0:
        raise ValueError("cannot take a rate of no pairs")
    low, high = wilson_interval(k, n)
    return Estimate(k / n, low, high, n, "wilson")


def split_pairs(groups: dict, fraction: float, seed: int = 0) -> dict[str, tuple[list[int], list[int]]]:
    """Per relation, the sorted indices of its selection and held-out pairs: a seeded draw of
    ``round(fraction * n)`` pairs selects (at least one, and at least one is held out, when n >= 2;
    a relation of one pair is held out). Depends only on each relation's pair count and the seed."""
    if not 0 < fraction < 1:
        raise DataError(f"select_fraction must lie strictly between 0 and 1, got {fraction}")
    out = {}
    for r, ps in groups.items():
        n = len(ps)
        n_sel = 0 if n < 2 else min(n - 1, max(1, int(round(fraction * n))))
        order = rng(seed).permutation(n)
        out[r] = (sorted(order[:n_sel].tolist()), sorted(order[n_sel:].tolist()))
    if not any(sel for sel, _ in out.values()):
        counts = ", ".join(f"{r}: {len(ps)}" for r, ps in groups.items())
        raise DataError(
            f"the single-vector test needs a relation with at least 2 pairs (a selection and a held-out "
            f"split), got {counts}; add pairs or set single_sites=() to skip it"
        )
    return out


def control_prompts(groups: dict, seed: int = 0) -> dict[str, list[tuple[list[int], int, str] | None]]:
    """Per relation and pair, the unrelated entity whose values the control patches in:
    ``(token ids of its prompt, position of its last token, entity)``, drawn (seeded) among the
    entities of the relation's other pairs (the same template) that are neither of the pair's
    entities and whose answer starts with neither of its answers' tokens; failing that, among
    another relation's; None where no entity qualifies."""
    prompts = {}  # relation -> one (ids, last position, entity, answer id) per entity
    for r, ps in groups.items():
        seen: dict = {}
        for p in ps:
            for ids, ent, ans in (
                (p.source_ids, p.pair.source_entity, p.source_answer_id),
                (p.donor_ids, p.pair.donor_entity, p.donor_answer_id),
            ):
                seen.setdefault(ent, (ids, p.positions[-1], ent, ans))
        prompts[r] = list(seen.values())
    gen = rng(seed + 1)
    out = {}
    for r, ps in groups.items():
        rows = []
        for p in ps:
            ents = {p.pair.source_entity, p.pair.donor_entity}
            answers = {p.source_answer_id, p.donor_answer_id}
            cands = [c for c in prompts[r] if c[2] not in ents and c[3] not in answers]
            if not cands:
                cands = [
                    c
                    for q, cs in prompts.items()
                    if q != r
                    for c in cs
                    if c[2] not in ents and c[3] not in answers
                ]
            rows.append(cands[int(gen.integers(len(cands)))][:3] if cands else None)
        out[r] = rows
    return out


def choose_layers(runs: dict, sites, layers) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Per site, the layer of ``layers`` whose last-token patch (``runs[relation]["last"]``, from
    :func:`patch_pairs` on the selection split only) recovers the largest share of the logit
    difference pooled over the relations, and the shares ``[len(layers)]``. Ties: earliest layer."""
    require_items(list(runs), "selection-split runs")
    cat = np.concatenate
    clean = cat([res["clean"] for res in runs.values()])
    den = float((cat([res["donor"] for res in runs.values()]) - clean).mean())
    chosen, shares = {}, {}
    for s in sites:
        gain = np.array(
            [(cat([res["last"][(s, x)] for res in runs.values()]) - clean).mean() for x in layers]
        )
        shares[s] = gain / den if den != 0 else gain  # den == 0: no share; the gain still orders layers
        chosen[s] = int(layers[int(np.argmax(shares[s]))])
    return chosen, shares


def _merge(n: int, parts) -> dict:
    """Per-pair results of :func:`patch_pairs` on disjoint index sets, back in the pairs' order."""
    parts = [(np.asarray(idx), res) for idx, res in parts if res is not None and len(idx)]
    first = parts[0][1]

    def fill(get):
        arr = np.empty(n, dtype=get(first).dtype)
        for idx, res in parts:
            arr[idx] = get(res)
        return arr

    out = {k: fill(lambda res, k=k: res[k]) for k in ("clean", "donor", "clean_top", "donor_top")}
    for key in ("patched", "top_is_donor"):
        out[key] = {c: fill(lambda res, key=key, c=c: res[key][c]) for c in first[key]}
    return out


def _layer_list(layers) -> str:
    layers = list(layers)
    steps = {b - a for a, b in zip(layers, layers[1:])}
    if len(layers) > 3 and len(steps) == 1:
        return f"{layers[0]}, {layers[1]}, …, {layers[-1]}"
    return ", ".join(map(str, layers))


def _single_test(groups, split, sel_runs, held_runs, chosen, shares, cands, controls, seed) -> dict:
    """Records, findings, notes and plot data of the single-vector test (held-out split)."""
    cat = np.concatenate
    sites = list(chosen)
    has_ctrl = bool(held_runs) and all(("v", chosen.get("v")) in res["control"] for res in held_runs.values())
    n_sel = sum(len(sel) for sel, _ in split.values())
    sel_clean = cat([res["clean"] for res in sel_runs.values()])
    sel_donor = cat([res["donor"] for res in sel_runs.values()])
    sweep = {}
    for s in sites:
        ests = [
            recovered_fraction(
                cat([res["last"][(s, x)] for res in sel_runs.values()]), sel_clean, sel_donor, seed, 500
            )
            for x in cands
        ]
        sweep[s] = {
            "layers": list(cands),
            "recovered": [float(v) for v in shares[s]],
            "low": [e.low for e in ests],
            "high": [e.high for e in ests],
        }
    scopes = {"pooled": list(held_runs.values()), **{r: [res] for r, res in held_runs.items()}}
    records, pooled = [], {}
    for scope, runs in scopes.items():
        clean = cat([res["clean"] for res in runs])
        donor = cat([res["donor"] for res in runs])
        entries = [(s, chosen[s], "last", "last_top", (s, chosen[s])) for s in sites]
        if has_ctrl:
            entries.append((CONTROL, chosen["v"], "control", "control_top", ("v", chosen["v"])))
        for label, layer, ld_key, top_key, key in entries:
            ld = cat([res[ld_key][key] for res in runs])
            top = cat([res[top_key][key] for res in runs])
            rec, flip = recovered_fraction(ld, clean, donor, seed), rate(top)
            knows = cat([res["donor_top"] for res in runs])  # pairs the donor run answers with its answer
            flip_known = rate(top[knows]) if knows.any() else None
            if scope == "pooled":
                pooled[label] = {
                    "ld": ld,
                    "top": top,
                    "recovered": rec,
                    "flip": flip,
                    "layer": layer,
                    "flip_known": flip_known,
                }
            sel_share = sweep[label]["recovered"][cands.index(layer)] if label in sweep else None
            records.append(
                {
                    "relation": scope,
                    "site": label,
                    "layer": layer,
                    "n_pairs": int(len(ld)),
                    "recovered": rec.value,
                    "ci_low": rec.low,
                    "ci_high": rec.high,
                    "top1_donor_answer": flip.value,
                    "top1_low": flip.low,
                    "top1_high": flip.high,
                    "top1_where_donor_run_gives_it": None if flip_known is None else flip_known.value,
                    "selection_recovered": sel_share,
                }
            )
    held = list(held_runs.values())
    clean, donor = cat([res["clean"] for res in held]), cat([res["donor"] for res in held])
    n_held = len(clean)
    cmd = "vsteer run recipes/claims.yaml --only patching"
    where = f"{n_held} held-out pairs ({', '.join(held_runs)}), layer chosen on {n_sel} selection pairs"
    findings = []
    if "v" in pooled:
        v = pooled["v"]
        if has_ctrl:
            c = pooled[CONTROL]
            findings.append(
                finding(
                    "patching.v_single_flips",
                    claim="replacing a single value vector (one layer, the entity's last token) with the donor "
                    "entity's makes the model give the donor's answer, beyond an unrelated entity's value vector",
                    measured=f"share of pairs whose top-1 token becomes the donor's answer, v (layer "
                    f"{chosen['v']}: {v['flip']}, Wilson) minus the control ({c['flip']}), paired, {where}",
                    effect=paired_difference(v["top"].astype(float), c["top"].astype(float), seed=seed),
                    command=cmd,
                )
            )
        findings.append(
            finding(
                "patching.v_single_recovers",
                claim="the single value vector (one layer, the entity's last token) carries the identity: "
                "patching the donor's moves the answer at least half-way to the donor's",
                measured=f"recovered share of the clean→donor logit difference, v layer {chosen['v']}, {where}"
                + (
                    f" (the unrelated-entity control recovers {pooled[CONTROL]['recovered']})"
                    if has_ctrl
                    else ""
                ),
                effect=v["recovered"],
                command=cmd,
            )
        )
        if "k" in pooled:
            findings.append(
                finding(
                    "patching.v_single_vs_k",
                    claim="at one layer and one position, the value vector carries more of the identity than "
                    "the key vector",
                    measured=f"recovered share, v (layer {chosen['v']}) minus k (layer {chosen['k']}), each at "
                    f"its own chosen layer, paired, {where}",
                    effect=share_difference(v["ld"], pooled["k"]["ld"], clean, donor, seed),
                    command=cmd,
                )
            )
        if "resid" in pooled:
            findings.append(
                finding(
                    "patching.v_single_vs_resid",
                    claim="the single value vector carries at least half of what the whole residual stream at "
                    "that token carries",
                    measured=f"recovered logit difference of v (layer {chosen['v']}) / that of resid (layer "
                    f"{chosen['resid']}), each at its own chosen layer, {where}",
                    effect=share_ratio(v["ld"], pooled["resid"]["ld"], clean, seed),
                    command=cmd,
                )
            )
    donor_top = cat([res["donor_top"] for res in held]).mean()
    clean_top = cat([res["clean_top"] for res in held]).mean()
    n_known = int(cat([res["donor_top"] for res in held]).sum())
    lines = [
        f"| one patch, entity's last token (held-out, {n_held} pairs) | layer | recovered on selection "
        f"| top-1 = donor answer [Wilson 95%] | same, on the {n_known} pairs where the donor run gives it "
        "| recovered [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for label, p in pooled.items():
        name = "control: v from an unrelated entity" if label == CONTROL else label
        layer = p["layer"]
        sel = f"{sweep[label]['recovered'][cands.index(layer)]:.3g}" if label in sweep else "–"
        known = "–" if p["flip_known"] is None else str(p["flip_known"])
        lines.append(f"| {name} | {layer} | {sel} | {p['flip']} | {known} | {p['recovered']} |")
    example = next(
        (
            f"*{groups[r][i].pair.source_entity}* ← *{controls[r][i][2]}* instead of *{groups[r][i].pair.donor_entity}*"
            for r in held_runs
            for i in split[r][1][:1]
            if controls.get(r) and controls[r][i] is not None
        ),
        "",
    )
    ctrl_text = (
        "Control: v at v's layer and position, taken from an unrelated entity: another entity of the same relation "
        "and template whose answer starts with neither answer's token (e.g. " + example + "); it measures "
        "what any in-category entity's value vector does to the answer. "
        if has_ctrl
        else "Control: none (some held-out pair has no unrelated entity in the data). "
    )
    notes = [
        f"**Single-vector test (the claim as stated: one layer, one position).** Pairs split per relation "
        f"(seed {seed}): {n_sel} to select, {n_held} held out. Each site's layer is chosen among {len(cands)} "
        f"candidate layers ({_layer_list(cands)}) as the one whose patch at the entity's last token recovers the "
        f"largest pooled share of the logit difference on the selection split (chosen: "
        + ", ".join(f"{s} {chosen[s]}" for s in sites)
        + "); the table reports that one patch on the held-out pairs only. "
        + ctrl_text
        + f"Top-1 = donor answer: the patched run's top token is the donor answer's first token; on the held-out "
        f"pairs the donor run itself does so on {donor_top:.2f} and the clean run on {clean_top:.2f}.",
        "",
        "\n".join(lines),
    ]
    plot = {
        "sweep": sweep,
        "held": {k: {**p["recovered"].to_dict(), "layer": p["layer"]} for k, p in pooled.items()},
    }
    meta = {
        "chosen_layers": chosen,
        "candidate_layers": list(cands),
        "split": {
            r: {
                "selection": [groups[r][i].pair.source_entity for i in sel],
                "held_out": [groups[r][i].pair.source_entity for i in held_idx],
            }
            for r, (sel, held_idx) in split.items()
        },
        "controls": {
            r: [
                None if controls.get(r) is None or controls[r][i] is None else controls[r][i][2]
                for i in split[r][1]
            ]
            for r in held_runs
        },
        "records": records,
        "sweep": sweep,
    }
    return {"findings": findings, "notes": notes, "meta": meta, "plot": plot}


def run_patching(
    model: nn.Module,
    tokenizer,
    config: PatchConfig | None = None,
    pairs=None,
    seed: int = 0,
    progress_bar: bool | None = None,
) -> ExperimentResult:
    """The single-vector test (one layer, the entity's last token, layer chosen on a selection split,
    reported on held-out pairs, with an unrelated-entity control; see the module docstring) and,
    as context, patches at every entity token of all layers (and of single layers).

    ``pairs``: your own counterfactual pairs, anything :func:`aligned_pairs` takes (what
    :func:`pairs_from_facts` returns, :class:`CounterfactualPair`s, a JSONL path or a ``datasets.Dataset``
    of ``patching`` rows); each must align, or a :class:`DataError` names it. By default pairs are
    built from the package's fact lists for ``config.relations``.
    """
    config = config or PatchConfig()
    arch = get_arch(model)
    for s in (*config.sites, *config.single_sites):
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

    def patch(ps, **kw):
        return patch_pairs(
            model, tokenizer, ps, config.sites, layers, sweep, config.batch_size, progress_bar, **kw
        )

    single = list(dict.fromkeys(config.single_sites))
    test = None
    if not single:
        runs = {r: patch(ps) for r, ps in groups.items()}
    else:
        split = split_pairs(groups, config.select_fraction, seed)
        cands = sorted({arch.check_layer(x) for x in config.single_candidates(arch.n_layers)})
        require_items(cands, "candidate layers of the single-vector test")
        each = [(s, x) for s in single for x in cands]
        sel_runs = {
            r: patch([ps[i] for i in split[r][0]], last_token=each) for r, ps in groups.items() if split[r][0]
        }
        # the layers are fixed here, from the selection split alone, before a held-out pair runs
        chosen, shares = choose_layers(sel_runs, single, cands)
        controls = control_prompts(groups, seed) if "v" in single else {}
        use_ctrl = bool(controls) and all(controls[r][i] is not None for r in groups for i in split[r][1])
        held_runs = {}
        for r, ps in groups.items():
            idx = split[r][1]
            kw: dict = {"last_token": [(s, chosen[s]) for s in single]}
            if use_ctrl:
                kw.update(controls=[controls[r][i][:2] for i in idx], control_sites=[("v", chosen["v"])])
            held_runs[r] = patch([ps[i] for i in idx], **kw)
        runs = {
            r: _merge(len(ps), [(split[r][0], sel_runs.get(r)), (split[r][1], held_runs[r])])
            for r, ps in groups.items()
        }
        test = _single_test(groups, split, sel_runs, held_runs, chosen, shares, cands, controls, seed)
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
    headline = {
        site: recovered_fraction(pooled_patch[(site, "all")], pooled["clean"], pooled["donor"], seed)
        for site in config.sites
    }
    verdicts = list(test["findings"]) if test else []
    if "v" in config.sites and test is None:  # without the single-vector test, the loose form is all there is
        cmd = "vsteer patch"
        verdicts.append(
            finding(
                "patching.v_recovers",
                claim="patching the donor entity's value vectors (all layers, entity tokens only) makes "
                "the model answer for the donor entity",
                measured=f"recovered share of the clean→donor logit difference, {len(pooled['clean'])} pairs "
                f"({', '.join(runs)})",
                effect=headline["v"],
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
        f"| site (all layers, every entity token; all {len(pooled['clean'])} pairs) | recovered [95% CI] "
        "| top-1 = donor answer |",
        "|---|---|---|",
    ]
    for site, e in headline.items():
        top = np.concatenate([res["top_is_donor"][(site, "all")] for res in runs.values()])
        lines.append(f"| {site} | {e} | {top.mean():.2f} |")
    notes = list(test["notes"]) + [""] if test else []
    notes += [
        ("Context, not a verdict: the loose form. " if test else "")
        + f"Donor run itself: top-1 = donor answer on {pooled['donor_top'].mean():.2f} of pairs; "
        f"mean LD clean {pooled['clean'].mean():.3g}, donor {pooled['donor'].mean():.3g} "
        "(LD = logit(donor answer) − logit(source answer), first answer token). Patching v at every "
        "entity token of every layer is close to recovering by construction: with the keys kept, those "
        "values are the only content path from the entity to the answer.",
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
    if test:
        meta["single"] = test["meta"]
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
        plotter=partial(_plot, single=test["plot"] if test else None),
    )


def _plot(records, path, single: dict | None = None) -> None:
    """Left (with the single-vector test): recovered share by layer of the one-position patch on the
    selection split, each site's chosen layer's held-out value as a point with its interval, the
    control at v's layer, and the all-layer v patch dashed. Then, per relation, the one-layer
    all-entity-token sweep where it ran."""
    import matplotlib.pyplot as plt

    rels = [
        r
        for r in dict.fromkeys(x["relation"] for x in records)
        if any(x["layer"] != "all" for x in records if x["relation"] == r)
    ]
    if single is None and not rels:
        rels = list(dict.fromkeys(x["relation"] for x in records))
    n = len(rels) + (single is not None)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.2), squeeze=False)
    axes = list(axes[0])
    if single is not None:
        ax = axes.pop(0)
        for site, sw in single["sweep"].items():
            line = ax.plot(sw["layers"], sw["recovered"], marker=".", label=f"{site} (selection)")[0]
            ax.fill_between(sw["layers"], sw["low"], sw["high"], alpha=0.15, color=line.get_color())
            held = single["held"].get(site)
            if held:
                err = [[held["value"] - held["low"]], [held["high"] - held["value"]]]
                ax.errorbar(
                    [held["layer"]], [held["value"]], yerr=err, fmt="*", ms=11, color=line.get_color()
                )
        ctrl = single["held"].get(CONTROL)
        if ctrl:
            err = [[ctrl["value"] - ctrl["low"]], [ctrl["high"] - ctrl["value"]]]
            ax.errorbar(
                [ctrl["layer"]],
                [ctrl["value"]],
                yerr=err,
                fmt="X",
                ms=9,
                color="k",
                label="control (held-out)",
            )
        full = [x["recovered"] for x in records if x["site"] == "v" and x["layer"] == "all"]
        if full:
            ax.axhline(float(np.mean(full)), color="grey", ls="--", lw=1, label="v, all layers + tokens")
        ax.axhline(THRESHOLD, color="k", lw=0.6, ls=":")
        ax.set_title("one layer, entity's last token (stars: held-out at the chosen layer)")
        ax.set_xlabel("layer")
        ax.set_ylabel("recovered share of logit difference")
        ax.legend(fontsize=7)
    for ax, rel in zip(axes, rels):
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
        ax.set_title(f"{rel}: one layer, every entity token (dashed: all layers)")
        ax.set_xlabel("layer")
        ax.set_ylabel("recovered share of logit difference")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
