"""Dedup methods: a registry of ways to turn documents into bucket keys.

Each method maps a chunk of raw texts to ``[docs, bands]`` uint64 keys; documents that share a key in any
column are candidate duplicates (for ``exact``, one column: the hash of the normalised text). Adding a
method is adding a class here and one registry line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from llmctl.core.dedup.hashing import HASH_SCHEMES, UnitHasher, fast_hashes_batch
from llmctl.core.dedup.lsh import band_keys, optimal_params
from llmctl.core.dedup.minhash import permutations, signatures_from_hashes
from llmctl.core.dedup.text import normalize
from llmctl.core.errors import UsageError

DEFAULT_WEIGHTS = (0.5, 0.5)  # (false positive, false negative): datasketch's MinHashLSH default
VERIFY_WEIGHTS = (0.1, 0.9)


@dataclass(frozen=True)
class DedupParams:
    """Everything that decides which documents are duplicates (and must match a saved ``--index``)."""

    method: str = "minhash"
    normalize: tuple[str, ...] = ("nfkc", "lower", "whitespace")
    ngram: int = 5
    shingle: str = "word"
    num_perm: int = 128
    threshold: float = 0.8
    bands: int = 0  # 0: from the threshold (datasketch's optimal rule)
    rows: int = 0
    hash: str = "fast"
    seed: int = 1  # permutation seed; 1 is datasketch's default

    def resolved(self, *, verify: bool = False) -> DedupParams:
        """With ``bands``/``rows`` filled in from the threshold when not given: datasketch's rule with equal
        weights on false positives and false negatives, or, when candidates are verified against the true
        Jaccard similarity (which removes false positives), weights of 1:9 in favour of recall."""
        if self.method != "minhash":
            return self
        if (self.bands == 0) != (self.rows == 0):
            raise UsageError("--bands and --rows go together (or give neither and use --threshold)")
        if self.bands == 0:
            weights = VERIFY_WEIGHTS if verify else DEFAULT_WEIGHTS
            b, r = optimal_params(self.threshold, self.num_perm, *weights)
            return DedupParams(**{**self.__dict__, "bands": b, "rows": r})
        if self.bands * self.rows > self.num_perm:
            raise UsageError(
                f"--bands x --rows ({self.bands} x {self.rows}) exceeds --num-perm {self.num_perm}"
            )
        return self

    def as_dict(self) -> dict:
        return {**self.__dict__, "normalize": list(self.normalize)}


@dataclass
class ChunkResult:
    keys: np.ndarray  # [docs, bands] uint64
    shingle_sets: list[np.ndarray] | None = field(default=None)  # sorted unique uint32 hashes per doc


_EMPTY = np.zeros(1, dtype=np.uint32)
_HASHER = UnitHasher()  # one per process (workers fork their own copy)


class ExactMethod:
    """Exact duplicates: an 8-byte BLAKE2b of the normalised text (collision odds ~ n^2 / 2^65)."""

    name = "exact"
    url = "https://en.wikipedia.org/wiki/BLAKE_(hash_function)"

    def keys(self, texts: list[str], params: DedupParams, want_sets: bool) -> ChunkResult:  # noqa: ARG002
        digests = b"".join(
            hashlib.blake2b(normalize(t, params.normalize).encode(), digest_size=8).digest() for t in texts
        )
        return ChunkResult(np.frombuffer(digests, dtype="<u8").astype(np.uint64).reshape(len(texts), 1))


class MinHashMethod:
    """Near duplicates: MinHash signatures of shingle sets, LSH banding (Broder 1997; MMDS ch. 3)."""

    name = "minhash"
    url = "http://www.mmds.org/"

    def keys(self, texts: list[str], params: DedupParams, want_sets: bool) -> ChunkResult:
        texts = [normalize(t, params.normalize) for t in texts]
        if params.hash == "fast":
            hashes, counts = fast_hashes_batch(texts, params.ngram, params.shingle, _HASHER)
            per_doc = np.split(hashes, np.cumsum(counts)[:-1]) if want_sets else []
        else:
            scheme = HASH_SCHEMES[params.hash]
            per_doc = [scheme(t, params.ngram, params.shingle, _HASHER) for t in texts]
            counts = np.fromiter((len(h) for h in per_doc), dtype=np.int64, count=len(per_doc))
            hashes = np.concatenate(per_doc) if per_doc else np.empty(0, dtype=np.uint32)
        # A text that normalises to nothing (all punctuation with --normalize punct) is one empty shingle:
        # all such texts are equal after normalisation, so they are duplicates of each other.
        if len(counts) and counts.min() == 0:
            hashes = np.insert(hashes, (np.cumsum(counts) - counts)[counts == 0], 0)
            counts = np.maximum(counts, 1)
            per_doc = [h if len(h) else _EMPTY for h in per_doc]
        a, b = permutations(params.num_perm, params.seed)
        sig = signatures_from_hashes(hashes, counts, a, b)
        sets = [np.unique(h) for h in per_doc] if want_sets else None
        return ChunkResult(band_keys(sig, params.bands, params.rows), sets)


METHODS = {"exact": ExactMethod(), "minhash": MinHashMethod()}


def chunk_keys(job: tuple[list[str], DedupParams, bool]) -> ChunkResult:
    """Top-level (picklable) worker entry point: ``(texts, params, want_sets) -> ChunkResult``."""
    texts, params, want_sets = job
    return METHODS[params.method].keys(texts, params, want_sets)
