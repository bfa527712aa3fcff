"""Text normalisation and shingling shared by exact dedup, MinHash dedup and decontamination.

Normalisers live in a registry (name -> function); ``--normalize nfkc,lower,whitespace,punct`` applies them
in the order given. Shingles are word or character n-grams of the normalised text; a text shorter than
``n`` units is one shingle (all of it), as text-dedup does, so short documents still get a signature.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Callable

from llmctl.core.errors import UsageError


@functools.cache
def _punct() -> re.Pattern:
    """Every Unicode punctuation character (categories Pc Pd Pe Pf Pi Po Ps); built once, on first use."""
    chars = (chr(c) for c in range(sys.maxunicode + 1))
    return re.compile("[" + "".join(re.escape(c) for c in chars if unicodedata.category(c)[0] == "P") + "]")


def _whitespace(text: str) -> str:
    return " ".join(text.split())  # str.split() splits on every Unicode whitespace run, 5x faster than re


# name -> str -> str
NORMALIZERS: dict[str, Callable[[str], str]] = {
    "nfkc": lambda text: unicodedata.normalize("NFKC", text),
    "lower": str.lower,
    "whitespace": _whitespace,
    "punct": lambda text: _punct().sub("", text),
}

SHINGLE_KINDS = ("word", "char")


def parse_normalize(spec: str) -> tuple[str, ...]:
    """``"nfkc,lower"`` -> ``("nfkc", "lower")``; ``""`` or ``"none"`` -> no normalisation."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip() and s.strip() != "none")
    unknown = [n for n in names if n not in NORMALIZERS]
    if unknown:
        raise UsageError(f"unknown --normalize step(s) {', '.join(unknown)}; known: {', '.join(NORMALIZERS)}")
    return names


def normalize(text: str, steps: tuple[str, ...]) -> str:
    for step in steps:
        text = NORMALIZERS[step](text)
    return text


def shingles(text: str, n: int, kind: str = "word") -> list[str]:
    """The n-grams of ``text`` in order (duplicates kept); ``[]`` only for a text with no units."""
    if kind == "word":
        units = text.split()
        if len(units) <= n:
            return [" ".join(units)] if units else []
        return [" ".join(units[i : i + n]) for i in range(len(units) - n + 1)]
    if kind == "char":
        if len(text) <= n:
            return [text] if text else []
        return [text[i : i + n] for i in range(len(text) - n + 1)]
    raise UsageError(f"unknown --shingle {kind!r}; known: {', '.join(SHINGLE_KINDS)}")


def jaccard(a: set, b: set) -> float:
    """|A ∩ B| / |A ∪ B| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)
