"""Shingle hash schemes: text -> ``[shingles]`` uint32, the values MinHash permutes. A registry by name.

- ``datasketch``: SHA-1 of each shingle string's UTF-8 bytes (datasketch's ``sha1_hash32``), so
  signatures equal ``datasketch.MinHash(...).update_batch(shingle.encode() for ...)``. Readable, slow: one
  Python string and one SHA-1 per shingle (about 2 µs).
- ``fast`` (default): each *unit* (a word, or a character) is hashed to 64 bits (a word by a polynomial
  hash of its UTF-8 bytes, computed for every byte of a batch at once with numpy; a character by its code
  point), and the n-gram hash is an FNV-1a style fold of its units' hashes, computed for all n-grams of a
  batch at once, then the MurmurHash3 64-bit finalizer, folded to 32 bits. No word or shingle string is
  ever built (well under 0.1 µs per word).
  :func:`fast_hashes_reference` computes the same values one n-gram at a time.

Both give a set of 32-bit shingle hashes whose Jaccard similarity is the shingle sets' (up to 32-bit
collisions, as with datasketch), which is all MinHash and ``--verify-jaccard`` need.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llmctl.core.dedup.minhash import hash_shingles
from llmctl.core.dedup.text import shingles

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_M64 = (1 << 64) - 1


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _ngram_fold(units: np.ndarray, n: int, m: int) -> np.ndarray:
    """FNV-1a over each window of ``n`` consecutive unit hashes: ``[m]`` uint64, window i = units[i : i+n]."""
    prime = np.uint64(_FNV_PRIME)
    acc = np.full(m, _FNV_OFFSET, dtype=np.uint64)
    for k in range(n):
        acc ^= units[k : k + m]
        acc *= prime
    return acc


def _fold32(h: np.ndarray) -> np.ndarray:
    return ((h >> np.uint64(32)) ^ h).astype(np.uint32)


_POLY = 0x100000001B3  # multiplier of the polynomial byte hash of a word (odd, so invertible mod 2^64)
_POLY_INV = pow(_POLY, -1, 1 << 64)
_SPACE = 32


def _power_table(base: int, length: int) -> np.ndarray:
    """``[length]`` uint64: base^0, base^1, ... (mod 2^64; numpy's cumprod wraps)."""
    return np.r_[np.uint64(1), np.cumprod(np.full(length - 1, base, dtype=np.uint64))]


_TABLES: dict[int, np.ndarray] = {}


def _powers(base: int, length: int) -> np.ndarray:
    table = _TABLES.get(base)
    if table is None or len(table) < length:
        table = _TABLES[base] = _power_table(base, max(length, 1 << 16))
    return table[:length]


def word_hash_reference(word: str) -> int:
    """A word's 64-bit unit hash: ``fmix64(sum_i (byte_i + 1) * P^i + 33 * P^len mod 2^64)`` over its UTF-8
    bytes and the space that follows it."""
    data = word.encode() + b" "
    acc = 0
    for i, byte in enumerate(data):
        acc = (acc + (byte + 1) * pow(_POLY, i, 1 << 64)) & _M64
    return int(_fmix64(np.array([acc], dtype=np.uint64))[0])


def word_hashes(words_text: str) -> np.ndarray:
    """``[words]`` uint64 unit hashes of a text whose words are separated by single ASCII spaces, all at
    once: byte ``i`` of the text contributes ``(byte + 1) * P^i``; a word's sum (``np.add.reduceat`` over
    its bytes and its trailing space) times ``P^-start`` is its polynomial hash, wherever it stands."""
    if not words_text:
        return np.empty(0, dtype=np.uint64)
    buf = np.frombuffer(words_text.encode() + b" ", dtype=np.uint8)
    starts = np.r_[0, np.flatnonzero(buf[:-1] == _SPACE) + 1]  # [words] first byte of each word
    values = (buf.astype(np.uint64) + np.uint64(1)) * _powers(_POLY, len(buf))
    sums = np.add.reduceat(values, starts) * _powers(_POLY_INV, len(buf))[starts]
    return _fmix64(sums)


class UnitHasher:
    """Text -> ``[units]`` uint64: words (split on whitespace) or characters (code points)."""

    def units(self, text: str, kind: str) -> np.ndarray:
        if kind == "word":
            return word_hashes(" ".join(text.split()))
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
        return _fmix64(codes + np.uint64(0x9E3779B97F4A7C15))


def fast_hashes(text: str, n: int, kind: str, hasher: UnitHasher) -> np.ndarray:
    """All n-gram hashes of ``text`` at once: ``[max(units - n + 1, 1)]`` uint32 (``[0]`` when empty)."""
    units = hasher.units(text, kind)
    count = len(units)
    if count == 0:
        return np.empty(0, dtype=np.uint32)
    if count <= n:  # the whole text is one shingle
        n, m = count, 1
    else:
        m = count - n + 1
    return _fold32(_fmix64(_ngram_fold(units, n, m)))


def fast_hashes_batch(
    texts: list[str], n: int, kind: str, hasher: UnitHasher
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fast_hashes` of many texts at once: (concatenated n-gram hashes uint32, count per text).

    One dictionary lookup per word over the whole batch and one pass of numpy over all units: the n-gram
    fold runs across document boundaries and only the windows inside one document are kept.
    """
    if kind == "word":
        joined = [" ".join(t.split()) for t in texts]
        counts = (t.count(" ") + 1 if t else 0 for t in joined)
        lengths = np.fromiter(counts, dtype=np.int64, count=len(joined))
        units = word_hashes(" ".join(t for t in joined if t))
    else:
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        units = hasher.units("".join(texts), "char")
    out_counts = np.where(lengths > n, lengths - n + 1, np.minimum(lengths, 1))
    out = np.empty(int(out_counts.sum()), dtype=np.uint32)
    out_starts = np.cumsum(out_counts) - out_counts
    starts = np.cumsum(lengths) - lengths
    total = int(lengths.sum())
    if total >= n:
        m = total - n + 1
        acc = _ngram_fold(units, n, m)
        doc = np.repeat(np.arange(len(texts)), lengths)[:m]  # [m] the document each window starts in
        offset = np.arange(m) - starts[doc]
        valid = (lengths[doc] > n) & (offset <= lengths[doc] - n)
        out[out_starts[doc[valid]] + offset[valid]] = _fold32(_fmix64(acc[valid]))
    for d in np.flatnonzero((lengths <= n) & (lengths > 0)).tolist():  # short texts: one whole-text gram
        out[out_starts[d]] = _fold32(_fmix64(_fold_all(units[starts[d] : starts[d] + lengths[d]])))[0]
    return out, out_counts


def _fold_all(units: np.ndarray) -> np.ndarray:
    acc = np.full(1, _FNV_OFFSET, dtype=np.uint64)
    for u in units:
        acc ^= u
        acc *= np.uint64(_FNV_PRIME)
    return acc


def fast_hashes_reference(text: str, n: int, kind: str) -> list[int]:
    """:func:`fast_hashes`, one n-gram at a time with Python integers (the definition)."""
    if kind == "word":
        units = [word_hash_reference(w) for w in text.split()]
    else:
        units = [int(u) for u in UnitHasher().units(text, kind)]
    grams = [units] if len(units) <= n else [units[i : i + n] for i in range(len(units) - n + 1)]
    out = []
    for gram in grams if units else []:
        acc = _FNV_OFFSET
        for u in gram:
            acc = ((acc ^ u) * _FNV_PRIME) & _M64
        h = int(_fmix64(np.array([acc], dtype=np.uint64))[0])
        out.append(((h >> 32) ^ h) & 0xFFFFFFFF)
    return out


def datasketch_hashes(text: str, n: int, kind: str, hasher: UnitHasher) -> np.ndarray:  # noqa: ARG001
    return hash_shingles(shingles(text, n, kind))


# name -> (normalised text, n, shingle kind, unit hasher) -> [shingles] uint32
HASH_SCHEMES: dict[str, Callable[[str, int, str, UnitHasher], np.ndarray]] = {
    "fast": fast_hashes,
    "datasketch": datasketch_hashes,
}
