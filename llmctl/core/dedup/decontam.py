"""Decontamination: find training documents that share a word n-gram with an evaluation set.

GPT-3 (Brown et al. 2020, appendix C) and Llama 2 reports count a training document as contaminated when
it shares any 13-gram of words with a benchmark item. Texts are compared after lower-casing and removing
punctuation; an evaluation item shorter than ``n`` words contributes its whole word sequence as one gram
(so a short question is still found verbatim). The gram table is exact (Python sets of word tuples): no
false positives from hashing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmctl.core.dedup.text import normalize
from llmctl.core.io import Record

STEPS = ("nfkc", "lower", "punct", "whitespace")


def words_of(text: str) -> list[str]:
    return normalize(text, STEPS).split()


@dataclass
class EvalGrams:
    """gram (tuple of words) -> the eval items (``file:line``) that contain it; grams of several lengths."""

    n: int
    grams: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    lengths: set[int] = field(default_factory=set)
    items: int = 0

    def add(self, where: str, text: str) -> None:
        words = words_of(text)
        if not words:
            return
        self.items += 1
        size = min(self.n, len(words))
        self.lengths.add(size)
        for i in range(len(words) - size + 1):
            owners = self.grams.setdefault(tuple(words[i : i + size]), [])
            if not owners or owners[-1] != where:
                owners.append(where)

    def hits(self, text: str) -> list[str]:
        """The eval items sharing a gram with ``text``, in order of first appearance."""
        words = words_of(text)
        found: dict[str, None] = {}
        for size in sorted(self.lengths):
            for i in range(len(words) - size + 1):
                owners = self.grams.get(tuple(words[i : i + size]))
                if owners:
                    found.update(dict.fromkeys(owners))
        return list(found)


@dataclass
class DecontamStats:
    documents: int = 0
    contaminated: int = 0
    eval_items: int = 0
    eval_items_hit: dict[str, int] = field(default_factory=dict)  # eval item -> training documents

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_eval_grams(evals: Iterable[Record], n: int) -> EvalGrams:
    table = EvalGrams(n)
    for record in evals:
        table.add(record.where, record.text)
    return table


def decontaminate(
    records: Iterable[Record], table: EvalGrams, *, mark: bool, stats: DecontamStats
) -> Iterator[dict[str, Any]]:
    """Drop (or, with ``mark``, annotate with ``contaminated_by``) training records that hit the table."""
    stats.eval_items = table.items
    for record in records:
        stats.documents += 1
        hits = table.hits(record.text)
        for h in hits:
            stats.eval_items_hit[h] = stats.eval_items_hit.get(h, 0) + 1
        if hits:
            stats.contaminated += 1
        if mark:
            data = dict(record.data)
            data["contaminated_by"] = hits
            yield data
        elif not hits:
            yield record.data
