"""Reference BPE trainer: the merges Hugging Face ``tokenizers``' BpeTrainer learns, in the same order.

Byte-pair encoding (Sennrich et al. 2016, https://arxiv.org/abs/1508.07909; byte-level as in GPT-2):
start from single symbols and repeatedly merge the most frequent adjacent pair into a new symbol.

This follows the algorithm of ``tokenizers/src/models/bpe/trainer.rs`` step for step, so that the
output is identical, not just similar:

1. Words are counted once (the caller streams the corpus into a ``word -> count`` map); the work below
   depends on the number of distinct words, not on the corpus size.
2. Ids: special tokens first, then the alphabet sorted by code point, then (with a continuing-subword
   prefix, WordPiece style) prefixed symbols as words are read, then one id per merge.
3. Pair counts are computed once; a max-heap holds ``(count, pair)``. Ties go to the smallest
   ``(left id, right id)`` pair, which is what makes the result deterministic and equal to HF's.
4. Popping a pair whose count went stale re-pushes it with the current count (lazy deletion). Merging a
   pair only touches the words that contain it (``where`` index), and the pair counts change by the
   word's count for each pair that appears or disappears.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass
class BpeResult:
    vocab: dict[str, int]  # token -> id
    merges: list[tuple[str, str]]  # in the order learned


def compute_alphabet(
    word_counts: Mapping[str, int], initial_alphabet: Iterable[str] = (), limit: int | None = None
) -> list[str]:
    """Characters of the words, plus ``initial_alphabet``, the ``limit`` most frequent kept; by code point.

    ``initial_alphabet`` characters are always kept. Ties at the cut go to the smaller code point (HF's
    own cut breaks ties arbitrarily; llmctl passes an explicit alphabet so that this never matters).
    """
    counts: dict[str, int] = defaultdict(int)  # char -> occurrences in the corpus
    for word, n in word_counts.items():
        for ch in word:
            counts[ch] += n
    forced = set(initial_alphabet)
    keep = set(counts) | forced
    if limit is not None and len(keep) > limit:
        ranked = sorted(keep, key=lambda c: (c not in forced, -counts.get(c, 0), ord(c)))
        keep = set(ranked[: max(limit, len(forced))])
    return sorted(keep, key=ord)


def train_bpe(
    word_counts: Mapping[str, int],
    vocab_size: int,
    *,
    special_tokens: Iterable[str] = (),
    initial_alphabet: Iterable[str] = (),
    limit_alphabet: int | None = None,
    min_frequency: int = 0,
    continuing_subword_prefix: str | None = None,
    seed_tokens: Iterable[str] = (),
) -> BpeResult:
    """Learn merges until the vocabulary has ``vocab_size`` tokens or no pair is frequent enough.

    ``seed_tokens`` get ids right after the special tokens (llmctl puts the prefixed alphabet there for
    WordPiece so that ids, hence tie-breaks, do not depend on the order words are read in).
    """
    id_to_token: list[str] = []
    token_to_id: dict[str, int] = {}

    def add(token: str) -> int:
        if token not in token_to_id:
            token_to_id[token] = len(id_to_token)
            id_to_token.append(token)
        return token_to_id[token]

    for token in special_tokens:
        add(token)
    for token in seed_tokens:
        add(token)
    for ch in compute_alphabet(word_counts, initial_alphabet, limit_alphabet):
        add(ch)

    # Words as lists of symbol ids; characters outside the alphabet are dropped, as HF drops them.
    prefix = continuing_subword_prefix or ""
    words: list[list[int]] = []
    counts: list[int] = []
    for word, n in sorted(word_counts.items()):
        symbols = []
        for i, ch in enumerate(word):
            if ch not in token_to_id:
                continue
            symbols.append(add(prefix + ch if i > 0 and prefix else ch))
        words.append(symbols)
        counts.append(n)

    # (a, b) -> occurrences, weighted by word counts. As in HF, a merged pair's own count is left as it
    # was: it is never queued again unless a later merge creates it anew.
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # (a, b) -> indexes of words holding it
    for w, symbols in enumerate(words):
        n = counts[w]
        for pair in zip(symbols, symbols[1:], strict=False):
            pair_counts[pair] += n
            where[pair].add(w)

    # heapq is a min-heap: (-count, a, b, seq, words) pops the highest count, then the smallest pair.
    # Like HF's queue entries, each entry carries its own set of words to merge in; ``seq`` keeps equal
    # entries first-in first-out and stops the comparison before it reaches the sets.
    seq = 0
    heap = []
    for (a, b), c in pair_counts.items():
        if c > 0:
            heap.append((-c, a, b, seq, where[(a, b)]))
            seq += 1
    heapq.heapify(heap)
    del where

    merges: list[tuple[str, str]] = []
    while len(id_to_token) < vocab_size and heap:
        neg, a, b, _, positions = heapq.heappop(heap)
        count = pair_counts[(a, b)]
        if -neg != count:  # stale: re-queue with the current count
            heapq.heappush(heap, (-count, a, b, seq, positions))
            seq += 1
            continue
        if count < 1 or count < min_frequency:
            break
        left, right = id_to_token[a], id_to_token[b]
        if prefix and right.startswith(prefix):
            right = right[len(prefix) :]
        new_id = add(left + right)  # an existing id when another pair already spelled this token
        merges.append((id_to_token[a], id_to_token[b]))

        touched: dict[tuple[int, int], set[int]] = defaultdict(set)  # pairs that appeared -> words
        for w in positions:
            _merge_word(words[w], a, b, new_id, counts[w], w, pair_counts, touched)
        for new_pair, ws in touched.items():
            c = pair_counts[new_pair]
            if c > 0:
                heapq.heappush(heap, (-c, *new_pair, seq, ws))
                seq += 1
    return BpeResult(vocab=token_to_id, merges=merges)


def _merge_word(
    symbols: list[int],
    a: int,
    b: int,
    new_id: int,
    n: int,
    w: int,
    pair_counts: dict[tuple[int, int], int],
    touched: dict[tuple[int, int], set[int]],
) -> None:
    """Replace each non-overlapping ``a b`` (left to right) in one word by ``new_id``; update pair counts."""
    i = 0
    while i < len(symbols) - 1:
        if symbols[i] == a and symbols[i + 1] == b:
            if i > 0:
                prev = symbols[i - 1]
                pair_counts[(prev, a)] -= n
                pair_counts[(prev, new_id)] += n
                touched[(prev, new_id)].add(w)
            if i + 2 < len(symbols):
                nxt = symbols[i + 2]
                pair_counts[(b, nxt)] -= n
                pair_counts[(new_id, nxt)] += n
                touched[(new_id, nxt)].add(w)
            symbols[i : i + 2] = [new_id]
        i += 1
