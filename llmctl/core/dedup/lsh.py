"""LSH banding over MinHash signatures: ``b`` bands of ``r`` rows; two documents are candidates when all
``r`` values of some band agree, which happens with probability ``1 - (1 - s^r)^b`` at Jaccard ``s``.

Leskovec, Rajaraman, Ullman, *Mining of Massive Datasets*, ch. 3 (http://www.mmds.org/).
:func:`optimal_params` is datasketch's rule (``MinHashLSH(threshold=...)``): the ``(b, r)`` with
``b * r <= num_perm`` minimising the equally weighted areas of false positives (the S-curve below the
threshold) and false negatives (one minus it above).
"""

from __future__ import annotations

import functools

import numpy as np

from llmctl.core.errors import UsageError

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _integrate(f, lo: float, hi: float, points: int = 2001) -> float:
    x = np.linspace(lo, hi, points)
    y = f(x)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


@functools.cache
def optimal_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5):
    """``(bands, rows)`` minimising ``fp_weight * FP + fn_weight * FN`` (datasketch's ``_optimal_param``)."""
    if not 0.0 < threshold < 1.0:
        raise UsageError(f"--threshold must be between 0 and 1 (exclusive), got {threshold}")
    best, best_error = (1, 1), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _integrate(lambda s, b=b, r=r: 1 - (1 - s**r) ** b, 0.0, threshold)
            fn = _integrate(lambda s, b=b, r=r: (1 - s**r) ** b, threshold, 1.0)
            error = fp * fp_weight + fn * fn_weight
            if error < best_error:
                best, best_error = (b, r), error
    return best


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """Probability that two documents of Jaccard ``s`` share at least one band."""
    return 1 - (1 - s**rows) ** bands


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``[docs, bands]`` uint64: each band's ``rows`` values folded into one 64-bit key (FNV-1a over
    32-bit words). Equal bands give equal keys; distinct ones collide with probability about 2^-64."""
    n = sig.shape[0]
    if bands * rows > sig.shape[1]:
        raise UsageError(f"--bands x --rows ({bands} x {rows}) exceeds --num-perm {sig.shape[1]}")
    view = sig[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    keys = np.full((n, bands), _FNV_OFFSET, dtype=np.uint64)
    for j in range(rows):
        keys ^= view[:, :, j]
        keys *= _FNV_PRIME
    return keys


def bucket_runs(keys: np.ndarray) -> list[np.ndarray]:
    """For one band's ``[docs]`` keys: the groups (size > 1) of documents sharing a key, each sorted by
    document index, as arrays."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    return [order[s : s + k] for s, k in zip(starts[sizes > 1], sizes[sizes > 1], strict=True)]


def candidate_edges(keys: np.ndarray) -> np.ndarray:
    """``[edges, 2]`` int64 (first member, member) for every bucket of every band, deduplicated and sorted:
    enough edges to connect each bucket (a star on its smallest index)."""
    pairs = []
    for j in range(keys.shape[1]):
        k = keys[:, j]
        order = np.argsort(k, kind="stable")
        sk = k[order]
        new = np.r_[True, sk[1:] != sk[:-1]]
        first = order[np.flatnonzero(new)][np.cumsum(new) - 1]
        pairs.append(np.stack([first[~new], order[~new]], axis=1))
    if not pairs:
        return np.empty((0, 2), dtype=np.int64)
    edges = np.concatenate(pairs).astype(np.int64)
    return np.unique(edges, axis=0) if len(edges) else edges
