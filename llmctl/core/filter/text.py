"""Text measurements the quality rules share: words, lines, paragraphs, sentences, duplicate counts."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

# Words and runs of punctuation, close to NLTK's word_tokenize for English (which datatrove uses).
_TOKEN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_PUNCT = set(string.punctuation) | set("“”‘’–—…«»")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def is_punct(token: str) -> bool:
    return all(c in _PUNCT for c in token)


def words(text: str) -> list[str]:
    """Tokens that are not only punctuation."""
    return [t for t in tokens(text) if not is_punct(t)]


def lines(text: str) -> list[str]:
    return text.split("\n")


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n{2,}", text.strip()) if p.strip()]


def count_sentences(text: str) -> int:
    """Sentence ends (runs of . ! ? before whitespace or the end), plus a final unterminated sentence."""
    ends = list(_SENTENCE_END.finditer(text))
    tail = text[ends[-1].end() :] if ends else text
    return len(ends) + (1 if tail.strip() else 0)


def duplicates(items: Sequence[str]) -> tuple[int, int]:
    """(items that repeat an earlier item, characters in them)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def top_ngram_char_fraction(ws: Sequence[str], n: int) -> float:
    """Characters in the most frequent word n-gram (all its occurrences) over all word characters."""
    total = sum(len(w) for w in ws)
    if total == 0 or len(ws) < n:
        return 0.0
    grams = Counter(tuple(ws[i : i + n]) for i in range(len(ws) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return sum(len(w) for w in gram) * count / total


def duplicate_ngram_char_fraction(ws: Sequence[str], n: int) -> float:
    """Characters of words covered by any n-gram that occurs more than once, each word counted once."""
    total = sum(len(w) for w in ws)
    if total == 0 or len(ws) < n:
        return 0.0
    starts = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    counts = Counter(starts)
    covered = [False] * len(ws)
    for i, gram in enumerate(starts):
        if counts[gram] > 1:
            for j in range(i, i + n):
                covered[j] = True
    return sum(len(w) for w, c in zip(ws, covered, strict=True) if c) / total
