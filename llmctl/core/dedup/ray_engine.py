"""``--engine ray``: the dedup pipeline's heavy steps on a Ray cluster.

The driver streams the input once (keeping only each document's ``file:line`` and length, as the local
engine does) and ships chunks of text to Ray tasks, which compute the bucket keys (MinHash signatures and
LSH band hashes, or exact hashes) with the same code as the local engine and return them as Arrow tables
of ``(doc, band, key)`` rows into the object store. Ray Data then groups those rows by ``(band, key)`` and
turns every bucket of two or more documents into edges ``(first member, member)``; only the edges come
back to the driver, whose union-find roots each cluster at its smallest document index. The clusters, and
so the output, are the same as the local engine's (tested).

Connects to the cluster named by ``RAY_ADDRESS`` (or an already initialised Ray); otherwise starts a local
one with ``--workers`` CPUs. Not supported here (the local engine has them): ``--verify-jaccard`` (it needs
every document's shingle set) and ``--index``.
"""

from __future__ import annotations

import logging
import os
import time
from array import array
from collections.abc import Iterable

import numpy as np

from llmctl.core.dedup.methods import DedupParams, chunk_keys
from llmctl.core.dedup.pipeline import (
    CHUNK_CHARS,
    CHUNK_DOCS,
    Clustering,
    DedupStats,
    DocIds,
    _chunks,
    choose_kept,
    texts_noting,
)
from llmctl.core.dedup.unionfind import UnionFind
from llmctl.core.errors import LlmctlError, UsageError
from llmctl.core.io import Record


def _keys_table(texts: list[str], start: int, params: DedupParams):
    """One chunk's bucket keys as an Arrow table of (doc, band, key) rows (runs in a Ray task)."""
    import pyarrow as pa

    keys = chunk_keys((texts, params, False)).keys  # [docs, bands] uint64
    docs, bands = keys.shape
    return pa.table(
        {
            "doc": np.repeat(np.arange(start, start + docs, dtype=np.int64), bands),
            "band": np.tile(np.arange(bands, dtype=np.int32), docs),
            "key": keys.reshape(-1),
        }
    )


def _bucket_edges(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Edges (smallest member, member) of one (band, key) bucket; none for a bucket of one."""
    docs = np.unique(group["doc"])
    return {"a": np.repeat(docs[:1], max(len(docs) - 1, 0)), "b": docs[1:]}


def _connect(workers: int) -> bool:
    """Initialise Ray quietly; True when this call started it (and so must shut it down)."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UsageError(f"--engine ray needs Ray Data: pip install 'ray[data]' ({e})") from None
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(
            address=address, num_cpus=None if address else max(1, workers), include_dashboard=False,
            log_to_driver=False, logging_level=logging.ERROR, configure_logging=False,
            object_store_memory=None if address else 256 * 1024**2,
        )  # fmt: skip
    except Exception as e:  # a bad RAY_ADDRESS, a cluster that does not answer
        raise LlmctlError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {e}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return True


def run_dedup_ray(
    records: Iterable[Record],
    params: DedupParams,
    *,
    keep: str = "first",
    workers: int = 2,
    stats: DedupStats | None = None,
) -> Clustering:
    """Pass one on Ray: the same :class:`Clustering` the local engine computes."""
    import ray

    stats = stats if stats is not None else DedupStats()
    start_time = time.perf_counter()
    params = params.resolved()
    stats.bands, stats.rows = (params.bands, params.rows) if params.method == "minhash" else (1, 1)
    started = _connect(workers)
    try:
        wheres = DocIds([])
        lengths = array("q")

        task = ray.remote(_keys_table)
        pending: list = []
        limit = 2 * max(1, int(ray.cluster_resources().get("CPU", workers)))
        tables = []
        start = 0
        for chunk in _chunks(texts_noting(records, wheres, lengths), CHUNK_DOCS, CHUNK_CHARS):
            ref = task.remote(chunk, start, params)
            tables.append(ref)
            pending.append(ref)
            start += len(chunk)
            if len(pending) >= limit:  # backpressure: the driver never holds much text
                _, pending = ray.wait(pending, num_returns=len(pending) - limit + 1)
        n = start
        uf = UnionFind(n)
        candidate = 0
        if tables:
            edges = (
                ray.data.from_arrow_refs(tables)
                .groupby(["band", "key"])
                .map_groups(_bucket_edges, batch_format="numpy")
            )
            seen = set()
            for batch in edges.iter_batches(batch_format="numpy", batch_size=65536):
                for a, b in zip(batch["a"].tolist(), batch["b"].tolist(), strict=True):
                    seen.add((a, b))
                    uf.union(a, b)
            candidate = len(seen)
        stats.candidate_pairs = candidate
        roots, kept, sizes = choose_kept(uf, np.array(lengths, dtype=np.int64), n_old=0, keep=keep)
    finally:
        if started:
            ray.shutdown()
    stats.documents = len(lengths)
    stats.kept = int(kept.sum())
    stats.duplicates = stats.documents - stats.kept
    stats.clusters = len(sizes)
    stats.seconds = time.perf_counter() - start_time
    return Clustering(roots=roots, kept=kept, wheres=wheres, n_old=0, sizes=sizes)
