"""Magnitude pruning: zero the weights of smallest ``|W|``, one threshold per weight matrix.

The baseline of Wanda (https://arxiv.org/abs/2306.11695) and SparseGPT: no calibration data. With an N:M
pattern the comparison group is each group of M consecutive weights of a row.
"""

from __future__ import annotations

import torch

from llmctl.core.prune.masks import Pattern, select


def magnitude_prune(
    weight: torch.Tensor, stats: None = None, *, sparsity: float | None, pattern: Pattern | None, **_
) -> torch.Tensor:
    """``weight [out, in]`` with the smallest-magnitude entries set to zero (a new tensor)."""
    W = weight.detach().to(torch.float32)
    mask = select(W.abs(), sparsity, pattern, per_row=False)
    return W.masked_fill(mask, 0)
