"""Exact and near-duplicate removal (MinHash + LSH) and n-gram decontamination of JSONL corpora."""

from llmctl.core.dedup.decontam import DecontamStats, build_eval_grams, decontaminate
from llmctl.core.dedup.index import DedupIndex
from llmctl.core.dedup.methods import METHODS, DedupParams
from llmctl.core.dedup.pipeline import (
    KEEP_RULES,
    Clustering,
    DedupStats,
    apply_clustering,
    cluster_records,
    kept_line_numbers,
    run_dedup,
)

__all__ = [
    "KEEP_RULES",
    "METHODS",
    "Clustering",
    "DecontamStats",
    "DedupIndex",
    "DedupParams",
    "DedupStats",
    "apply_clustering",
    "build_eval_grams",
    "cluster_records",
    "decontaminate",
    "kept_line_numbers",
    "run_dedup",
]
