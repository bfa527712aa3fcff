"""Wanda (Sun et al., 2023, https://arxiv.org/abs/2306.11695): pruning by weights and activations.

The score of weight ``W[i, j]`` is ``|W[i, j]| * ||X_j||_2``, where ``X_j`` is input feature ``j`` over
every calibration token; weights are compared within each output row (the paper's "per output" group)
and the lowest ``int(in * sparsity)`` of each row are zeroed, or the lowest ``M - N`` of every M
consecutive weights of a row for an N:M pattern. No weight update.
"""

from __future__ import annotations

import torch

from llmctl.core.prune.masks import Pattern, select


class InputNorms:
    """Running ``sum_t x[t, j]^2`` over the calibration tokens a linear layer sees."""

    def __init__(self, in_features: int):
        self.sq = torch.zeros(in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # [tokens, in]
        self.sq += (x * x).sum(0).cpu()
        self.n += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        """``||X_j||_2`` per input feature ``[in]``."""
        return self.sq.sqrt().to(torch.float32)


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X||`` broadcast over rows: ``[out, in]``."""
    return weight.detach().to(torch.float32).abs() * norms.to(torch.float32)[None, :]


def wanda_prune(
    weight: torch.Tensor, stats: InputNorms, *, sparsity: float | None, pattern: Pattern | None, **_
) -> torch.Tensor:
    W = weight.detach().to(torch.float32)
    mask = select(wanda_scores(W, stats.norms), sparsity, pattern, per_row=True)
    return W.masked_fill(mask, 0)
