"""A synthetic corpus with planted near-duplicates at known Jaccard similarities (built by the tests)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from llmctl.core.dedup.text import jaccard, shingles


@dataclass
class Planted:
    texts: list[str]
    pairs: list[tuple[int, int, float]]  # (base index, variant index, true 5-gram word Jaccard)


def shingle_set(text: str, n: int = 5) -> set[str]:
    return set(shingles(text, n, "word"))


def _edit(words: list[str], vocab: list[str], rng: random.Random) -> None:
    op = rng.random()
    i = rng.randrange(len(words))
    if op < 0.4:
        words[i] = rng.choice(vocab)  # substitution
    elif op < 0.6:
        words.insert(i, rng.choice(vocab))  # insertion
    elif op < 0.8 and len(words) > 20:
        del words[i]  # deletion
    else:
        j = min(i + rng.randint(1, 3), len(words) - 1)  # a short reordering
        words[i], words[j] = words[j], words[i]


def planted_corpus(bases: int = 300, words: int = 100, lo: float = 0.3, seed: int = 0) -> Planted:
    """``bases`` random documents, each followed (later in the corpus) by one edited variant whose
    Jaccard similarity with it is drawn uniformly from [lo, 1]."""
    rng = random.Random(seed)
    vocab = [
        f"{''.join(rng.choices('abcdefghijklmnopqrstuvwxyz', k=rng.randint(2, 9)))}" for _ in range(20000)
    ]
    texts = [" ".join(rng.choices(vocab, k=words)) for _ in range(bases)]
    pairs = []
    for b in range(bases):
        target = rng.uniform(lo, 1.0)
        base = texts[b].split()
        base_set = shingle_set(texts[b])
        variant = list(base)
        similarity = 1.0
        while similarity > target:
            _edit(variant, vocab, rng)
            similarity = jaccard(base_set, shingle_set(" ".join(variant)))
        texts.append(" ".join(variant))
        pairs.append((b, len(texts) - 1, similarity))
    return Planted(texts, pairs)
