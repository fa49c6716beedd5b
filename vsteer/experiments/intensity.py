"""Claim: value vectors encode polarity, intensity and negation separately ("good" vs "not bad").

Polarity and intensity are tested at the word level with the VADER lexicon's human valence ratings
(Hutto & Gilbert 2014: mean of 10 raters on -4..+4; MIT, installed with the ``vaderSentiment``
wheel vsteer depends on, its file hash checked): words rated mild (0.5 <= |valence| <= 1.2) or strong
(|valence| >= 2.2), positive or negative, equally many in each of the four cells, so polarity
and intensity are independent by construction. Each word is read at its last token in one
neutral frame; a probe for polarity and one for intensity are fit at the value site (split by
word, random-label controls as in :mod:`vsteer.experiments.probing`).

Negation is tested on sentences: CondaQA's minimal pairs (Ravichander et al. 2022, Apache-2.0), a
Wikipedia sentence with a negation cue ("not", "rarely", "unable", "lack", "unlike", ...) and a
crowdworker's edit of it with the negation undone. Each sentence is read at its last token; a probe
for negated vs affirmative is fit at the value site (split by pair, so a sentence and its edit are
never on both sides; random-label controls), with ``k``/``q``/``resid`` at the same layer and a
bag-of-words baseline on the same split for scale: the cue is a word, so words alone separate much.
"""

from __future__ import annotations

import numpy as np

from vsteer.errors import DataError
from vsteer.evaluate import finding
from vsteer.experiments.common import rng

# sha256 of vaderSentiment 3.3.2's vader_lexicon.txt (the ratings this test was written against)
VADER_LEXICON_SHA256 = "1ec9c6e9ee19aade328f8beb393a6afa71a5bb3acf7d3cc22d4ef568df374bf5"
FRAME = "Someone wrote the word {}"
MILD, STRONG = (0.5, 1.2), 2.2


def vader_valence() -> dict[str, float]:
    """The VADER lexicon ``{token: mean valence}`` from the installed ``vaderSentiment`` wheel, after
    checking its SHA-256 against :data:`VADER_LEXICON_SHA256`."""
    import hashlib
    from importlib import resources

    try:
        raw = (resources.files("vaderSentiment") / "vader_lexicon.txt").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise DataError(
            f"the VADER lexicon is not installed ({err}); pip install 'vaderSentiment>=3.3,<4'"
        ) from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != VADER_LEXICON_SHA256:
        raise DataError(
            f"vader_lexicon.txt has sha256 {digest[:12]}…; expected {VADER_LEXICON_SHA256[:12]}… (3.3.2)"
        )
    out = {}
    for line in raw.decode("utf-8").splitlines():
        cols = line.split("\t")
        if len(cols) >= 2:
            out[cols[0]] = float(cols[1])
    return out


def intensity_words(n: int, seed: int, vocabulary=None) -> list[tuple[str, int, int]]:
    """``n`` words ``(word, polarity, intensity)`` (1 = positive / strong), ``n // 4`` per cell, drawn
    with ``seed`` from the alphabetic lower-case VADER words that occur in ``vocabulary`` (default: the
    words of the shipped SST-2 train sentences, which leaves out VADER's slang and acronyms)."""
    if vocabulary is None:
        from vsteer.data import sst2

        vocabulary = {w for t, _ in sst2("train") for w in t.split()}
    cells = {(p, s): [] for p in (0, 1) for s in (0, 1)}
    for word, v in sorted(vader_valence().items()):
        if not (word.isalpha() and word.islower() and word in vocabulary):
            continue
        strong = 1 if abs(v) >= STRONG else 0 if MILD[0] <= abs(v) <= MILD[1] else None
        if strong is not None:
            cells[(int(v > 0), strong)].append(word)
    k = n // 4
    if k < 2 or any(len(c) < k for c in cells.values()):
        sizes = {key: len(c) for key, c in cells.items()}
        raise DataError(f"intensity_words needs n >= 8 and n/4 words per cell; cells have {sizes}, asked {k}")
    g = rng(seed)
    return [(str(w), p, s) for (p, s), c in cells.items() for w in sorted(g.choice(c, size=k, replace=False))]


def run_intensity(model, tokenizer, layer: int, n_words: int, config, seed: int, progress_bar=None):
    """Polarity and intensity probes at ``v.layer`` (and ``resid.layer`` for scale). Returns
    ``(findings, notes, meta)``."""
    from vsteer.experiments.probing import collect_features, fit_probe, selectivity

    words = intensity_words(n_words, seed)
    sites = [s for s in ("v", "resid") if s in config.sites] or ["v"]
    feats = collect_features(
        model, tokenizer, [FRAME.format(w) for w, _, _ in words], sites, [layer], "last",
        config.batch_size, config.max_length, progress_bar,
    )  # fmt: skip
    order = rng(seed + 7).permutation(len(words))
    cut = len(words) // 2
    tr, te = order[:cut], order[cut:]
    labels = {"polarity": np.array([p for _, p, _ in words]), "intensity": np.array([s for _, _, s in words])}
    rows, findings, cmd = [], [], "vsteer run recipes/claims.yaml --only probes"
    for site in sites:
        x = feats[(site, layer)]
        for what, y in labels.items():
            fit = fit_probe(x[tr], y[tr], x[te], y[te], config.Cs, config.cv, seed, 3)
            sel = selectivity(fit.correct, fit.control_correct, seed=seed, n_boot=500)
            rows.append((site, what, fit.accuracy, fit.control_accuracy, sel))
            if site == "v":
                findings.append(
                    finding(
                        "probing.selectivity",
                        claim=f"value vectors (v.{layer}) encode a word's sentiment {what}, "
                        f"{'with intensity balanced' if what == 'polarity' else 'within each polarity'}",
                        measured=f"{what} probe accuracy − random-label control accuracy, {len(te)} held-out "
                        "VADER words (mild vs strong, positive vs negative, balanced)",
                        effect=sel,
                        command=cmd,
                    )
                )
    table = ["| site | label | accuracy | control | selectivity [95% CI] |", "|---|---|---|---|---|"]
    table += [
        f"| {s}.{layer} | {w} | {a:.3f} | {c:.3f} | {e.value:.3f} [{e.low:.3f}, {e.high:.3f}] |"
        for s, w, a, c, e in rows
    ]
    notes = [
        f"Polarity and intensity (VADER lexicon, {len(words)} words in the frame '{FRAME.format('<word>')}', "
        f"{len(tr)} train / {len(te)} held-out words; mild {MILD[0]}..{MILD[1]}, strong >= {STRONG} in |valence|).",
        "",
        "\n".join(table),
    ]
    return findings, notes, {"intensity_words": [w for w, _, _ in words]}


def run_negation(model, tokenizer, layer: int, n_pairs: int, config, seed: int, progress_bar=None):
    """Negated vs affirmative sentence probes at ``layer`` (CondaQA minimal pairs, ``n_pairs`` drawn
    with ``seed``, half of the pairs for training). Returns ``(findings, notes, meta)``."""
    from vsteer.data.contrasts import negation_pairs
    from vsteer.experiments.monitoring import bag_of_words
    from vsteer.experiments.probing import collect_features, fit_probe, selectivity

    pool = negation_pairs()
    if not 4 <= n_pairs <= len(pool):
        raise DataError(
            f"negation_pairs must be between 4 and {len(pool)} (CondaQA pairs shipped), got {n_pairs}"
        )
    picked = [pool[i] for i in sorted(rng(seed + 11).choice(len(pool), size=n_pairs, replace=False))]
    texts = [p["negated"] for p in picked] + [p["affirmative"] for p in picked]
    y = np.r_[np.ones(n_pairs, dtype=int), np.zeros(n_pairs, dtype=int)]
    sites = [s for s in ("v", "k", "q", "resid") if s in config.sites] or ["v"]
    # the sentences run to about 100 tokens: read each at its own last token, not at a truncation
    feats = collect_features(
        model, tokenizer, texts, sites, [layer], "last", config.batch_size, max(config.max_length, 160),
        progress_bar,
    )  # fmt: skip
    order = rng(seed + 13).permutation(n_pairs)
    tr_pairs, te_pairs = np.sort(order[: n_pairs // 2]), np.sort(order[n_pairs // 2 :])
    tr, te = np.r_[tr_pairs, tr_pairs + n_pairs], np.r_[te_pairs, te_pairs + n_pairs]
    pos, neg = bag_of_words(
        [texts[i] for i in tr_pairs], [texts[i + n_pairs] for i in tr_pairs],
        [texts[i] for i in te_pairs], [texts[i + n_pairs] for i in te_pairs],
    )  # fmt: skip
    bow_accuracy = float(np.r_[pos > 0, neg <= 0].mean())
    rows, findings = [], []
    for site in sites:
        x = feats[(site, layer)]
        fit = fit_probe(x[tr], y[tr], x[te], y[te], config.Cs, config.cv, seed, 3)
        # a sentence and its edit are one pair: resample pairs, not sentences
        sel = selectivity(fit.correct, fit.control_correct, seed=seed, n_boot=500, groups=te % n_pairs)
        rows.append((site, fit.accuracy, fit.control_accuracy, sel))
        if site == "v":
            findings.append(
                finding(
                    "probing.selectivity",
                    claim=f"value vectors (v.{layer}) encode negation: a negated sentence vs the same sentence "
                    "with the negation undone",
                    measured=f"negation probe accuracy ({fit.accuracy:.3f}) − random-label control accuracy, "
                    f"{len(te)} held-out sentences ({len(te_pairs)} CondaQA pairs, split and resampled by pair); "
                    f"bag-of-words baseline accuracy {bow_accuracy:.3f}",
                    effect=sel,
                    command="vsteer run recipes/claims.yaml --only probes",
                )
            )
    cues = len({p["cue"].lower() for p in picked})
    table = ["| site | accuracy | control | selectivity [95% CI] |", "|---|---|---|---|"]
    table += [
        f"| {s}.{layer} | {a:.3f} | {c:.3f} | {e.value:.3f} [{e.low:.3f}, {e.high:.3f}] |"
        for s, a, c, e in rows
    ]
    table.append(f"| bag of words | {bow_accuracy:.3f} | | |")
    notes = [
        f"Negation (CondaQA minimal pairs: {n_pairs} of {len(pool)} pairs, {cues} distinct cues; a Wikipedia "
        f"sentence with a negation cue vs a crowdworker's edit with the negation undone; read at the sentence's "
        f"last token; {len(tr_pairs)} train / {len(te_pairs)} held-out pairs). The cue is a word, so the "
        "bag-of-words baseline (CountVectorizer + logistic regression on the same split) shows how much the "
        "words alone give.",
        "",
        "\n".join(table),
    ]
    return findings, notes, {"negation_passages": [p["passage_id"] for p in picked]}
