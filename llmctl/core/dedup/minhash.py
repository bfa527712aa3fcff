"""MinHash signatures, bit-compatible with datasketch's ``MinHash`` (scheme ``affine32``, the default since
datasketch 2.0).

Broder, "On the resemblance and containment of documents" (1997); datasketch: https://github.com/ekzhu/datasketch

For each shingle ``s``: ``h = fmix32(sha1_32(s))`` (the first 4 bytes of SHA-1, little-endian, then the
MurmurHash3 finalizer), and for each of the ``P`` permutations ``phv_k = a_k * h + b_k mod 2^32`` with ``a_k``
odd (a bijection); the signature is ``min over shingles`` per permutation. ``(a, b)`` come from
``numpy.random.RandomState(seed)`` exactly as datasketch draws them, so a signature here equals
``datasketch.MinHash(num_perm=P, seed=seed)`` fed with the same shingles.

:func:`signature_reference` does one document the obvious way; :func:`signatures` does a batch of documents
at once: all shingle hashes in one array, one ``[shingles, P]`` product per chunk, and
``np.minimum.reduceat`` to take each document's minimum. A test holds them equal (and equal to datasketch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

MAX_HASH = np.uint32(0xFFFFFFFF)
_CHUNK = 4096  # shingles per [chunk, P] product: 4096 * 128 * 4 bytes = 2 MiB, stays in cache


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters: ``a`` odd, ``b`` any; each ``[num_perm]`` uint32."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def sha1_hash32(data: bytes) -> int:
    """datasketch's default hash function: the first 4 bytes of SHA-1, little-endian."""
    return int.from_bytes(hashlib.sha1(data).digest()[:4], "little")


def fmix32(h: np.ndarray) -> np.ndarray:
    """The MurmurHash3 32-bit finalizer (an avalanching bijection), on a uint32 array."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def hash_shingles(shingles: Sequence[str]) -> np.ndarray:
    """``[len(shingles)]`` uint32: ``sha1_hash32`` of each shingle's UTF-8 bytes."""
    sha1 = hashlib.sha1
    return np.frombuffer(b"".join([sha1(s.encode()).digest()[:4] for s in shingles]), dtype="<u4").astype(
        np.uint32
    )


def signature_reference(shingles: Sequence[str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One document, the readable way: ``[P]`` uint32, all ``MAX_HASH`` for no shingles."""
    sig = np.full(len(a), MAX_HASH, dtype=np.uint32)
    for s in shingles:
        h = fmix32(np.array([sha1_hash32(s.encode())], dtype=np.uint32))[0]
        sig = np.minimum(sig, a * h + b)  # uint32 arithmetic wraps: mod 2^32
    return sig


def signatures_from_hashes(
    hashes: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """``[docs, P]`` uint32 from the concatenated shingle hashes of all documents (``counts[i]`` each).

    Every count must be at least 1 (callers give an empty document one placeholder shingle). The product
    is laid out ``[P, shingles]`` so that the per-document minimum runs along contiguous memory (3x faster).
    """
    n_docs = len(counts)
    out = np.full((n_docs, len(a)), MAX_HASH, dtype=np.uint32)
    if n_docs == 0:
        return out
    h = fmix32(hashes.astype(np.uint32, copy=False))
    ends = np.cumsum(counts)
    starts = ends - counts
    a_col, b_col = a[:, None], b[:, None]
    # Fixed-size slices of the shingle array, whatever the document lengths: memory stays bounded
    # (a document longer than a slice is reduced in pieces and its minima combined).
    for lo in range(0, int(ends[-1]), _CHUNK):
        hi = min(lo + _CHUNK, int(ends[-1]))
        first = int(np.searchsorted(ends, lo, side="right"))  # first document with shingles in [lo, hi)
        last = int(np.searchsorted(starts, hi, side="left"))  # one past the last
        phv = a_col * h[None, lo:hi]  # [P, shingles], wraps mod 2^32
        phv += b_col
        segments = np.maximum(starts[first:last], lo) - lo
        mins = np.minimum.reduceat(phv, segments, axis=1).T  # [docs in slice, P]
        np.minimum(out[first:last], mins, out=out[first:last])
    return out


def signatures(docs: Sequence[Sequence[str]], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(docs), P]`` uint32 signatures of documents given as shingle lists (each non-empty)."""
    counts = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    hashes = hash_shingles([s for d in docs for s in d])
    return signatures_from_hashes(hashes, counts, a, b)
