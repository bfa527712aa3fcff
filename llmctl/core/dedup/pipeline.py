"""The dedup pipeline: read -> keys (in parallel) -> candidate buckets -> union-find -> keep one per cluster.

Two passes over the input: the first computes each document's bucket keys (only the keys, its length and
its ``file:line`` stay in memory: about ``8 * bands + 100`` bytes per document), the second re-reads the
input and writes the kept (or all, marked) records in input order. Standard input cannot be read twice,
so its records are kept in memory instead.

Determinism: chunks are processed by a pool but collected in input order, clusters are rooted at their
smallest document index, so the output is the same for any ``--workers``.
"""

from __future__ import annotations

import bisect
import multiprocessing
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmctl.core.dedup.index import DedupIndex
from llmctl.core.dedup.lsh import bucket_runs, candidate_edges
from llmctl.core.dedup.methods import ChunkResult, DedupParams, chunk_keys
from llmctl.core.dedup.text import jaccard
from llmctl.core.dedup.unionfind import UnionFind
from llmctl.core.errors import UsageError
from llmctl.core.io import Record

KEEP_RULES = ("first", "longest")
CHUNK_DOCS = 2048
CHUNK_CHARS = 2_000_000  # a chunk also ends at this much text, so long documents keep workers' memory small


@dataclass
class DedupStats:
    documents: int = 0
    duplicates: int = 0
    clusters: int = 0  # clusters of two or more documents (indexed documents included)
    kept: int = 0
    candidate_pairs: int = 0
    rejected_pairs: int = 0  # candidate pairs below the threshold (--verify-jaccard)
    indexed_before: int = 0
    seconds: float = 0.0
    bands: int = 0
    rows: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class DocIds:
    """``file:line`` of every document, indexed ones first, stored compactly: earlier runs' ids as strings,
    this run's as one source name per run of lines plus an int64 array of line numbers (8 bytes each)."""

    def __init__(self, old: list[str]) -> None:
        self.old = old
        self.sources: list[tuple[int, str]] = []  # (first new index, source name)
        self.lines = array("q")

    def append(self, source: str, line: int) -> None:
        if not self.sources or self.sources[-1][1] != source:
            self.sources.append((len(self.lines), source))
        self.lines.append(line)

    def __len__(self) -> int:
        return len(self.old) + len(self.lines)

    def __getitem__(self, i: int) -> str:
        if i < len(self.old):
            return self.old[i]
        j = i - len(self.old)
        k = bisect.bisect_right(self.sources, (j, chr(0x10FFFF))) - 1
        return f"{self.sources[k][1]}:{self.lines[j]}"

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


@dataclass
class Clustering:
    """The result of pass one: for each new document, its cluster root and whether it is kept."""

    roots: np.ndarray  # [old + new] int64, smallest member of each document's cluster
    kept: np.ndarray  # [new] bool
    wheres: DocIds  # [old + new] "file:line" (indexed documents first)
    n_old: int
    sizes: dict[int, int] = field(default_factory=dict)  # root -> members, for clusters of 2+

    def cluster_of(self, i: int) -> str | None:
        """The cluster id (``file:line`` of its first member) of new document ``i``, None if alone."""
        root = int(self.roots[self.n_old + i])
        return self.wheres[root] if root in self.sizes else None


def compute_keys(
    texts: Iterable[str], params: DedupParams, *, workers: int, want_sets: bool
) -> Iterator[ChunkResult]:
    """Chunk results in input order, computed by ``workers`` processes."""
    jobs = ((chunk, params, want_sets) for chunk in _chunks(texts, CHUNK_DOCS, CHUNK_CHARS))
    if workers <= 1:
        yield from map(chunk_keys, jobs)
        return
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(chunk_keys, jobs)


def _chunks(items: Iterable[str], size: int, max_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for item in items:
        chunk.append(item)
        chars += len(item)
        if len(chunk) == size or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def cluster(
    keys: np.ndarray,
    lengths: np.ndarray,
    *,
    n_old: int,
    keep: str,
    threshold: float,
    shingle_sets: list[np.ndarray] | None,
    stats: DedupStats,
) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """Union documents that share a bucket key; returns (roots ``[old+new]``, kept ``[new]``, sizes).

    With ``shingle_sets``, a candidate pair is joined only if its true Jaccard similarity reaches
    ``threshold``; each bucket member is tried against the earlier members until one passes.
    """
    n = keys.shape[0]
    uf = UnionFind(n)
    if shingle_sets is None:
        edges = candidate_edges(keys)
        stats.candidate_pairs = len(edges)
        for x, y in edges.tolist():
            uf.union(x, y)
    else:
        sets = [set(s.tolist()) for s in shingle_sets]
        verified: dict[tuple[int, int], bool] = {}
        for j in range(keys.shape[1]):
            for run in bucket_runs(keys[:, j]):
                members = run.tolist()
                for i, y in enumerate(members[1:], start=1):
                    for x in members[:i]:
                        if uf.find(x) == uf.find(y):
                            break
                        ok = verified.get((x, y))
                        if ok is None:
                            ok = verified[(x, y)] = jaccard(sets[x], sets[y]) >= threshold
                        if ok:
                            uf.union(x, y)
                            break
        stats.candidate_pairs = len(verified)
        stats.rejected_pairs = sum(1 for ok in verified.values() if not ok)
    return choose_kept(uf, lengths, n_old=n_old, keep=keep)


def choose_kept(
    uf: UnionFind, lengths: np.ndarray, *, n_old: int, keep: str
) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """From the unions: roots ``[old+new]``, kept ``[new]`` (one per cluster, by ``keep``), cluster sizes."""
    n = len(uf.parent)
    roots = uf.roots()
    unique, counts = np.unique(roots, return_counts=True)
    sizes = {int(r): int(c) for r, c in zip(unique, counts, strict=True) if c > 1}
    kept = np.ones(n - n_old, dtype=bool)
    members = np.flatnonzero(np.isin(roots, list(sizes))) if sizes else np.empty(0, dtype=np.int64)
    if len(members):
        new_members = members[members >= n_old]
        kept[new_members - n_old] = False
        chosen: dict[int, int] = {}
        for m in new_members.tolist():
            r = int(roots[m])
            if r < n_old:
                continue  # the cluster's first member was kept in an earlier run
            if keep == "first":
                chosen.setdefault(r, m)
            elif r not in chosen or lengths[m - n_old] > lengths[chosen[r] - n_old]:
                chosen[r] = m
        kept[np.array(list(chosen.values()), dtype=np.int64) - n_old] = True
    return roots, kept, sizes


def texts_noting(records: Iterable[Record], wheres: DocIds, lengths: array) -> Iterator[str]:
    """The records' texts, noting each one's ``file:line`` and length on the way (all pass one keeps)."""
    for record in records:
        wheres.append(record.source, record.line)
        lengths.append(len(record.text))
        yield record.text


def run_dedup(
    records: Iterable[Record],
    params: DedupParams,
    *,
    keep: str = "first",
    verify_jaccard: bool = False,
    workers: int = 1,
    index: DedupIndex | None = None,
    stats: DedupStats | None = None,
) -> Clustering:
    """Pass one over ``records``: compute keys, cluster, decide which documents are kept."""
    if keep not in KEEP_RULES:
        raise UsageError(f"unknown --keep {keep!r}; known: {', '.join(KEEP_RULES)}")
    stats = stats if stats is not None else DedupStats()
    start = time.perf_counter()
    params = params.resolved(verify=verify_jaccard)
    stats.bands, stats.rows = (params.bands, params.rows) if params.method == "minhash" else (1, 1)
    wheres = DocIds(list(index.wheres) if index is not None else [])
    n_old = len(wheres)
    stats.indexed_before = n_old
    lengths = array("q")

    key_chunks = [index.keys] if index is not None else []
    sets: list[np.ndarray] | None = [] if verify_jaccard else None
    for result in compute_keys(
        texts_noting(records, wheres, lengths), params, workers=workers, want_sets=verify_jaccard
    ):
        key_chunks.append(result.keys)
        if sets is not None and result.shingle_sets is not None:
            sets.extend(result.shingle_sets)
    width = stats.bands if params.method == "minhash" else 1
    keys = np.concatenate(key_chunks) if key_chunks else np.empty((0, width), dtype=np.uint64)
    doc_lengths = np.array(lengths, dtype=np.int64)
    roots, kept, sizes = cluster(
        keys, doc_lengths, n_old=n_old, keep=keep,
        threshold=params.threshold, shingle_sets=sets, stats=stats,
    )  # fmt: skip
    if index is not None:
        index.update(keys, wheres)
    stats.documents = len(lengths)
    stats.kept = int(kept.sum())
    stats.duplicates = stats.documents - stats.kept
    stats.clusters = len(sizes)
    stats.seconds = time.perf_counter() - start
    return Clustering(roots=roots, kept=kept, wheres=wheres, n_old=n_old, sizes=sizes)


def apply_clustering(
    records: Iterable[Record], clustering: Clustering, *, mark: bool
) -> Iterator[dict[str, Any]]:
    """Pass two: the kept records (or every record with ``dup_cluster`` and ``is_duplicate``), in order."""
    for i, record in enumerate(records):
        kept = bool(clustering.kept[i])
        if mark:
            data = dict(record.data)
            data["dup_cluster"] = clustering.cluster_of(i)
            data["is_duplicate"] = not kept
            yield data
        elif kept:
            yield record.data


def kept_line_numbers(clustering: Clustering) -> list[int]:
    """The ``file:line`` line numbers of this run's kept documents, in input order (one input file)."""
    lines = np.frombuffer(clustering.wheres.lines, dtype=np.int64) if len(clustering.wheres.lines) else None
    return [] if lines is None else lines[clustering.kept].tolist()


def cluster_records(clustering: Clustering) -> Iterator[dict[str, Any]]:
    """One audit record per cluster of two or more: its id, size, kept member and members (file:line)."""
    members: dict[int, list[int]] = {r: [] for r in clustering.sizes}
    for i, root in enumerate(clustering.roots.tolist()):
        if root in members:
            members[root].append(i)
    for root in sorted(members):
        group = members[root]
        kept = [m for m in group if m >= clustering.n_old and clustering.kept[m - clustering.n_old]]
        yield {
            "cluster": clustering.wheres[root],
            "size": len(group),
            "kept": clustering.wheres[kept[0]]
            if kept
            else (clustering.wheres[root] if root < clustering.n_old else None),
            "members": [clustering.wheres[m] for m in group],
            "indexed": [clustering.wheres[m] for m in group if m < clustering.n_old],
        }
