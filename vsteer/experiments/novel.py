"""Claim: a novel creature ("a newly discovered animal called a 'gloom'") gets a consistent
description because the model composes a category template from the value basis.

Test: a linear probe trained on real animal names (UCI Zoo) vs real object names (COCO categories)
in neutral frames ("Everyone wanted to see the <name>"), read at the name's last token, is applied
to invented names (seeded pseudowords that are no whole word of the tokenizer's vocabulary)
introduced in an animal context ("... a newly discovered animal called a <name>.") or an object
context ("... a newly invented tool called a <name>.") and read at the name's last token in a later
neutral frame that does not restate the category. Per invented name, the probe *transfers* when its
animal score is higher after the animal context than after the object context (chance 0.5; robust to
the calibration shift between real and invented names). The same probe runs at ``v``, ``k``, ``q``
and ``resid``; each site's layer is chosen on a selection half of the invented names and reported on
the other half, intervals by bootstrap over held-out names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vsteer.errors import DataError
from vsteer.evaluate import Estimate, finding, paired_difference
from vsteer.experiments.common import rng, subsample

ANIMAL_CONTEXT = "Scientists described a newly discovered animal called a {}."
OBJECT_CONTEXT = "Engineers described a newly invented tool called a {}."
NEUTRAL_FRAMES = ("Everyone wanted to see the {}", "She wrote a short note about the {}")
ONSETS = ("b", "bl", "br", "d", "dr", "f", "fl", "g", "gl", "gr", "k", "l", "m", "n", "p", "pl", "pr",
          "s", "sk", "sl", "st", "t", "tr", "v", "z")  # fmt: skip
VOWELS = ("a", "e", "i", "o", "u", "oo", "ee")
CODAS = ("", "", "b", "d", "k", "l", "m", "n", "p", "r", "s", "t", "nd", "rk", "sh")
MIDDLE = ("b", "d", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")


def vocab_words(tokenizer) -> set[str]:
    """Whole words of a tokenizer's vocabulary, lower-cased, without the word-start marker (GPT-2's
    ``Ġ``, SentencePiece's ``▁``); empty for a tokenizer without ``get_vocab``."""
    get = getattr(tokenizer, "get_vocab", None)
    if get is None:
        return set()
    out = set()
    for piece in get():
        word = piece.lstrip("Ġ▁ ").lower()
        if word.isalpha():
            out.add(word)
    return out


def pseudowords(n: int, seed: int = 0, reject=(), max_tries: int = 100_000) -> list[str]:
    """``n`` distinct pronounceable pseudowords, two syllables (onset-vowel-consonant-vowel-coda, e.g.
    ``"blomet"``), drawn with ``seed``; any word in ``reject`` (compared lower-cased: a tokenizer's
    :func:`vocab_words`, real names) is skipped. Same ``n``, ``seed`` and ``reject`` give the same list."""
    if not isinstance(n, int) or n < 1:
        raise DataError(f"n must be an int >= 1 (pseudowords), got {n!r}")
    reject = {w.lower() for w in reject}
    g = rng(seed)
    out: list[str] = []
    for _ in range(max_tries):
        pick = [ONSETS, VOWELS, MIDDLE, VOWELS, CODAS]
        word = "".join(part[g.integers(len(part))] for part in pick)
        if 4 <= len(word) <= 8 and word not in reject and word not in out:
            out.append(word)
            if len(out) == n:
                return out
    raise DataError(
        f"found only {len(out)} of {n} pseudowords outside the rejected words in {max_tries} tries"
    )


def name_texts(names, frames=NEUTRAL_FRAMES, context: str | None = None, before: bool = False) -> list[str]:
    """``len(names) * len(frames)`` texts, name-major; each ends at the name (its last token is read),
    or with ``before`` at the token before it (the control position)."""
    pre = "" if context is None else context + " "
    out = []
    for name in names:
        for frame in frames:
            text = pre.format(name) + frame.format(name)
            out.append(text[: -len(name)].rstrip() if before else text)
    return out


@dataclass
class NovelFit:
    """Per site: the chosen layer, held-out real-name accuracy, transfer indicators over held-out
    invented names ``[n_test_names]`` (1 = higher animal score after the animal context, 0.5 = tie)."""

    site: str
    layer: int
    real_accuracy: float
    selection_share: float
    transfer: np.ndarray
    accuracy: float  # share of held-out (name, context) items on the probe's correct side of 0.5
    control: np.ndarray  # [n_test_names] the same indicator at the token before the name


def _probe(x, y, C):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=300, tol=1e-3)).fit(x, y)


def run_novel(model, tokenizer, sites, layers, n_names: int, C: float, seed: int, batch_size: int,
              max_length: int, progress_bar=None, n_frames: int = 1):  # fmt: skip
    """The novel-name transfer test. Returns ``(fits, findings, notes, meta)``; ``fits`` maps each
    site to its :class:`NovelFit`."""
    from vsteer.data.contrasts import animal_names, object_names
    from vsteer.experiments.probing import collect_features

    objects = object_names()
    animals = subsample(animal_names(), len(objects), seed)  # balanced classes
    g = rng(seed)
    real = [(n, 1) for n in animals] + [(n, 0) for n in objects]
    order = g.permutation(len(real))
    cut = int(round(0.75 * len(real)))
    real_train = [real[i] for i in order[:cut]]
    real_test = [real[i] for i in order[cut:]]
    if n_names < 4:
        raise DataError(f"novel_names must be >= 4 (two selection and two held-out names), got {n_names}")
    invented = pseudowords(n_names, seed, vocab_words(tokenizer) | set(animal_names()) | set(objects))
    if not 1 <= n_frames <= len(NEUTRAL_FRAMES):
        raise DataError(f"novel_frames must be in 1..{len(NEUTRAL_FRAMES)}, got {n_frames}")
    frames = NEUTRAL_FRAMES[:n_frames]
    inv = NEUTRAL_FRAMES[:1]  # invented names: one later frame (CPU budget)
    nf = len(frames)
    texts = (
        name_texts([n for n, _ in real_train], frames)
        + name_texts([n for n, _ in real_test], frames)
        + name_texts(invented, inv, ANIMAL_CONTEXT)
        + name_texts(invented, inv, OBJECT_CONTEXT)
        + name_texts(invented, inv, ANIMAL_CONTEXT, before=True)
        + name_texts(invented, inv, OBJECT_CONTEXT, before=True)
    )
    feats = collect_features(
        model, tokenizer, texts, sites, layers, "last", batch_size, max_length, progress_bar
    )
    a, b = len(real_train) * nf, (len(real_train) + len(real_test)) * nf
    m = n_names * len(inv)
    y_train = np.repeat([y for _, y in real_train], nf)
    y_test = np.repeat([y for _, y in real_test], nf)
    half = n_names // 2
    fits, table = {}, []
    for site in sites:
        best = None
        for layer in layers:
            x = feats[(site, layer)]
            sc = score_site(
                x[:a], y_train, x[a:b], y_test, x[b : b + m], x[b + m : b + 2 * m],
                x[b + 2 * m : b + 3 * m], x[b + 3 * m :], C, len(inv),
            )  # fmt: skip
            ind, control = sc["transfer"], sc["control"]
            sel = float(ind[:half].mean())
            acc = float(np.concatenate([sc["s_animal"][half:] > 0, sc["s_object"][half:] < 0]).mean())
            table.append(
                {"site": site, "layer": layer, "real_accuracy": sc["real_accuracy"], "selection_share": sel,
                 "held_out_share": float(ind[half:].mean()), "held_out_accuracy": acc,
                 "control_share": float(control[half:].mean())}
            )  # fmt: skip
            if best is None or sel > best.selection_share:
                best = NovelFit(site, layer, sc["real_accuracy"], sel, ind[half:], acc, control[half:])
        fits[site] = best
    findings, cmd = [], "vsteer run recipes/claims.yaml --only probes"
    n_test = n_names - half
    if "v" in fits:
        f = fits["v"]
        findings.append(
            finding(
                "probing.novel_v_transfers",
                claim="an animal-vs-object probe trained on real names, read at the value site, gives an invented "
                "name the category its context assigned (novel 'gloom')",
                measured=f"share of {n_test} held-out invented names whose animal score at v.{f.layer} is higher "
                "after an animal context than after an object context (chance 0.5); layer chosen on "
                f"{half} other names",
                effect=_share(f.transfer, seed),
                command=cmd,
            )
        )
        findings.append(
            finding(
                "probing.novel_v_beyond_context",
                claim="the category is bound to the invented name's value vector, beyond what the context alone gives",
                measured=f"held-out transfer share at v.{f.layer}, the name's token minus the token before it "
                f"(control {f.control.mean():.3g}), paired over {n_test} invented names",
                effect=paired_difference(f.transfer, f.control, seed=seed),
                command=cmd,
            )
        )
        if "resid" in fits:
            r = fits["resid"]
            findings.append(
                finding(
                    "probing.novel_v_vs_resid",
                    claim="the value site carries the invented name's category more reliably than the residual stream",
                    measured=f"held-out transfer share, v (layer {f.layer}: {f.transfer.mean():.3g}) minus resid "
                    f"(layer {r.layer}: {r.transfer.mean():.3g}), paired over {n_test} invented names",
                    effect=paired_difference(f.transfer, r.transfer, seed=seed),
                    command=cmd,
                )
            )
    notes = [
        f"Novel names: probe (standardised logistic, C={C}) trained on {len(real_train)} real names "
        f"({len(animals)} UCI Zoo animals, {len(objects)} COCO objects, balanced; 75/25 split by name) in "
        f"{nf} neutral frame(s); applied to {n_names} invented names (seed {seed}, e.g. "
        f"{', '.join(invented[:4])}) after an animal or an object context, read at the name's last token in "
        "the first neutral frame. Per site, the layer is chosen on the first half of the invented names. "
        "Control: the same probe at the token before the name's later mention (the context is there, the name "
        "is not): a share as high as the name's says the category is read from the context, not bound to the name.",
        "",
        _table(table, fits),
    ]
    meta = {"invented_names": invented, "novel_table": table}
    return fits, findings, notes, meta


def score_site(
    x_train, y_train, x_test, y_test, x_animal, x_object, c_animal, c_object, C: float, n_frames: int = 1
) -> dict:
    """Fit the real-name probe on ``x_train`` ``[n, dim]`` and score it. ``x_animal``/``x_object``
    ``[n_names * n_frames, dim]`` (name-major): invented names after each context; ``c_*`` the same at
    the token before the name. Returns held-out real-name ``real_accuracy``, per-name animal log-odds
    ``s_animal``/``s_object`` ``[n_names]`` (mean over frames), and the ``transfer``/``control`` indicators."""
    probe = _probe(x_train, y_train, C)

    def per_name(x):
        return probe.decision_function(x).reshape(-1, n_frames).mean(1)

    s_animal, s_object = per_name(x_animal), per_name(x_object)
    return {
        "real_accuracy": float((probe.predict(x_test) == y_test).mean()),
        "s_animal": s_animal,
        "s_object": s_object,
        "transfer": _transfer(s_animal, s_object),
        "control": _transfer(per_name(c_animal), per_name(c_object)),
    }


def _transfer(s_animal: np.ndarray, s_object: np.ndarray) -> np.ndarray:
    """Per name: 1 when the animal score is higher after the animal context, 0.5 on a tie, else 0."""
    return np.where(s_animal > s_object, 1.0, np.where(s_animal == s_object, 0.5, 0.0))


def _share(values: np.ndarray, seed: int) -> Estimate:
    from vsteer.evaluate import bootstrap

    return bootstrap(np.asarray(values, dtype=float), seed=seed)


def _table(rows, fits) -> str:
    lines = [
        "| site | layer | real-name accuracy | selection share | held-out share | held-out accuracy "
        "| control share (token before the name) | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chosen = "yes" if fits[r["site"]].layer == r["layer"] else ""
        lines.append(
            f"| {r['site']} | {r['layer']} | {r['real_accuracy']:.3f} | {r['selection_share']:.3f} | "
            f"{r['held_out_share']:.3f} | {r['held_out_accuracy']:.3f} | {r['control_share']:.3f} | {chosen} |"
        )
    return "\n".join(lines)
