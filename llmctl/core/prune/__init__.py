"""Pruning: unstructured (magnitude, Wanda, SparseGPT, N:M), depth (ShortGPT block influence, angular
distance, perplexity, progressive in-domain with optional LoRA recovery), width (MLP channels, GQA head
groups) into Hugging Face directories that load anywhere, and low-rank factorization (a factored checkpoint
llmctl loads, or its dense product).

from llmctl.core.prune import PruneOptions, prune_model
prune_model("model_dir", Path("out"), PruneOptions(method="wanda", sparsity=0.5))

Importing this package does not import torch; the names below load on first use.
"""

from typing import Any

__all__ = ["METHODS", "PruneOptions", "prune_loaded", "prune_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from llmctl.core.prune import run

        return getattr(run, name)
    raise AttributeError(name)
