"""Claim: value vectors encode polarity, intensity and negation separately ("good" vs "not bad").

Polarity and intensity are tested at the word level with the VADER lexicon's human valence ratings
(Hutto & Gilbert 2014: mean of 10 raters on -4..+4; MIT, installed with the ``vaderSentiment``
wheel vsteer depends on, its file hash checked): words rated mild (0.5 <= |valence| <= 1.2) or strong
(|valence| >= 2.2), positive or negative, equally many in each of the four cells, so polarity
and intensity are independent by construction. Each word is read at its last token in one
neutral frame; a probe for polarity and one for intensity are fit at the value site (split by
word, random-label controls as in :mod:`vsteer.experiments.probing`). Negation stays untested:
no labelled negation data with a clear licence (the SST phrase scores have none stated).
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
NEGATION_UNTESTED = (
    "negation: no labelled negation data with a clear licence could be found (the Stanford Sentiment Treebank's "
    "phrase-level scores, which would give 'not bad' vs 'good', state no licence; the shipped SST-2 is sentence-level)"
)


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
        f"{len(tr)} train / {len(te)} held-out words; mild {MILD[0]}..{MILD[1]}, strong >= {STRONG} in |valence|). "
        f"Untested: {NEGATION_UNTESTED}.",
        "",
        "\n".join(table),
    ]
    return findings, notes, {"intensity_words": [w for w, _, _ in words]}
