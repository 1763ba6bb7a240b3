"""Overlap between texts: the long paragraphs two corpora share.

Evaluated text must never be trained or calibrated on. Whole-document hashes miss the common case
of news corpora, where one story appears twice with a few paragraphs changed, so overlap is judged
by *long paragraphs* (whitespace-normalised lines of at least :data:`MIN_CHARS` characters; short
lines such as datelines and headings repeat innocently).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping

from spear.errors import SpearError

MIN_CHARS = 80


def long_paragraphs(text: str, min_chars: int = MIN_CHARS) -> set[str]:
    """sha256 of every whitespace-normalised line of ``text`` with at least ``min_chars`` characters."""
    lines = (re.sub(r"\s+", " ", line).strip() for line in text.splitlines())
    return {hashlib.sha256(line.encode("utf-8")).hexdigest() for line in lines if len(line) >= min_chars}


def shared_paragraphs(a: str, b: str) -> int:
    return len(long_paragraphs(a) & long_paragraphs(b))


def check_disjoint(trained: Mapping[str, str], evaluated: Mapping[str, str], *, verb: str = "trained on") -> None:
    """Refuse when a text ``verb`` (``{config key: text}``) shares a long paragraph with an evaluated one.

    One :class:`SpearError` line naming both keys and the count.
    """
    seen = {key: long_paragraphs(text) for key, text in evaluated.items()}
    for key, text in trained.items():
        mine = long_paragraphs(text)
        for other, theirs in seen.items():
            shared = len(mine & theirs)
            if shared:
                raise SpearError(f"{key} shares {shared} paragraph(s) with {other}: evaluated text would be {verb}; "
                                 f"remove the overlap from {key} or change {other.split('=')[0]}")


def components(items: Iterable[set[str]]) -> list[int]:
    """Group label of every item: items sharing a key (directly or through others) get one label."""
    items = list(items)
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, keys in enumerate(items):
        for key in keys:
            if key in owner:
                parent[find(i)] = find(owner[key])
            else:
                owner[key] = i
    return [find(i) for i in range(len(items))]
