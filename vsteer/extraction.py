"""Extraction of steering vectors from contrastive pairs.

``pairs`` is a list of ``(positive, negative)``; each side is a plain string, a list of chat
messages (a final ``assistant`` message is the *completion*: the prompt goes through the chat
template, the completion is appended as the start of the assistant turn), or an
:class:`Example` ``(prompt, completion)``.

Position rules (where a side's activation is read):

``"answer"``      the last token of the completion: for CAA items the completion is ``"(A"``,
                  so this is the answer letter (Rimsky et al. 2024)
``"last"``        the last token of the text (repeng's rule)
``"completion"``  mean over the completion tokens
``"mean"``        mean over all tokens

Methods (``P``, ``N``: ``[n_pairs, features]`` activations of positives and negatives at one
layer, ``D = P - N``):

``"mean_diff"``   ``mean(D)`` (CAA)
``"pca_diff"``    first principal axis of ``D`` (repeng's default method, but uncentred), signed so
                  that positives project above their negatives in most pairs, with norm
                  ``mean(|D @ u|)`` so that scale 1 is one typical pair difference
``"logistic"``    unit normal of a logistic-regression probe separating ``P`` from ``N``, with
                  norm ``mean(D @ u)``

One forward pass per batch captures every requested layer and stops after the deepest one;
sequences are sorted by length so that batches carry little padding (right padding: with
causal attention it cannot change the real tokens' activations).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vsteer.encoding import length_batches, pad_batch, pad_token_id, to_numpy, token_ids
from vsteer.errors import DataError, VectorError
from vsteer.models import model_device
from vsteer.vectors import SteeringVector

METHODS = ("mean_diff", "pca_diff", "logistic")
POSITIONS = ("answer", "last", "completion", "mean")


@dataclass(frozen=True)
class Example:
    """One side of a pair: a prompt (text or chat messages) and an optional completion."""

    prompt: str | list[dict]
    completion: str = ""


class Pairs(list):
    """A list of ``(positive, negative)`` with the files they came from (``sources``) and a name."""

    def __init__(
        self, items=(), sources: list[dict] | None = None, name: str = "", position: str | None = None
    ):
        super().__init__(items)
        self.sources = list(sources or [])
        self.name = name
        self.position = position


# ----------------------------------------------------------------------------------------------
# tokenisation
# ----------------------------------------------------------------------------------------------
def _as_example(side) -> Example:
    if isinstance(side, Example):
        return side
    if isinstance(side, str):
        return Example(side)
    if isinstance(side, list | tuple) and side and all(isinstance(m, dict) for m in side):
        messages = list(side)
        if messages[-1].get("role") == "assistant":
            return Example(messages[:-1], messages[-1].get("content", ""))
        return Example(messages)
    raise DataError(
        f"a pair side must be a string, a list of chat messages or an Example, got {type(side).__name__}: {side!r:.80}"
    )


def encode(tokenizer, side) -> tuple[list[int], int]:
    """Token ids of one side and the number of prompt tokens (the rest is the completion)."""
    ex = _as_example(side)
    prompt_ids = token_ids(tokenizer, ex.prompt)  # a text, or messages through the chat template
    completion_ids = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] if ex.completion else []
    ids = list(prompt_ids) + list(completion_ids)
    if not ids:
        raise DataError(f"pair side {side!r:.80} has no tokens")
    return ids, len(prompt_ids)


def _weights(position: str, length: int, n_prompt: int) -> torch.Tensor:
    """``[length]`` weights over tokens that average to the activation a position rule reads."""
    w = torch.zeros(length)
    n_completion = length - n_prompt
    if position in ("answer", "completion") and n_completion == 0:
        raise DataError(
            f"position {position!r} needs a completion (a final assistant message or Example.completion); "
            f"use position='last' for plain texts"
        )
    if position in ("answer", "last"):
        w[length - 1] = 1.0
    elif position == "completion":
        w[n_prompt:] = 1.0 / n_completion
    elif position == "mean":
        w[:] = 1.0 / length
    else:
        raise VectorError(f"unknown position rule {position!r}; expected one of {', '.join(POSITIONS)}")
    return w


# ----------------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------------
def collect(
    model,
    tokenizer,
    texts: Sequence,
    site: str | Sequence[str],
    layers: list[int],
    position: str,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[int, torch.Tensor]:
    """``{layer: [len(texts), *site_shape]}`` float32 activations read by ``position``
    (``{(site, layer): ...}`` when ``site`` is a list of sites, all captured in the same passes).

    Runs the model on batches sorted by length and stops each forward after the deepest layer.
    """
    from vsteer.hooks import captured_forward

    encoded = [encode(tokenizer, t) for t in texts]
    pad, device = pad_token_id(tokenizer), model_device(model)
    names = [site] if isinstance(site, str) else list(site)
    sites = [(name, layer) for name in names for layer in layers]
    out: dict = {key: None for key in sites}
    batches = length_batches([len(e[0]) for e in encoded], batch_size)  # little padding per batch
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"extracting {'+'.join(names)} at {len(layers)} layer(s)", unit="batch")
    for batch in batches:
        inputs = pad_batch([encoded[i][0] for i in batch], pad, padding_side="right", device=device)
        weights = torch.zeros(inputs["input_ids"].shape)
        for row, i in enumerate(batch):
            seq, n_prompt = encoded[i]
            weights[row, : len(seq)] = _weights(position, len(seq), n_prompt)
        acts = captured_forward(model, sites, stop=True, use_cache=False, **inputs)
        index = torch.tensor(batch)
        for key in sites:
            x = acts[key].float()
            w = weights.to(x.device).reshape(weights.shape + (1,) * (x.dim() - 2))
            feats = (x * w).sum(dim=1).cpu()
            if out[key] is None:
                out[key] = torch.empty((len(texts),) + tuple(feats.shape[1:]))
            out[key][index] = feats
    return {key[1]: t for key, t in out.items()} if isinstance(site, str) else out


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
def direction(pos: torch.Tensor, neg: torch.Tensor, method: str) -> torch.Tensor:
    """One direction from ``pos``/``neg`` ``[n, *shape]`` activations; returns ``[*shape]``."""
    shape = pos.shape[1:]
    p = pos.reshape(len(pos), -1).double()
    n = neg.reshape(len(neg), -1).double()
    d = p - n
    if method == "mean_diff":
        out = d.mean(0)
    elif method == "pca_diff":
        if len(d) < 2:
            raise DataError("pca_diff needs at least 2 pairs")
        # not centred (repeng's sklearn PCA centres D): centring removes the mean difference, the
        # component every pair shares, and leaves only how the pairs vary around it
        _, _, vh = torch.linalg.svd(d, full_matrices=False)
        u = vh[0]
        # repeng's sign rule: positives should project above their own negatives in most pairs
        if ((p @ u) > (n @ u)).double().mean() < ((p @ u) < (n @ u)).double().mean():
            u = -u
        out = u * (d @ u).abs().mean()
    elif method == "logistic":
        from sklearn.linear_model import LogisticRegression

        x = to_numpy(torch.cat([p, n]))
        y = np.r_[np.ones(len(p)), np.zeros(len(n))]
        scale = float(x.std()) or 1.0
        probe = LogisticRegression(C=1.0, max_iter=2000).fit(x / scale, y)
        u = torch.from_numpy(probe.coef_[0]).double()
        u = u / u.norm().clamp_min(1e-12)
        out = u * (d @ u).mean()
    else:
        raise VectorError(f"unknown extraction method {method!r}; expected one of {', '.join(METHODS)}")
    return out.float().reshape(shape)


def extract(
    model,
    tokenizer,
    pairs: Sequence,
    site: str = "v",
    layers=None,
    method: str = "mean_diff",
    position: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> SteeringVector:
    """Extract a :class:`~vsteer.vectors.SteeringVector` at ``site`` on ``layers`` from ``pairs``.

    ``layers``: ``None``/``"all"``, ``"8-16"``, an int or a list. ``position``: a rule from
    :data:`POSITIONS`; by default ``pairs.position`` for the dataset readers, else ``"answer"``
    when every side has a completion and ``"last"`` otherwise. The forward pass stops after the
    deepest requested layer.
    """
    return extract_sites(model, tokenizer, pairs, (site,), layers, method, position, batch_size, progress)[
        site
    ]


def extract_sites(
    model,
    tokenizer,
    pairs: Sequence,
    sites: Sequence[str] = ("v",),
    layers=None,
    method: str = "mean_diff",
    position: str | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, SteeringVector]:
    """Like :func:`extract` for several sites at once (one set of forward passes): ``{site: vector}``."""
    from vsteer.arch import get_arch
    from vsteer.sites import check_site_name, parse_layers

    sites = [check_site_name(s) for s in sites]
    if method not in METHODS:
        raise VectorError(f"unknown extraction method {method!r}; expected one of {', '.join(METHODS)}")
    arch = get_arch(model)
    layer_list = parse_layers(layers, arch.n_layers)
    if not isinstance(pairs, Pairs):
        pairs = list(pairs)
    if not pairs:
        raise DataError("extract needs at least one (positive, negative) pair")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise DataError(f"pair {i} must be (positive, negative), got {pair!r:.80}")
    position = position or getattr(pairs, "position", None) or _default_position(pairs)
    if position not in POSITIONS:
        raise VectorError(f"unknown position rule {position!r}; expected one of {', '.join(POSITIONS)}")
    texts = [side for pair in pairs for side in pair]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            acts = collect(model, tokenizer, texts, sites, layer_list, position, batch_size, progress)
    finally:
        model.train(was_training)
    return {
        site: SteeringVector.for_model(
            model,
            {
                layer: direction(acts[(site, layer)][0::2], acts[(site, layer)][1::2], method)
                for layer in layer_list
            },
            site,
            method=method,
            position=position,
            data=list(getattr(pairs, "sources", [])),
            extra={"n_pairs": len(pairs), "dataset": getattr(pairs, "name", "")},
        )
        for site in sites
    }


def _default_position(pairs) -> str:
    has_completion = all(_as_example(side).completion for pair in pairs[:50] for side in pair)
    return "answer" if has_completion else "last"


# ----------------------------------------------------------------------------------------------
# pairs from the packaged datasets (readers live in vsteer.data)
# ----------------------------------------------------------------------------------------------
_LETTER = re.compile(r"^\(?([A-Z])\)?$")


def answer_completion(answer: str) -> str:
    """The assistant completion that states an answer: ``"(A)"`` -> ``"(A"`` (read at ``A``), ``" Yes"`` -> ``"Yes"``."""
    a = answer.strip()
    m = _LETTER.match(a)
    return f"({m.group(1)}" if m else a


def ab_pair(question: str, matching: str, not_matching: str) -> tuple[list[dict], list[dict]]:
    """Chat messages answering an A/B (or Yes/No) item with the matching and the other answer."""
    user = {"role": "user", "content": question}
    return (
        [user, {"role": "assistant", "content": answer_completion(matching)}],
        [user, {"role": "assistant", "content": answer_completion(not_matching)}],
    )


def data_sources(*names: str) -> list[dict]:
    from vsteer import data

    return [{"path": name, "sha256": data.file_sha256(name)} for name in names]


def check_limit(limit, what: str = "limit") -> int | None:
    """``limit`` as given when it is None or an integer >= 1; anything else is one error line (a
    negative slice end would drop items silently)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int | np.integer) or limit < 1:
        raise DataError(f"{what} must be an integer >= 1 (or None for all), got {limit!r}")
    return int(limit)


def caa_pairs(
    behaviour: str, split: str = "generate", limit: int | None = None, balanced: bool = True
) -> Pairs:
    """CAA A/B items of ``behaviour`` as pairs answering with the matching vs the other letter.

    ``balanced`` (default): each item twice, once with its options swapped, so that "(A)" and "(B)"
    match equally often and the letter's identity cancels in the mean difference
    (:func:`vsteer.data.balance_answers`); ``limit`` counts pairs (rounded down to even).
    """
    check_limit(limit)
    from vsteer import data

    items = data.caa_ab(behaviour, split=split)
    items = data.balance_answers(items, limit, f"caa:{behaviour}") if balanced else items[:limit]
    return Pairs(
        [ab_pair(it.question, it.matching, it.not_matching) for it in items],
        sources=data_sources(
            f"caa/{split}/{behaviour}/{'generate_dataset' if split == 'generate' else 'test_dataset_ab'}.json"
        ),
        name=f"caa:{behaviour}:{split}",
        position="answer",
    )


def persona_pairs(trait: str, limit: int | None = None, offset: int = 0, balanced: bool = True) -> Pairs:
    """Anthropic persona statements (Yes/No) of ``trait`` as pairs answering matching vs not.

    ``balanced`` (default): as many statements matching "Yes" as matching "No", so that the pairs are
    not a Yes-vs-No token contrast; ``limit`` counts pairs (rounded down to even).
    """
    check_limit(limit)
    from vsteer import data

    items = data.persona_ab(trait)[offset:]
    if balanced:
        items = data.balance_answers(items, limit, f"persona:{trait}")
    else:
        items = items[:limit] if limit is not None else items
    return Pairs(
        [ab_pair(it.question, it.matching, it.not_matching) for it in items],
        sources=data_sources(f"anthropic-evals/persona/{trait}.jsonl"),
        name=f"persona:{trait}",
        position="answer",
    )


def template_pairs(positive: str = "happy", negative: str = "sad", limit: int | None = None) -> Pairs:
    """repeng-style persona templates (``"Pretend you are an extremely happy person..."``) with
    the response prefixes, positive vs negative persona."""
    check_limit(limit)
    from vsteer import data

    raw = data.persona_template_pairs(positive, negative)[:limit]
    return Pairs(
        [_pair_of(p) for p in raw],
        sources=data_sources("repeng/all_truncated_outputs.json"),
        name=f"template:{positive},{negative}",
        position="last",
    )


def sst2_pairs(split: str = "train", limit: int | None = None) -> Pairs:
    """SST-2 positive vs negative sentences, zipped into pairs (mean over the sentence tokens)."""
    check_limit(limit)
    from vsteer import data

    rows = data.sst2(split)
    pos = [_text_of(r) for r in rows if _label_of(r) == 1]
    neg = [_text_of(r) for r in rows if _label_of(r) == 0]
    n = min(len(pos), len(neg)) if limit is None else min(len(pos), len(neg), limit)
    return Pairs(
        list(zip(pos[:n], neg[:n])),
        sources=data_sources(f"sst2/stsa.binary.{split}"),
        name=f"sst2:{split}",
        position="mean",
    )


def _pair_of(p):
    if isinstance(p, tuple | list) and len(p) == 2:
        return tuple(p)
    pos = getattr(p, "positive", None)
    neg = getattr(p, "negative", None)
    if pos is None or neg is None:
        raise DataError(f"cannot read a (positive, negative) pair from {p!r:.80}")
    return (pos, neg)


def _text_of(row) -> str:
    if isinstance(row, dict):
        return row.get("text") or row.get("sentence")
    if isinstance(row, tuple | list):
        return row[1] if isinstance(row[0], int) else row[0]
    return getattr(row, "text", None) or row.sentence


def _label_of(row) -> int:
    if isinstance(row, dict):
        return int(row["label"])
    if isinstance(row, tuple | list):
        return int(row[0] if isinstance(row[0], int) else row[1])
    return int(row.label)


def pairs_from_spec(spec: str, limit: int | None = None) -> Pairs:
    """Pairs named on the command line: ``caa:BEHAVIOUR``, ``persona:TRAIT``, ``template:POS,NEG``,
    ``sst2`` or a JSONL file (see :func:`pairs_from_data`)."""
    check_limit(limit)

    kind, _, arg = spec.partition(":")
    if kind == "caa" and arg:
        return caa_pairs(arg, limit=limit)
    if kind == "persona" and arg:
        return persona_pairs(arg, limit=limit)
    if kind == "template":
        pos, _, neg = (arg or "happy,sad").partition(",")
        return template_pairs(pos, neg or "sad", limit=limit)
    if kind == "sst2":
        return sst2_pairs(arg or "train", limit=limit)
    if Path(spec).is_file():
        return pairs_from_data(spec, limit=limit)
    raise DataError(
        f"unknown data {spec!r}; expected caa:BEHAVIOUR, persona:TRAIT, template:POS,NEG, sst2[:SPLIT] "
        f"or a JSONL file of {{positive, negative}}, {{question, answer_matching_behavior, "
        f"answer_not_matching_behavior}} or {{text, label}} rows"
    )


def pairs_from_data(data, limit: int | None = None, name: str | None = None) -> Pairs:
    """Pairs from your own data (a JSONL path, a ``datasets.Dataset`` or a list of dicts), by schema
    (see :mod:`vsteer.data.user`): ``positive``/``negative`` rows as given; A/B rows
    (``question``, ``answer_matching_behavior``, ``answer_not_matching_behavior``) answer-balanced like
    :func:`caa_pairs`, read at the answer; ``text``/``label`` rows zipped positive vs negative, mean over
    tokens, like :func:`sst2_pairs`."""
    check_limit(limit)
    from vsteer.data import balance_answers, user

    kind = user.schema_of(data)
    label = name or (Path(data).name if isinstance(data, str | Path) else type(data).__name__)
    source = [user.data_source(data)]
    if kind == "contrast":
        return Pairs(user.contrast_pairs(data)[:limit], sources=source, name=label)
    if kind == "ab":
        items = balance_answers(user.ab_items(data), limit, label)
        pairs = [ab_pair(it.question, it.matching, it.not_matching) for it in items]
        return Pairs(pairs, sources=source, name=label, position="answer")
    if kind == "labelled":
        rows = user.labelled_texts(data)
        pos, neg = [t for t, y in rows if y == 1], [t for t, y in rows if y == 0]
        n = min(len(pos), len(neg)) if limit is None else min(len(pos), len(neg), limit)
        if n == 0:
            raise DataError(f"{label}: labelled rows need both labels 0 and 1 to make pairs")
        return Pairs(list(zip(pos[:n], neg[:n])), sources=source, name=label, position="mean")
    raise DataError(f"{label}: {kind} rows are patching pairs, not contrastive data for extraction")


# ----------------------------------------------------------------------------------------------
# persona vectors from a system prompt
# ----------------------------------------------------------------------------------------------
# How a system prompt enters the chat (:func:`system_prompt_mode`):
#   "system"           a system turn of the chat template
#   "first_user_turn"  "PROMPT\n\nQUESTION" as the first user turn: for templates without a system
#                      role (they refuse one or drop its text), and what Gemma's template itself
#                      does with a system message (detected, and recorded as this mode)
#   "plain_text"       no chat template: the texts "PROMPT\n\nQUESTION" and "QUESTION"
PROMPT_MODES = ("system", "first_user_turn", "plain_text")
SHIPPED_QUESTIONS = {"hh-rlhf:helpful": "monitor/hh-rlhf/helpful_base_test_first_turns.jsonl"}
QUESTION_FIELDS = ("question", "prompt", "text")


class Questions(list):
    """A list of questions (user turns) with the files they came from (``sources``) and a name."""

    def __init__(self, items=(), sources: list[dict] | None = None, name: str = ""):
        super().__init__(items)
        self.sources = list(sources or [])
        self.name = name


def questions_from_data(data, limit: int | None = None) -> Questions:
    """Questions for :func:`from_prompt`: ``"hh-rlhf:helpful"`` (the 400 shipped HH-RLHF helpful-base
    first human turns), a ``.txt`` file (one question a line), a JSONL/JSON file or a
    ``datasets.Dataset`` of rows with a ``question``, ``prompt`` or ``text`` field (or plain strings),
    or a list of strings."""
    check_limit(limit)
    from vsteer.data import user

    if isinstance(data, str) and data in SHIPPED_QUESTIONS:
        from vsteer.data.monitor_data import helpful_requests

        return Questions(helpful_requests()[:limit], data_sources(SHIPPED_QUESTIONS[data]), data)
    if isinstance(data, str | Path) and Path(data).suffix == ".txt":
        if not Path(data).is_file():
            raise DataError(f"no questions file {str(data)!r}")
        lines = [line.strip() for line in Path(data).read_text(encoding="utf-8").splitlines()]
        items, label = [line for line in lines if line], str(data)
        sources = [user.data_source(data)]
    elif isinstance(data, str | Path) and not user.is_data_file(data):
        raise DataError(
            f"unknown questions {str(data)!r}; expected {', '.join(SHIPPED_QUESTIONS)}, a .txt file (one "
            f"question a line) or a JSONL file of rows with a {'/'.join(QUESTION_FIELDS)} field"
        )
    else:
        rows, label, word = user.read_rows(data)
        items = []
        for i, row in enumerate(rows):
            if isinstance(row, dict):
                field = next((f for f in QUESTION_FIELDS if f in row), None)
                if field is None:
                    found = sorted(k for k in row if k != "__line__")
                    raise DataError(
                        f"{label} {word} {row.get('__line__', i)}: no {'/'.join(QUESTION_FIELDS)} field "
                        f"(fields {found})"
                    )
                row = row[field]
            if not isinstance(row, str) or not row.strip():
                raise DataError(f"{label} {word} {i}: a question must be a non-empty string, got {row!r:.60}")
            items.append(row)
        sources = [user.data_source(data)]
    if not items:
        raise DataError(f"{label} has no questions")
    return Questions(items[:limit], sources, Path(label).name if isinstance(data, str | Path) else label)


def _chat_text(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def _merged(system_prompt: str, question: str) -> str:
    return f"{system_prompt}\n\n{question}"


def system_prompt_mode(tokenizer, system_prompt: str = "You are a pirate.") -> str:
    """How ``tokenizer``'s chat template takes a system prompt: one of :data:`PROMPT_MODES`."""
    probe = [{"role": "user", "content": "Hello?"}]
    try:
        _chat_text(tokenizer, probe)
    except Exception:  # no chat template (transformers raises ValueError), or a broken one
        return "plain_text"
    try:
        text = _chat_text(tokenizer, [{"role": "system", "content": system_prompt}] + probe)
    except Exception:  # templates without a system role refuse one (jinja raise_exception)
        return "first_user_turn"
    merged = _chat_text(tokenizer, [{"role": "user", "content": _merged(system_prompt, "Hello?")}])
    if system_prompt.strip() not in text or text == merged:  # dropped, or merged by the template (Gemma)
        return "first_user_turn"
    return "system"


def prompt_inputs(tokenizer, system_prompt: str, question: str, mode: str) -> tuple[list[int], list[int]]:
    """Token ids of ``question`` with and without ``system_prompt`` (``mode`` from :func:`system_prompt_mode`)."""
    user_turn = [{"role": "user", "content": question}]
    if mode == "system":
        with_ids = token_ids(tokenizer, [{"role": "system", "content": system_prompt}] + user_turn)
    elif mode == "first_user_turn":
        with_ids = token_ids(tokenizer, [{"role": "user", "content": _merged(system_prompt, question)}])
    elif mode == "plain_text":
        return token_ids(tokenizer, _merged(system_prompt, question)), token_ids(tokenizer, question)
    else:
        raise DataError(f"unknown prompt mode {mode!r}; expected one of {', '.join(PROMPT_MODES)}")
    return with_ids, token_ids(tokenizer, user_turn)


def template_tail(tokenizer, mode: str) -> int:
    """Tokens the chat template puts after the question (end of the user turn and the generation
    prompt), counted by character offsets in a rendered chat; 0 in plain text."""
    if mode == "plain_text":
        return 0
    question = "Hello there?"
    text = _chat_text(tokenizer, [{"role": "user", "content": question}])
    end = text.rfind(question) + len(question)
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (TypeError, KeyError, NotImplementedError, ValueError):  # slow tokenizers have no offsets
        offsets = None
    if offsets:
        return sum(1 for start, _ in offsets if start >= end)
    # without offsets: the common suffix of two renderings that differ only in the question
    a = token_ids(tokenizer, [{"role": "user", "content": "A"}])
    b = token_ids(tokenizer, [{"role": "user", "content": "B"}])
    return _common_suffix(a, b)


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


def prompt_position(tokenizer, position, mode: str) -> int:
    """The number of final tokens :func:`from_prompt` averages: ``"tail"`` (the template's tail plus
    the question's last token), ``"last"`` (1) or an int ``K`` (also ``"last:K"``)."""
    if position is None or position == "tail":
        return template_tail(tokenizer, mode) + 1
    if position == "last":
        return 1
    text = position.removeprefix("last:") if isinstance(position, str) else position
    try:
        k = int(text)
    except (TypeError, ValueError):
        k = 0
    if isinstance(position, bool) or k < 1 or isinstance(position, float):
        raise VectorError(
            f"from_prompt position must be 'tail', 'last', 'last:K' or a number of final tokens K >= 1, "
            f"got {position!r}"
        )
    return k


def _tail_features(
    model,
    sequences: list[list[int]],
    ks: list[int],
    sites: list,
    batch_size: int,
    pad: int,
    desc: str,
    progress,
) -> dict:
    """``{(site, layer): [len(sequences), *site_shape]}``: the mean of each site over the last
    ``ks[i]`` tokens of sequence ``i``; left-padded batches sorted by length, stopped after the
    deepest layer."""
    from vsteer.hooks import captured_forward

    batches = length_batches([len(seq) for seq in sequences], batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    out: dict = {key: None for key in sites}
    for batch in batches:
        inputs = pad_batch(
            [sequences[i] for i in batch], pad, padding_side="left", device=model_device(model)
        )
        width = inputs["input_ids"].shape[1]
        weights = torch.zeros(len(batch), width)
        for row, i in enumerate(batch):
            weights[row, width - ks[i] :] = 1.0 / ks[i]  # left padding: a row's last tokens end at `width`
        acts = captured_forward(model, sites, stop=True, use_cache=False, **inputs)
        for key in sites:
            x = acts[key].float()
            w = weights.to(x.device).reshape(weights.shape + (1,) * (x.dim() - 2))
            feats = (x * w).sum(dim=1).cpu()
            if out[key] is None:
                out[key] = torch.empty((len(sequences),) + tuple(feats.shape[1:]))
            out[key][torch.tensor(batch)] = feats
    return out


def from_prompts(
    model,
    tokenizer,
    system_prompts: Sequence[str],
    questions,
    sites: Sequence[str] = ("v",),
    layers=None,
    position=None,
    method: str = "mean_diff",
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, dict[str, SteeringVector]]:
    """:func:`from_prompt` for several prompts and sites: ``{prompt: {site: vector}}``; the runs
    without a prompt are shared."""
    from vsteer.arch import get_arch
    from vsteer.sites import check_site_name, parse_layers

    sites = [check_site_name(s) for s in sites]
    if method not in METHODS:
        raise VectorError(f"unknown extraction method {method!r}; expected one of {', '.join(METHODS)}")
    prompts = list(system_prompts)
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise DataError(f"a system prompt must be a non-empty string, got {p!r:.60}")
    qs = questions if isinstance(questions, Questions) else questions_from_data(questions)
    if method == "pca_diff" and len(qs) < 2:
        raise DataError("pca_diff needs at least 2 questions")
    layer_list = parse_layers(layers, get_arch(model).n_layers)
    keys = [(site, layer) for site in sites for layer in layer_list]
    pad = pad_token_id(tokenizer)
    digest = _questions_sha256(qs)
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, SteeringVector]] = {}
    try:
        with torch.no_grad():
            base: dict[tuple, dict] = {}  # (mode, k) -> activations without a prompt, shared across prompts
            for prompt in prompts:
                mode = system_prompt_mode(tokenizer, prompt)
                k = prompt_position(tokenizer, position, mode)
                pairs = [prompt_inputs(tokenizer, prompt, q, mode) for q in qs]
                ks = []
                for q, (w, wo) in zip(qs, pairs):
                    shared = _common_suffix(w, wo)  # the positions both runs have, token for token
                    if shared == 0:
                        raise DataError(
                            f"with and without the prompt, question {q!r:.60} ends in different tokens"
                        )
                    ks.append(min(k, shared))
                if (mode, tuple(ks)) not in base:
                    base[(mode, tuple(ks))] = _tail_features(
                        model,
                        [wo for _, wo in pairs],
                        ks,
                        keys,
                        batch_size,
                        pad,
                        "without the prompt",
                        progress,
                    )
                neg = base[(mode, tuple(ks))]
                pos = _tail_features(
                    model, [w for w, _ in pairs], ks, keys, batch_size, pad, f"with {prompt[:24]!r}", progress
                )
                extra = {
                    "system_prompt": prompt,
                    "prompt_mode": mode,
                    "questions_sha256": digest,
                    "n_questions": len(qs),
                    "dataset": qs.name,
                    "n_last": k,
                    "n_last_used": [min(ks), max(ks)],
                }
                out[prompt] = {
                    site: SteeringVector.for_model(
                        model,
                        {
                            layer: direction(pos[(site, layer)], neg[(site, layer)], method)
                            for layer in layer_list
                        },
                        site,
                        method=f"prompt_{method}",
                        position=f"last:{k}",
                        data=list(qs.sources),
                        extra=dict(extra),
                    )
                    for site in sites
                }
    finally:
        model.train(was_training)
    return out


def from_prompt(
    model,
    tokenizer,
    system_prompt: str,
    questions,
    site: str = "v",
    layers=None,
    position=None,
    method: str = "mean_diff",
    batch_size: int = 16,
    progress: bool = False,
) -> SteeringVector:
    """A persona vector: the mean activation difference at ``site`` between runs of each question
    with and without ``system_prompt``, so the persona can be applied without spending context.

    ``questions``: a list of strings or anything :func:`questions_from_data` reads. Each question is
    rendered through the chat template with ``system_prompt`` and without it (see
    :func:`system_prompt_mode`: a system turn where the template has a system role, else
    ``"PROMPT\\n\\nQUESTION"`` as the first user turn, which is also what Gemma's template does).
    ``position``: which positions are compared, the last ``K`` tokens of the rendered chat, which
    both runs share token for token (``K`` is capped by the shared suffix of each question):
    ``"tail"`` (default: the template's tail after the question, i.e. the end of the user turn and
    the generation prompt, plus the question's last token: 7 tokens on SmolLM2, 6 on Gemma 3),
    ``"last"`` (the last token, where the first answer token is predicted) or ``K``.
    ``method``: as in :func:`extract` over the ``(with, without)`` pairs (default the mean difference).
    Runs are left-padded batches (:func:`vsteer.encoding.pad_batch`); each forward stops after the
    deepest layer. ``extra`` records the prompt, the mode, ``K`` and the SHA-256 of the questions.
    Returns per layer a ``site``-shaped tensor (``[n_kv_heads, head_dim]`` for ``v``).
    """
    return from_prompts(
        model, tokenizer, [system_prompt], questions, (site,), layers, position, method, batch_size, progress
    )[system_prompt][site]


def _questions_sha256(questions: Sequence[str]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(list(questions), ensure_ascii=False).encode("utf-8")).hexdigest()
