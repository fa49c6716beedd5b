"""Claim 4 (issue 14): role prompts steer by activating value dimensions.

"Role prompts (*You are a rigorous scientist*) steer by activating value dimensions; *Let's think
step by step* triggers a reasoning subspace." Tested as: how much of a system prompt's effect on
the next-token distributions does one value-site vector recover when the prompt is removed?

For each prompt, a persona vector is extracted with :func:`vsteer.extraction.from_prompts` (mean
``v`` and ``resid`` difference with vs without the prompt, at the template's tail, on the
extraction questions). On other questions the prompted model answers greedily; the prompt's
effect is ``KL(prompted || unprompted)`` at the answer's first position and at the next
``n_positions - 1`` positions, teacher-forced with the prompted model's own greedy answer (both
runs read the same answer tokens; positions after an end-of-sequence token are dropped). Steering
the unprompted run (vector added at every position) closes part of it::

    recovery = 1 - sum KL(prompted || unprompted + vector) / sum KL(prompted || unprompted)

(sums over questions and positions: the share of the total effect closed, stable where single
questions have tiny effects). Arms, all one layer:

* ``v``: the value-site vector at the layer and scale chosen on the selection split;
* ``resid``: the residual-stream vector, rescaled per layer to the residual-stream norm of the
  value vector's change (``||W_O c||``, :func:`vsteer.steering.residual_change_norms`), its own
  layer and scale chosen on the selection split from the same grid, so both arms choose from the
  same menu of residual-stream norms;
* ``random``: a random value-site direction at ``v``'s layer with the same residual-stream norm.

Layers are fractions of the depth; scales multiply the mean difference. Intervals: 95% bootstrap
over test questions (resampled jointly across prompts, so prompt-level means stay paired).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from vsteer.encoding import length_batches, pad_batch, pad_token_id, to_numpy
from vsteer.errors import DataError
from vsteer.evaluate import bootstrap, finding
from vsteer.experiments.result import ExperimentResult
from vsteer.models import eos_ids, model_device

PROMPTS = (
    "You are a pirate.",
    "You are a rigorous scientist.",
    "Let's think step by step.",
    "Always answer in French.",
)
STEP_BY_STEP = "Let's think step by step."
COMMAND = "vsteer run recipes/claims.yaml --only persona"
# value-site vectors: "v" the mean value difference at the template's tail (vsteer.extraction.from_prompt);
# "z" the mean difference of the attention result z averaged over each key/value head's query heads:
# a v vector added at every position shifts every head's z by exactly itself (the attention weights
# sum to one), so this is the value-site vector that reproduces the prompt's average z shift
VALUE_ESTIMATORS = ("v", "z")


@dataclass
class PersonaConfig:
    """``prompts``: system prompts; ``n_extract``/``n_select``/``n_test``: questions (HH-RLHF helpful-base
    first human turns of at most ``max_question_tokens`` tokens), split by item; ``layer_fractions``:
    candidate layers as fractions of the depth; ``scales``: multiples of the mean difference;
    ``n_positions``: answer positions scored (1 = the first only); ``position``: extraction
    positions (see :func:`vsteer.extraction.from_prompt`)."""

    prompts: tuple[str, ...] = PROMPTS
    n_extract: int = 48
    n_select: int = 16
    n_test: int = 64
    layer_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    scales: tuple[float, ...] = (1.0, 2.0, 4.0)
    value_estimators: tuple[str, ...] = VALUE_ESTIMATORS
    n_positions: int = 4
    position: str = "tail"
    max_question_tokens: int = 32
    batch_size: int = 16
    n_boot: int = 2000


# ------------------------------------------------------------------------------------------------
# targets and scores
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def prompted_targets(
    model, tokenizer, prompted: list[list[int]], n_positions: int, batch_size: int = 16, counter=None
):
    """The prompted model's greedy answers and distributions.

    Returns ``(answers, logp, valid)``: ``answers`` the first ``n_positions - 1`` greedy tokens of
    each row (the teacher-forced context of the later positions), ``logp`` ``[n, n_positions, vocab]``
    float32 log-probabilities at the answer's first ``n_positions`` positions, ``valid``
    ``[n, n_positions]`` bool (False after an end-of-sequence token).
    """
    pad, device = pad_token_id(tokenizer), model_device(model)
    eos = eos_ids(model, tokenizer)
    answers, logps = [None] * len(prompted), [None] * len(prompted)
    for batch in length_batches([len(x) for x in prompted], batch_size):  # little padding per batch
        inputs = pad_batch([prompted[i] for i in batch], pad, device=device)
        _count(counter, inputs)
        if n_positions == 1:
            logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1:].float()
            tokens = torch.empty(len(batch), 0, dtype=torch.long)
        else:
            out = model.generate(
                **inputs,
                max_new_tokens=n_positions,
                min_new_tokens=n_positions,  # every row gets n_positions distributions
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=pad,
            )
            logits = torch.stack(out.logits, dim=1).float()
            tokens = out.sequences[:, inputs["input_ids"].shape[1] :][:, : n_positions - 1].cpu()
        logp = torch.log_softmax(logits, -1).cpu()
        for row, i in enumerate(batch):
            answers[i], logps[i] = tokens[row].tolist(), logp[row]
    logp = torch.stack(logps)
    # the answer ends where the unconstrained greedy token is an end-of-sequence token (min_new_tokens
    # only masks the sampled scores, not these raw logits); later positions are dropped
    ended = torch.isin(logp.argmax(-1), torch.tensor(sorted(eos), dtype=torch.long))
    valid = torch.ones(len(prompted), n_positions, dtype=torch.bool)
    valid[:, 1:] = ~(ended[:, :-1].long().cumsum(1).bool())
    return answers, logp, valid


@torch.no_grad()
def kl_to_targets(
    model,
    tokenizer,
    unprompted: list[list[int]],
    answers,
    target_logp,
    steering=None,
    scale=1.0,
    batch_size=16,
    counter=None,
) -> torch.Tensor:
    """``[n, n_positions]`` KL(target || model) of the unprompted runs teacher-forced with ``answers``,
    with ``steering`` (vectors for :func:`vsteer.steer`, added at every position) at ``scale``."""
    from vsteer.steering import steer

    pad, device = pad_token_id(tokenizer), model_device(model)
    n_pos = target_logp.shape[1]
    seqs = [list(u) + list(a) for u, a in zip(unprompted, answers)]
    out = torch.zeros(len(seqs), n_pos)
    for batch in length_batches([len(x) for x in seqs], batch_size):
        inputs = pad_batch([seqs[i] for i in batch], pad, device=device)
        _count(counter, inputs)
        if steering is None:
            logits = model(**inputs, use_cache=False, logits_to_keep=n_pos).logits
        else:
            with steer(model, steering, scale=scale):
                logits = model(**inputs, use_cache=False, logits_to_keep=n_pos).logits
        logq = torch.log_softmax(logits[:, -n_pos:].float(), -1).cpu()
        logp = target_logp[batch]
        out[batch] = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)
    return out


def recovery(arm_kl: np.ndarray, base_kl: np.ndarray) -> float:
    """``1 - sum(arm) / sum(base)``: the share of the prompt's total KL that steering closes."""
    return float(1.0 - np.sum(arm_kl) / max(float(np.sum(base_kl)), 1e-12))


def _count(counter, inputs) -> None:
    """Add a batch's padded token count to ``counter["tokens"]`` (the section's cost, in forward tokens)."""
    if counter is not None:
        counter["tokens"] = counter.get("tokens", 0) + int(inputs["input_ids"].numel())


# ------------------------------------------------------------------------------------------------
# arms
# ------------------------------------------------------------------------------------------------
def _matched_random(model, value_vec, layer: int, seed: int, calib):
    """A random ``v`` direction at ``layer`` with the residual-stream norm of ``value_vec``'s change."""
    from vsteer.steering import residual_change_norms
    from vsteer.vectors import SteeringVector

    g = torch.Generator().manual_seed(seed)
    shape = value_vec.shape
    rand = SteeringVector.for_model(model, {layer: torch.randn(shape, generator=g)}, "v", method="random")
    target = residual_change_norms(model, value_vec.select_layers([layer]), calib)[layer]
    have = residual_change_norms(model, rand, calib)[layer]
    return rand * (target / max(have, 1e-12))


def _scorer(model, tokenizer, prompt: str, mode: str, questions, n_positions: int, batch_size: int, counter):
    """``(score, answers, valid)`` for ``questions`` under ``prompt``: ``score(steering, scale)`` gives
    ``[n, n_positions]`` KL(prompted || unprompted + steering), 0 at dropped positions."""
    from vsteer.extraction import prompt_inputs

    enc = [prompt_inputs(tokenizer, prompt, q, mode) for q in questions]
    answers, logp, valid = prompted_targets(
        model, tokenizer, [w for w, _ in enc], n_positions, batch_size, counter
    )
    unprompted = [wo for _, wo in enc]
    mask = to_numpy(valid)

    def score(steering=None, scale=1.0) -> np.ndarray:
        kl = kl_to_targets(model, tokenizer, unprompted, answers, logp, steering, scale, batch_size, counter)
        return to_numpy(kl) * mask

    return score, answers, mask


def value_from_z(model, z_vec):
    """A ``v`` vector ``[n_kv_heads, head_dim]`` from a ``z`` vector ``[n_heads, head_dim]``: the mean over
    the query heads that read each key/value head (the least-squares fit of a shared shift)."""
    from vsteer.arch import get_arch
    from vsteer.vectors import SteeringVector

    arch = get_arch(model)
    group = arch.n_heads // arch.n_kv_heads
    dirs = {
        layer: t.float().reshape(arch.n_kv_heads, group, arch.head_dim).mean(1)
        for layer, t in z_vec.directions.items()
    }
    return SteeringVector.for_model(
        model,
        dirs,
        "v",
        method=f"kv_group_mean({z_vec.method} at z)",
        position=z_vec.position,
        data=list(z_vec.data),
        extra=dict(z_vec.extra),
    )


def _extraction_tokens(tokenizer, prompts, questions) -> int:
    from vsteer.extraction import prompt_inputs, system_prompt_mode

    total = 0
    for i, p in enumerate(prompts):
        mode = system_prompt_mode(tokenizer, p)
        for q in questions:
            w, wo = prompt_inputs(tokenizer, p, q, mode)
            total += len(w) + (len(wo) if i == 0 else 0)  # the runs without a prompt are shared
    return total


def _candidate_layers(fractions, n_layers: int) -> list[int]:
    layers = sorted({min(n_layers - 1, max(0, round(f * (n_layers - 1)))) for f in fractions})
    if not layers:
        raise DataError("persona needs at least one candidate layer (layer_fractions is empty)")
    return layers


def _split(questions, tokenizer, config: PersonaConfig, seed: int):
    short = [
        q
        for q in questions
        if len(tokenizer(q, add_special_tokens=False)["input_ids"]) <= config.max_question_tokens
    ]
    need = config.n_extract + config.n_select + config.n_test
    if len(short) < need:
        raise DataError(
            f"persona needs {need} questions of at most {config.max_question_tokens} tokens "
            f"(n_extract + n_select + n_test), got {len(short)}"
        )
    perm = np.random.default_rng(seed).permutation(len(short))
    ext = [short[i] for i in perm[: config.n_extract]]
    sel = [short[i] for i in perm[config.n_extract : config.n_extract + config.n_select]]
    test = [short[i] for i in perm[config.n_extract + config.n_select : need]]
    return ext, sel, test, len(short)


# ------------------------------------------------------------------------------------------------
# the experiment
# ------------------------------------------------------------------------------------------------
def run_persona(
    model, tokenizer, config: PersonaConfig | None = None, seed: int = 0, progress_bar=None, questions=None
) -> ExperimentResult:
    """Recovery of each prompt's KL effect by one value-site vector vs a matched residual vector and
    a random one. ``questions``: anything :func:`vsteer.extraction.questions_from_data` reads
    (default the shipped HH-RLHF helpful-base first turns)."""
    from vsteer.arch import get_arch
    from vsteer.experiments.common import progress
    from vsteer.experiments.steering import calibration_inputs, matched_residual
    from vsteer.extraction import (
        from_prompts,
        questions_from_data,
        system_prompt_mode,
    )

    config = config or PersonaConfig()
    t0 = time.time()
    if not config.prompts:
        raise DataError("persona needs at least one system prompt")
    if config.n_positions < 1 or min(config.n_select, config.n_test, config.n_extract) < 1:
        raise DataError("persona needs n_positions, n_extract, n_select and n_test of at least 1")
    qs = questions_from_data(questions if questions is not None else "hh-rlhf:helpful")
    ext, sel, test, n_short = _split(qs, tokenizer, config, seed)
    arch = get_arch(model)
    layers = _candidate_layers(config.layer_fractions, arch.n_layers)
    was_training = model.training
    model.eval()
    for est in config.value_estimators:
        if est not in VALUE_ESTIMATORS:
            raise DataError(
                f"unknown value estimator {est!r}; expected some of {', '.join(VALUE_ESTIMATORS)}"
            )
    if not config.value_estimators:
        raise DataError("persona needs at least one value estimator (v or z)")
    counter = {"tokens": 0}
    sites = ("v", "resid") + (("z",) if "z" in config.value_estimators else ())
    vecs = from_prompts(
        model, tokenizer, config.prompts, ext, sites, layers, config.position, batch_size=config.batch_size
    )
    counter["extraction_tokens"] = _extraction_tokens(tokenizer, config.prompts, ext)
    calib = calibration_inputs(model, tokenizer)
    bs, npos = config.batch_size, config.n_positions

    search, chosen, per_prompt, examples, modes, masks = [], {}, {}, {}, {}, {}
    for p_idx, prompt in enumerate(progress(config.prompts, "persona prompts", progress_bar)):
        mode = modes[prompt] = system_prompt_mode(tokenizer, prompt)
        arms = {}
        for layer in layers:
            for est in config.value_estimators:
                v = vecs[prompt]["v"].select_layers([layer])
                if est == "z":
                    v = value_from_z(model, vecs[prompt]["z"].select_layers([layer]))
                arms[(f"v:{est}", layer)] = v
            first = arms[(f"v:{config.value_estimators[0]}", layer)]
            arms[("resid", layer)] = matched_residual(
                model, first, vecs[prompt]["resid"].select_layers([layer]), calib
            )

        # selection: every (layer, scale) for both sites, on questions held out of extraction and test
        score, _, _ = _scorer(model, tokenizer, prompt, mode, sel, npos, bs, counter)
        base_sel = score()
        for (site, layer), vec in arms.items():
            for sc in config.scales:
                rec = recovery(score(vec, sc), base_sel)
                search.append({"prompt": prompt, "site": site, "layer": layer, "scale": sc, "recovery": rec})
        for arm in ("v", "resid"):
            rows = [r for r in search if r["prompt"] == prompt and r["site"].split(":")[0] == arm]
            best = max(rows, key=lambda r: r["recovery"])
            chosen[(prompt, arm)] = (best["site"], best["layer"], best["scale"])

        # held-out test
        score, answers, mask = _scorer(model, tokenizer, prompt, mode, test, npos, bs, counter)
        v_key, v_layer, v_scale = chosen[(prompt, "v")]
        _, r_layer, r_scale = chosen[(prompt, "resid")]
        rand = _matched_random(model, arms[(v_key, v_layer)], v_layer, seed * 1000 + p_idx, calib)
        kls = {
            "base": score(),
            "v": score(arms[(v_key, v_layer)], v_scale),
            "resid": score(arms[("resid", r_layer)], r_scale),
            "random": score(rand, v_scale),
        }
        per_prompt[prompt] = kls
        masks[prompt] = mask
        examples[prompt] = tokenizer.decode(answers[0]) if answers and answers[0] else ""
    model.train(was_training)

    # ---- statistics over test questions (joint resampling keeps prompts paired) ----------------
    prompts = list(config.prompts)
    arm_names = ("v", "resid", "random")

    def stacked(pos_slice):
        # [n_test, n_prompts, arm (v, resid, random, base)]: per-question KL sums
        return np.stack(
            [
                np.stack([per_prompt[p][a][:, pos_slice].sum(1) for a in (*arm_names, "base")], axis=-1)
                for p in prompts
            ],
            axis=1,
        )

    def rec_stat(which: int, minus: int | None = None, only: list[int] | None = None):
        cols = only if only is not None else list(range(len(prompts)))

        def stat(x):
            base = x[:, cols, 3].sum(0)
            r = 1.0 - x[:, cols, which].sum(0) / np.maximum(base, 1e-12)
            if minus is not None:
                r = r - (1.0 - x[:, cols, minus].sum(0) / np.maximum(base, 1e-12))
            return float(r.mean())

        return stat

    all_pos, first = stacked(slice(None)), stacked(slice(0, 1))
    boot = dict(n_boot=config.n_boot, seed=seed)
    records = []
    for j, prompt in enumerate(prompts + ["all prompts (mean)"]):
        only = None if j == len(prompts) else [j]
        for a_idx, arm in enumerate(arm_names):
            est = bootstrap(all_pos, rec_stat(a_idx, only=only), **boot)
            est1 = bootstrap(first, rec_stat(a_idx, only=only), **boot)
            pick = chosen.get((prompt, "resid" if arm == "resid" else "v"), ("", "", ""))
            estimator, layer, scale = pick if only else ("", "", "")
            sl = slice(None) if only is None else slice(j, j + 1)
            n_valid = sum(int(masks[p].sum()) for p in prompts[sl])
            records.append(
                {
                    "prompt": prompt,
                    "arm": arm,
                    "estimator": estimator.partition(":")[2] if arm == "v" else "",
                    "layer": layer,
                    "scale": scale,
                    "recovery": est.value,
                    "low": est.low,
                    "high": est.high,
                    "recovery_first": est1.value,
                    "first_low": est1.low,
                    "first_high": est1.high,
                    "kl_prompt": float(all_pos[:, sl, 3].sum() / max(n_valid, 1)),
                    "kl_steered": float(all_pos[:, sl, a_idx].sum() / max(n_valid, 1)),
                    "n": est.n,
                }
            )

    def pooled(which, minus=None, only=None):
        return bootstrap(all_pos, rec_stat(which, minus, only), **boot)

    n = len(test)
    where = (
        f"{n} held-out HH-RLHF helpful-base questions x {len(prompts)} prompts, answer positions 0-{npos - 1}"
    )
    verdicts = [
        finding(
            "persona.v_recovers",
            claim="one value-site vector (one layer) recovers a role prompt's effect on next-token distributions when the prompt is removed",
            measured=f"share of KL(prompted || unprompted) closed by the v vector, mean over prompts, {where}; "
            "layer and scale chosen per prompt on a selection split",
            effect=pooled(0),
            command=COMMAND,
        ),
        finding(
            "persona.v_vs_resid",
            claim="the value-site vector recovers more of the prompt's effect than a residual-stream vector at matched norm",
            measured=f"recovery, v minus resid (each at its own layer and scale from the same grid of residual-stream norms), paired, {where}",
            effect=pooled(0, minus=1),
            command=COMMAND,
        ),
        finding(
            "persona.v_vs_random",
            claim="the value vector's recovery comes from its direction, not from perturbing the value site",
            measured=f"recovery, v minus a random v direction at the same layer, scale and residual-stream norm, paired, {where}",
            effect=pooled(0, minus=2),
            command=COMMAND,
        ),
    ]
    if STEP_BY_STEP in prompts:
        k = prompts.index(STEP_BY_STEP)
        verdicts.append(
            finding(
                "persona.step_by_step_recovers",
                claim='"Let\'s think step by step" acts through a value subspace: one value vector recovers its effect',
                measured=f"share of KL(prompted || unprompted) closed by the v vector for {STEP_BY_STEP!r} as the system prompt, {n} held-out questions, positions 0-{npos - 1}",
                effect=pooled(0, only=[k]),
                command=COMMAND,
            )
        )
    chosen_text = "; ".join(
        f"{p!r}: {chosen[(p, 'v')][0]} layer {chosen[(p, 'v')][1]} x{chosen[(p, 'v')][2]:g}, "
        f"resid layer {chosen[(p, 'resid')][1]} x{chosen[(p, 'resid')][2]:g}"
        for p in prompts
    )
    mode_text = ", ".join(sorted(set(modes.values())))
    notes = [
        f"Questions: the shipped HH-RLHF helpful-base first human turns of at most {config.max_question_tokens} tokens "
        f"({n_short} of {len(qs)}), split by item: {len(ext)} extraction, {len(sel)} selection, {n} test (seed {seed}). "
        f"System prompts enter as {mode_text} (see vsteer.extraction.system_prompt_mode); on SmolLM2 the run "
        "without a prompt gets the template's default system prompt, so the contrast is the role prompt vs that default.",
        f"Vectors: mean difference with - without the prompt over the template's tail (position {config.position!r}); "
        f"candidate layers {layers}, scales {list(config.scales)}; chosen on the selection split: {chosen_text}.",
        f"Positions: the answer's first position and {npos - 1} teacher-forced positions of the prompted model's own "
        "greedy answer (positions after an end-of-sequence token dropped); vectors added at every position of the "
        "unprompted run. recovery = 1 - sum KL(prompted || steered) / sum KL(prompted || unprompted); "
        "recovery_first: the first position only; kl_* are mean nats per scored position.",
        "Greedy prompted answer starts (first test question): "
        + "; ".join(f"{p!r} -> {examples[p]!r}" for p in prompts)
        + f". {time.time() - t0:.0f} s.",
    ]
    return ExperimentResult(
        name="persona",
        title="Claim 4: does one value vector recover a role prompt's effect? (persona vectors from a prompt)",
        records=records,
        findings=verdicts,
        meta={
            "config": asdict(config),
            "seed": seed,
            "layers": layers,
            "modes": modes,
            "search": search,
            "chosen": {f"{p}|{s}": list(c) for (p, s), c in chosen.items()},
            "examples": examples,
            "forward_tokens": counter,
            "n_questions": {"extract": len(ext), "select": len(sel), "test": n, "eligible": n_short},
            "vectors": {p: vecs[p]["v"].metadata() for p in prompts},
        },
        columns=[
            "prompt",
            "arm",
            "estimator",
            "layer",
            "scale",
            "recovery",
            "low",
            "high",
            "recovery_first",
            "first_low",
            "first_high",
            "kl_prompt",
            "kl_steered",
            "n",
        ],
        notes=notes,
    )
