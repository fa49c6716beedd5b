"""Does a value-site steering vector steer? Effect evaluation on the real model.

Two experiments, each returning :class:`~vsteer.experiments.result.ExperimentResult`:

* :func:`ab_steering`: for a CAA behaviour or an Anthropic persona, extract a value-site
  (``v``) vector on the extraction items, and measure p(behaviour-matching answer) on held-out
  A/B (Yes/No) items as a function of the steering scale in ``[-k, k]``. The residual-stream
  (``resid``) vector of the same data and layers is rescaled, layer by layer, so that its norm
  equals the norm of the change the value vector makes to the residual stream
  (``||W_O c||``, see :func:`vsteer.steering.residual_change`): both arms move the residual stream
  by the same amount per unit of scale. Layers are chosen on extraction-split items held out of
  the extraction (never on the test items) and the search is recorded.
* :func:`sentiment_steering`: a ``v`` vector from SST-2 positive vs negative sentences steers
  greedy continuations of neutral prompts (IMDB review openings); VADER (a lexicon scorer that
  played no part in making the vector) scores the continuations.

p(matching) is ``p(m) / (p(m) + p(o))`` of the next token after the assistant turn opens with
``"("`` (letters) or nothing (Yes/No). Intervals are 95% bootstrap intervals over items.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from vsteer.encoding import encode_batch, pad_batch, pad_token_id
from vsteer.evaluate import bootstrap, finding, paired_difference
from vsteer.experiments.result import ExperimentResult
from vsteer.models import model_device

BEHAVIOURS = ("refusal", "myopic-reward", "corrigible-neutral-HHH")
PERSONAS = ("agreeableness", "neuroticism")
BANDS = ("4-10", "11-17", "18-24")


@dataclass
class SteeringOptions:
    """Sizes of the evaluation. ``scales`` multiply the extracted vectors (mean differences).
    ``n_extract``: extraction pairs, answer-balanced (an A/B item gives two, one per option order)."""

    scales: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)
    bands: tuple[str, ...] = BANDS
    n_extract: int = 100
    n_select: int = 16
    n_test: int = 50  # CAA: the official test split (50 items) first, then held-out generate items
    batch_size: int = 16
    n_prompts: int = 30
    max_new_tokens: int = 24
    sentiment_pairs: int = 300
    seed: int = 0
    progress: bool = False
    log: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------
def _answer_tokens(tokenizer, item) -> tuple[str, int, int]:
    """Assistant prefix and the token ids of the matching / other answer that follow it."""
    from vsteer.extraction import answer_completion

    m, o = answer_completion(item.matching), answer_completion(item.not_matching)
    if m.startswith("("):
        prefix, m_text, o_text = "(", m, o
    else:
        prefix, m_text, o_text = "", m, o
    m_id = tokenizer(m_text, add_special_tokens=False)["input_ids"][-1 if prefix else 0]
    o_id = tokenizer(o_text, add_special_tokens=False)["input_ids"][-1 if prefix else 0]
    return prefix, m_id, o_id


def _prompt_ids(tokenizer, item, prefix: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": item.question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text + prefix, add_special_tokens=False)["input_ids"]


def p_matching(
    model, tokenizer, items, steering=None, scale: float = 0.0, batch_size: int = 16
) -> np.ndarray:
    """``[len(items)]`` p(matching) of each item, with ``steering`` (vectors for :func:`vsteer.steer`)
    applied at every position at ``scale``."""
    from vsteer.steering import steer

    encoded = []
    for item in items:
        prefix, m_id, o_id = _answer_tokens(tokenizer, item)
        encoded.append((_prompt_ids(tokenizer, item, prefix), m_id, o_id))
    order = sorted(range(len(items)), key=lambda i: len(encoded[i][0]))
    out = np.zeros(len(items))
    pad, device = pad_token_id(tokenizer), model_device(model)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs = pad_batch([encoded[i][0] for i in batch], pad, device=device)
        inputs.update(use_cache=False, logits_to_keep=1)
        with torch.no_grad():
            if steering is None or scale == 0:
                logits = model(**inputs).logits[:, -1].float()
            else:
                with steer(model, steering, scale=scale):
                    logits = model(**inputs).logits[:, -1].float()
        logp = torch.log_softmax(logits, -1)
        for row, i in enumerate(batch):
            _, m_id, o_id = encoded[i]
            pair = torch.stack([logp[row, m_id], logp[row, o_id]])
            out[i] = float(torch.softmax(pair, 0)[0])
    return out


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def _two_choice(item) -> bool:
    """Letter items answered (A) vs (B), or word items (Yes/No, ...): p(matching) is defined against the
    one other answer (survival-instinct's (C)-(H) items list more choices)."""
    from vsteer.data.balance import answer_letter

    letters = {answer_letter(item.matching), answer_letter(item.not_matching)}
    return letters == {"A", "B"} or letters == {None}


def reference_answer(item) -> str:
    """The answer whose probability the answer-token swing follows, whichever answer matches:
    ``"(A)"`` for letter items, ``"Yes"`` for Yes/No items, else the alphabetically first answer."""
    answers = (item.matching, item.not_matching)
    for ref in ("(A)", "Yes"):
        if ref in answers:
            return ref
    return min(answers)


def _split_items(kind: str, name: str, opts: SteeringOptions, items=None, test_items=None):
    """(extraction pairs, selection items, test items) for a CAA behaviour, a persona, or your own
    A/B items (``items``: a JSONL path, a ``datasets.Dataset`` or ABItems; ``name`` may be a JSONL path).

    The extraction set is answer-balanced (:func:`vsteer.data.balance_answers`): every answer
    token is the matching one as often as the other one, so the vector cannot be an answer switch.
    """
    from pathlib import Path

    from vsteer import data
    from vsteer.data import user
    from vsteer.errors import DataError
    from vsteer.extraction import Pairs, ab_pair, data_sources

    shipped = name in data.CAA_BEHAVIOURS + data.PERSONA_TRAITS  # a shipped name wins over a local file
    own = items if items is not None else (name if user.is_data_file(name) and not shipped else None)
    if own is not None:
        pool = user.ab_items(own)
        sources = [user.data_source(own)]
        name = Path(own).stem if isinstance(own, str | Path) else (name or "items")
        if test_items is not None:
            test = user.ab_items(test_items)[: opts.n_test]
            sources.append(user.data_source(test_items))
        else:
            random.Random(opts.seed).shuffle(pool)
            test, pool = pool[: opts.n_test], pool[opts.n_test :]
    else:
        try:
            if kind == "caa":
                pool = list(data.caa_ab(name, "generate"))
                # like the pool below: p(matching) is defined against one other answer, so items
                # listing more choices (4 of survival-instinct's 50) are no test items either
                test = [it for it in data.caa_ab(name, "test") if _two_choice(it)][: opts.n_test]
                source = f"caa/generate/{name}/generate_dataset.json"
            elif kind == "persona":
                pool = list(data.persona_ab(name))
                random.Random(opts.seed).shuffle(pool)
                test, pool = pool[: opts.n_test], pool[opts.n_test :]
                source = f"anthropic-evals/persona/{name}.jsonl"
            else:
                raise DataError(f"unknown steering data kind {kind!r}; expected 'caa' or 'persona'")
        except DataError as err:
            raise DataError(f"{err}; or give a JSONL file of A/B items (or items=...)") from None
        sources = data_sources(source)
    pool = [it for it in pool if _two_choice(it)]
    rng = random.Random(opts.seed + 1)
    rng.shuffle(pool)
    extra = opts.n_test - len(test) if own is None and kind == "caa" else 0
    origin = ""
    if extra > 0:
        # CAA's own test split has 50 items per behaviour; more test items come from the *end* of
        # the shuffled generate split, so selection and extraction (taken from its front) keep
        # the items they would have with 50 test items
        if len(pool) - extra < opts.n_select + opts.n_extract:
            raise DataError(
                f"{kind}:{name} has {len(test)} test and {len(pool)} generate items: n_test={opts.n_test} "
                f"leaves too few for n_select={opts.n_select} and n_extract={opts.n_extract}"
            )
        origin = (
            f"CAA's test split, {len(test)}, then {extra} generate items held out of selection and extraction"
        )
        test, pool = test + pool[-extra:], pool[:-extra]
    select = pool[: opts.n_select]
    extract_items = data.balance_answers(pool[opts.n_select :], opts.n_extract, f"{kind}:{name} extraction")
    pairs = Pairs(
        [ab_pair(it.question, it.matching, it.not_matching) for it in extract_items],
        sources=sources,
        name=f"{kind}:{name}",
        position="answer",
    )
    pairs.balance = data.matching_counts(extract_items)
    pairs.test_origin = origin
    return pairs, select, test


def matched_residual(model, value_vec, resid_vec, inputs: dict | None = None):
    """``resid_vec`` rescaled per layer to the norm of the residual change of ``value_vec``.

    ``inputs`` (a tokenized batch) calibrate the size where a norm sits between the attention
    output and the residual stream (Gemma 2/3); elsewhere the size is ``||W_O c||`` exactly.
    """
    from dataclasses import replace

    from vsteer.steering import residual_change_norms

    target = residual_change_norms(model, value_vec, inputs)
    dirs = {}
    for layer, t in resid_vec.directions.items():
        dirs[layer] = t * (target[layer] / t.norm().clamp_min(1e-12))
    return replace(
        resid_vec, directions=dirs, method=f"{resid_vec.method}, norm matched to the residual change of v"
    )


def calibration_inputs(model, tokenizer, n: int = 8) -> dict:
    """A tokenized batch of neutral prompts (shipped IMDB openings) to calibrate residual sizes."""
    from vsteer import data

    return encode_batch(tokenizer, data.neutral_prompts(n), device=model_device(model))


def _extract_both(model, tokenizer, pairs, layers, opts, position=None):
    """Value and residual vectors from one set of pairs, all candidate layers."""
    from vsteer.extraction import extract_sites

    vecs = extract_sites(
        model, tokenizer, pairs, ("v", "resid"), layers, "mean_diff", position, opts.batch_size, opts.progress
    )
    return vecs["v"], vecs["resid"]


def _band_layers(band: str, n_layers: int) -> list[int]:
    from vsteer.sites import parse_layers

    return parse_layers(band, n_layers)


# ------------------------------------------------------------------------------------------------
# A/B steering curves
# ------------------------------------------------------------------------------------------------
def ab_steering(
    model,
    tokenizer,
    kind: str = "custom",
    name: str = "",
    opts: SteeringOptions | None = None,
    items=None,
    test_items=None,
) -> ExperimentResult:
    """Curve of p(matching) vs scale for the value-site vector and the norm-matched residual one.

    Data: ``kind="caa"`` with a shipped behaviour or ``kind="persona"`` with a shipped trait; or your own
    A/B (Yes/No) items, ``{question, answer_matching_behavior, answer_not_matching_behavior}``, as
    ``name`` = a JSONL path or ``items`` = a path, a ``datasets.Dataset`` or a list of ABItems
    (``test_items`` likewise; by default ``opts.n_test`` items are held out of ``items``).
    Every record carries the answer-token swing next to the effect (see :func:`reference_answer`).
    """
    from vsteer.arch import get_arch
    from vsteer.data.balance import matching_counts

    opts = opts or SteeringOptions()
    t0 = time.time()
    arch = get_arch(model)
    pairs, select, test = _split_items(kind, name, opts, items, test_items)
    name = pairs.name.partition(":")[2]  # a file's stem for your own file
    # p(reference answer) = p(matching) where the reference answer matches, 1 - p(matching) elsewhere
    ref_matches = np.array([reference_answer(it) == it.matching for it in test])
    all_layers = sorted({layer for band in opts.bands for layer in _band_layers(band, arch.n_layers)})
    v_all, r_all = _extract_both(model, tokenizer, pairs, all_layers, opts)
    calib = calibration_inputs(model, tokenizer)
    k = max(abs(s) for s in opts.scales)

    # layer search on the selection items (held out of extraction and of the test)
    search = []
    for band in opts.bands if len(opts.bands) > 1 and opts.n_select > 0 else ():
        layers = _band_layers(band, arch.n_layers)
        v = v_all.select_layers(layers)
        r = matched_residual(model, v, r_all.select_layers(layers), calib)
        for site, vec in (("v", v), ("resid", r)):
            hi = p_matching(model, tokenizer, select, vec, k, opts.batch_size)
            lo = p_matching(model, tokenizer, select, vec, -k, opts.batch_size)
            search.append({"band": band, "site": site, "effect": float(np.mean(hi - lo))})
    best = {
        site: max((s for s in search if s["site"] == site), key=lambda s: s["effect"])["band"]
        if search
        else opts.bands[0]
        for site in ("v", "resid")
    }
    # one band for both arms, chosen by the value arm; the residual arm's own best is reported too
    band = best["v"]
    layers = _band_layers(band, arch.n_layers)
    v = v_all.select_layers(layers)
    r = matched_residual(model, v, r_all.select_layers(layers), calib)
    change_norm = sum(float(t.norm()) for t in r.directions.values())

    base = p_matching(model, tokenizer, test, None, 0.0, opts.batch_size)
    per_item: dict[tuple[str, float], np.ndarray] = {}
    records = []
    for site, vec in (("v", v), ("resid", r)):
        for s in opts.scales:
            p = base if s == 0 else p_matching(model, tokenizer, test, vec, s, opts.batch_size)
            per_item[(site, s)] = p
            est = bootstrap(p, seed=opts.seed)
            records.append(
                {
                    "kind": kind,
                    "name": name,
                    "site": site,
                    "layers": band,
                    "scale": s,
                    "resid_change_norm": abs(s) * change_norm,
                    "p_matching": est.value,
                    "low": est.low,
                    "high": est.high,
                    "n": est.n,
                    "p_a_or_yes": float(np.where(ref_matches, p, 1 - p).mean()),
                }
            )
    for row in records:
        # effect and answer-token swing from -s to +s, side by side in every row
        mirrored = -row["scale"] in opts.scales
        p_hi = per_item[(row["site"], row["scale"])]
        p_lo = per_item[(row["site"], -row["scale"])] if mirrored else None
        row["effect"] = float((p_hi - p_lo).mean()) if mirrored else None
        row["answer_swing"] = (
            float(np.where(ref_matches, p_hi - p_lo, p_lo - p_hi).mean()) if mirrored else None
        )
    swing = {
        site: paired_difference(
            np.where(ref_matches, per_item[(site, k)], 1 - per_item[(site, k)]),
            np.where(ref_matches, per_item[(site, -k)], 1 - per_item[(site, -k)]),
            seed=opts.seed,
        )
        for site in ("v", "resid")
    }
    test_balance = {a: c["matching"] for a, c in matching_counts(test).items()}
    verdicts = []
    for site in ("v", "resid"):
        curve = [per_item[(site, s)].mean() for s in opts.scales]
        monotone = bool(np.all(np.diff(curve) >= 0))
        effect = paired_difference(per_item[(site, k)], per_item[(site, -k)], seed=opts.seed)
        verdicts.append(
            finding(
                "steering.ab_scale",
                claim=f"{site}-site vector for {kind}:{name} raises p(matching) with scale",
                measured=f"p(matching | +{k:g}) - p(matching | -{k:g}) on {effect.n} held-out items "
                f"({'monotone' if monotone else 'not monotone'} over {list(opts.scales)}; side effect, "
                f"answer-token swing p((A)/Yes) {swing[site]})",
                effect=effect,
                command="vsteer run recipes/claims.yaml --only steering",
            )
        )
    diff = paired_difference(
        per_item[("v", k)] - per_item[("v", -k)],
        per_item[("resid", k)] - per_item[("resid", -k)],
        seed=opts.seed,
    )
    searched = (
        f"Layer search on {len(select)} extraction-split items held out of extraction "
        f"(effect = mean p(+{k:g}) - p(-{k:g})): "
        + "; ".join(f"{s['site']}@{s['band']}: {s['effect']:+.3f}" for s in search)
        + f". Chosen band (by the value arm): {band}; the residual arm's own best band: {best['resid']}."
        if search
        else f"Layers fixed in advance: {band} (no search in this run)."
    )
    notes = [
        searched,
        f"Value minus residual effect at matched norm: {diff}. Residual change norm per unit scale "
        f"(sum over layers): {change_norm:.3g}. Unsteered p(matching): {base.mean():.3f}.",
        f"Answer-token swing (side effect): p((A) or Yes | +{k:g}) - p((A) or Yes | -{k:g}), whichever "
        f"answer matches: v {swing['v']}, resid {swing['resid']}. A vector that only "
        "switches the answer token moves this and not the effect on a balanced test set; test items "
        f"matching each answer: {test_balance}.",
        f"{len(pairs)} extraction pairs, answer-balanced (matching/other per answer: {pairs.balance}), "
        f"{len(test)} test items{f' ({pairs.test_origin})' if pairs.test_origin else ''}; {time.time() - t0:.0f} s.",
    ]
    return ExperimentResult(
        name=f"steering_ab_{kind}_{name}",
        title=f"Steering {kind}:{name}: p(matching) vs scale, value site vs residual at matched norm",
        records=records,
        findings=verdicts,
        meta={
            "kind": kind,
            "name": name,
            "band": band,
            "search": search,
            "scales": list(opts.scales),
            "value_minus_resid": diff.to_dict(),
            "vector": v.metadata(),
            "n_extract": len(pairs),
            "n_test": len(test),
            "test_origin": pairs.test_origin,
            "extraction_balance": pairs.balance,
            "test_matching": test_balance,
            "answer_swing": {site: e.to_dict() for site, e in swing.items()},
        },
        columns=[
            "site",
            "layers",
            "scale",
            "resid_change_norm",
            "p_matching",
            "low",
            "high",
            "n",
            "effect",
            "answer_swing",
            "p_a_or_yes",
        ],
        notes=notes,
        plotter=_plot_curves,
    )


def _plot_curves(records, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for site, colour in (("v", "C0"), ("resid", "C1")):
        rows = [r for r in records if r["site"] == site]
        xs = [r["scale"] for r in rows]
        ax.plot(xs, [r["p_matching"] for r in rows], "o-", color=colour, label=f"{site} site")
        ax.fill_between(xs, [r["low"] for r in rows], [r["high"] for r in rows], color=colour, alpha=0.2)
    if records:
        ax.set_title(f"{records[0]['kind']}:{records[0]['name']} (layers {records[0]['layers']})")
    ax.set_xlabel("steering scale (residual change matched)")
    ax.set_ylabel("p(matching answer)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# sentiment of generated continuations
# ------------------------------------------------------------------------------------------------
def _generate(model, tokenizer, prompts, steering=None, scale=0.0, max_new_tokens=24) -> list[str]:
    from vsteer.steering import steer

    enc = encode_batch(tokenizer, prompts, device=model_device(model))
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        if steering is None or scale == 0:
            out = model.generate(**enc, **kw)
        else:
            with steer(model, steering, scale=scale):
                out = model.generate(**enc, **kw)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def sentiment_steering(
    model, tokenizer, opts: SteeringOptions | None = None, band: str = "11-17"
) -> ExperimentResult:
    """VADER compound sentiment of continuations vs scale, value site vs residual at matched norm."""
    from vsteer import data
    from vsteer.arch import get_arch
    from vsteer.extraction import sst2_pairs
    from vsteer.metrics import vader_scores

    opts = opts or SteeringOptions()
    t0 = time.time()
    arch = get_arch(model)
    layers = _band_layers(band, arch.n_layers)
    pairs = sst2_pairs("train", limit=opts.sentiment_pairs)
    v, r_raw = _extract_both(model, tokenizer, pairs, layers, opts)
    r = matched_residual(model, v, r_raw, calibration_inputs(model, tokenizer))
    change_norm = sum(float(t.norm()) for t in r.directions.values())
    prompts = data.neutral_prompts(opts.n_prompts)
    k = max(abs(s) for s in opts.scales)
    records, per_item, samples = [], {}, {}
    base_text = _generate(model, tokenizer, prompts, None, 0.0, opts.max_new_tokens)
    for site, vec in (("v", v), ("resid", r)):
        for s in opts.scales:
            texts = base_text if s == 0 else _generate(model, tokenizer, prompts, vec, s, opts.max_new_tokens)
            scores = vader_scores(texts)
            per_item[(site, s)] = scores
            samples[(site, s)] = texts[:3]
            est = bootstrap(scores, seed=opts.seed)
            records.append(
                {
                    "site": site,
                    "layers": band,
                    "scale": s,
                    "resid_change_norm": abs(s) * change_norm,
                    "vader_compound": est.value,
                    "low": est.low,
                    "high": est.high,
                    "n": est.n,
                    "example": texts[0][:80].replace("\n", " ").replace("|", "/"),
                }
            )
    verdicts = []
    for site in ("v", "resid"):
        curve = [per_item[(site, s)].mean() for s in opts.scales]
        effect = paired_difference(per_item[(site, k)], per_item[(site, -k)], seed=opts.seed)
        verdicts.append(
            finding(
                "steering.sentiment_scale",
                claim=f"{site}-site SST-2 vector shifts the sentiment of continuations",
                measured=f"VADER compound(+{k:g}) - compound(-{k:g}) over {effect.n} neutral prompts "
                f"({'monotone' if np.all(np.diff(curve) >= 0) else 'not monotone'})",
                effect=effect,
                command="vsteer run recipes/claims.yaml --only steering",
            )
        )
    return ExperimentResult(
        name="steering_sentiment",
        title="Sentiment steering (SST-2 vector), VADER compound of greedy continuations vs scale",
        records=records,
        findings=verdicts,
        meta={
            "band": band,
            "scales": list(opts.scales),
            "vector": v.metadata(),
            "samples": {f"{site}@{s:g}": t for (site, s), t in samples.items()},
        },
        columns=[
            "site",
            "layers",
            "scale",
            "resid_change_norm",
            "vader_compound",
            "low",
            "high",
            "n",
            "example",
        ],
        notes=[
            f"{len(pairs)} SST-2 train pairs (mean over sentence tokens), {len(prompts)} neutral prompts "
            f"(IMDB held-out review openings), greedy, {opts.max_new_tokens} new tokens; VADER scores the "
            f"continuation only. Layers {band} fixed in advance (not searched). {time.time() - t0:.0f} s."
        ],
        plotter=_plot_sentiment,
    )


def _plot_sentiment(records, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for site, colour in (("v", "C0"), ("resid", "C1")):
        rows = [r for r in records if r["site"] == site]
        xs = [r["scale"] for r in rows]
        ax.plot(xs, [r["vader_compound"] for r in rows], "o-", color=colour, label=f"{site} site")
        ax.fill_between(xs, [r["low"] for r in rows], [r["high"] for r in rows], color=colour, alpha=0.2)
    ax.set_xlabel("steering scale (residual change matched)")
    ax.set_ylabel("VADER compound")
    ax.set_ylim(-1, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def run_steering(
    model,
    tokenizer,
    behaviours=BEHAVIOURS,
    personas=PERSONAS,
    sentiment: bool = True,
    opts: SteeringOptions | None = None,
) -> list[ExperimentResult]:
    """The full effect evaluation: A/B curves for CAA behaviours and personas, and sentiment.

    ``behaviours`` and ``personas`` hold shipped names or paths to your own JSONL files of A/B items
    (``question``, ``answer_matching_behavior``, ``answer_not_matching_behavior``); for a
    ``datasets.Dataset`` call :func:`ab_steering` with ``items=``."""
    opts = opts or SteeringOptions()
    results = [ab_steering(model, tokenizer, "caa", b, opts) for b in behaviours]
    results += [ab_steering(model, tokenizer, "persona", p, opts) for p in personas]
    if sentiment:
        results.append(sentiment_steering(model, tokenizer, opts))
    return results
