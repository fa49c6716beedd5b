"""Answer-balanced extraction sets for two-answer items (A/B letters, Yes/No words).

A vector read at the answer token of ``item + matching answer`` minus ``item + other answer`` carries
the behaviour *and* the identity of the two answer tokens. When one letter (or word) is the matching
answer more often than the other, the mean difference keeps a letter component and the "steering
vector" partly becomes an "answer (A)" switch. :func:`balance_answers` builds sets in which every
answer token is the matching one exactly as often as it is the other one, so that the token-identity
component cancels in the mean difference:

* letter items (``"(A)"``/``"(B)"``, any two option letters): each item twice, once as given and
  once with the two options' texts swapped in the question (:func:`swap_options`, CAA style);
* word items (``"Yes"``/``"No"``, or any other two words): as many items matching the first word as
  matching the second (a statement cannot be answered "the other way" without changing it).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from vsteer.data.readers import ABItem
from vsteer.errors import DataError

# an option marker at the start of a line: " (A) text" or "(B) text"
_OPTION = re.compile(r"(?m)^[ \t]*\(([A-Z])\)")
_LETTER = re.compile(r"^\(?([A-Z])\)?$")


def answer_letter(answer: str) -> str | None:
    """``"(A)"`` / ``"A"`` -> ``"A"``; ``None`` for a word answer such as ``"Yes"``."""
    m = _LETTER.match(answer.strip())
    return m.group(1) if m else None


def swap_options(item: ABItem) -> ABItem:
    """The same item with the texts of its matching and other option swapped in the question, so the
    other letter now matches: ``(A) now / (B) later, matching (A)`` -> ``(A) later / (B) now, matching (B)``.

    Raises :class:`DataError` when the answers are not letters or the question does not list both
    options at the start of a line (``" (A) ..."``).
    """
    m, o = answer_letter(item.matching), answer_letter(item.not_matching)
    if m is None or o is None or m == o:
        raise DataError(
            f"cannot swap options of an item answered {item.matching!r} vs {item.not_matching!r}; "
            f"expected two different letters such as '(A)' and '(B)'"
        )
    markers = list(_OPTION.finditer(item.question))
    spans = {}
    for i, marker in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(item.question)
        body = item.question[marker.end() : end]
        # the newline before the next marker stays where it is; only the option's own text moves
        spans.setdefault(marker.group(1), []).append((marker.end(), marker.end() + len(body.rstrip("\n"))))
    for letter in (m, o):
        if len(spans.get(letter, ())) != 1:
            raise DataError(
                f"question {item.question[:60]!r}... lists option ({letter}) {len(spans.get(letter, ()))} times "
                f"at the start of a line; need exactly once to swap the options"
            )
    (a0, a1), (b0, b1) = sorted([spans[m][0], spans[o][0]])
    q = item.question
    swapped = q[:a0] + q[b0:b1] + q[a1:b0] + q[a0:a1] + q[b1:]
    return ABItem(swapped, item.not_matching, item.matching)


def balance_answers(items: Sequence[ABItem], n: int | None = None, what: str = "items") -> list[ABItem]:
    """An answer-balanced list of at most ``n`` items (all that balance when ``n`` is None), in the
    order of ``items``: every answer string is the matching one exactly as often as the other one.

    Letter items come in (item, :func:`swap_options` of it) couples; word items in couples of one item
    matching each word, taken in order (items that find no partner are left out). ``n`` is rounded
    down to an even number. Raises :class:`DataError` when nothing can be balanced.
    """
    items = list(items)
    if n is not None and (not isinstance(n, int) or n < 2):
        raise DataError(f"a balanced set needs n >= 2 items (one couple), got {n!r}")
    couples: list[tuple[int, tuple[ABItem, ABItem]]] = []
    waiting: dict[tuple[str, str], list[int]] = {}  # (matching, other) -> indices without a partner
    for i, item in enumerate(items):
        if answer_letter(item.matching) and answer_letter(item.not_matching):
            try:
                couples.append((i, (item, swap_options(item))))
            except DataError as err:
                raise DataError(f"{what} item {i}: {err}") from None
            continue
        mirror = waiting.get((item.not_matching, item.matching))
        if mirror:
            j = mirror.pop(0)
            couples.append((j, (items[j], item)))
        else:
            waiting.setdefault((item.matching, item.not_matching), []).append(i)
    couples.sort(key=lambda c: c[0])
    if n is not None:
        couples = couples[: n // 2]
    if not couples:
        counts = Counter(it.matching for it in items)
        raise DataError(
            f"cannot balance {what}: matching answers {dict(counts)}; word answers need items matching "
            f"each word, letter answers options listed in the question"
        )
    return [it for _, couple in couples for it in couple]


def matching_counts(items: Sequence[ABItem]) -> dict[str, dict[str, int]]:
    """How often each answer string is the matching and the other answer: ``{answer: {"matching": .., "other": ..}}``.
    A set is balanced when the two counts are equal for every answer."""
    out: dict[str, dict[str, int]] = {}
    for it in items:
        out.setdefault(it.matching, {"matching": 0, "other": 0})["matching"] += 1
        out.setdefault(it.not_matching, {"matching": 0, "other": 0})["other"] += 1
    return out


def is_balanced(items: Sequence[ABItem]) -> bool:
    return all(c["matching"] == c["other"] for c in matching_counts(items).values())
