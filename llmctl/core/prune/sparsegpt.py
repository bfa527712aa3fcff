"""SparseGPT (Frantar & Alistarh, 2023, https://arxiv.org/abs/2301.00774): one-shot pruning with OBS
weight updates, on the GPTQ machinery (:mod:`llmctl.core.quantize.gptq`).

For a linear layer with weight ``W [N, K]`` and calibration Hessian ``H = 2 X Xᵀ / n``
(:class:`~llmctl.core.quantize.gptq.HessianAccumulator`):

* dead inputs (``H[k, k] == 0``) get ``H[k, k] = 1`` and ``W[:, k] = 0``; ``H`` is dampened and
  ``U = chol((H + λI)⁻¹)ᵀ`` is its upper Cholesky inverse factor, exactly as GPTQ computes it;
* columns are visited in blocks of 128. At the start of each block the mask of that block is chosen
  *adaptively* from the current (already updated) weights by the OBS saliency ``w² / U[j, j]²``: the lowest
  ``int(N * 128 * sparsity)`` entries of the block (rows and columns together), as the reference does;
  for N:M the ``M - N`` lowest of every M columns of each row are chosen when the group is reached;
* each column is then pruned in turn; its error ``(w - ŵ) / U[j, j]`` updates the rest of the block at
  once (row of ``U``), and the later blocks lazily with one matrix product per block.

The only deliberate difference from the reference: the mask prunes an exact count (a stable sort), not
``saliency <= threshold``, so ties never prune extra weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmctl.core.prune.masks import Pattern, lowest
from llmctl.core.quantize.gptq import BLOCK_SIZE, HessianAccumulator, _damped_cholesky_inverse, _one_thread

__all__ = ["HessianAccumulator", "sparsegpt_prune"]


def _block_size(block_size: int, pattern: Pattern | None) -> int:
    """Blocks hold whole N:M groups."""
    if pattern is None or block_size % pattern.m == 0:
        return block_size
    return pattern.m * max(1, block_size // pattern.m)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    stats: HessianAccumulator | torch.Tensor,
    *,
    sparsity: float | None,
    pattern: Pattern | None,
    damp: float = 0.01,
    block_size: int = BLOCK_SIZE,
    warn: Callable[[str], None] | None = None,
    name: str = "layer",
) -> torch.Tensor:
    """``weight [N, K]`` pruned and updated to compensate, given its Hessian (or an accumulator of it)."""
    H = stats.H if isinstance(stats, HessianAccumulator) else stats
    W = weight.detach().to(torch.float32).clone()
    n, k = W.shape
    H = H.to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U = _damped_cholesky_inverse(H, damp, warn, name)  # [K, K] upper
    bs = _block_size(block_size, pattern)

    # Work on the transpose, as GPTQ does: a column of W is one contiguous row, and each per-column update
    # is an in-place rank-1 update (BLAS ger) on contiguous memory instead of a strided temporary.
    WT = W.T.contiguous()  # [K, N]
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)  # [B]
        if pattern is None:
            saliency = WT[i1:i2].pow(2) / d.pow(2)[:, None]  # [B, N]
            count = int(saliency.numel() * sparsity)
            maskT = lowest(saliency.T.reshape(1, -1), count).reshape(n, i2 - i1).T.contiguous()
        else:
            maskT = torch.zeros(i2 - i1, n, dtype=torch.bool)
        ErrT = torch.empty(i2 - i1, n)
        with _one_thread():
            _prune_block(WT[i1:i2], ErrT, U1, maskT, pattern)
        WT[i2:].addmm_(U[i1:i2, i2:].T, ErrT, alpha=-1)  # the lazy update of all later columns
    return WT.T.contiguous()


def _prune_block(
    W1: torch.Tensor, ErrT: torch.Tensor, U1: torch.Tensor, maskT: torch.Tensor, pattern
) -> None:
    """Prune the block's columns (rows of the transposed ``W1 [B, N]``, updated in place) one by one,
    spreading each column's error over the rest of the block; fills ``ErrT`` with the scaled errors."""
    b = U1.shape[0]
    diag = torch.diagonal(U1)
    pivots = diag.tolist()
    for i in range(b):
        if pattern is not None and i % pattern.m == 0:  # choose this N:M group's mask now
            g = slice(i, i + pattern.m)
            saliency = W1[g].pow(2) / diag[g].pow(2)[:, None]  # [M, N]
            maskT[g] = lowest(saliency.T, pattern.m - pattern.n).T
        w, err = W1[i], ErrT[i]
        torch.mul(w, maskT[i], out=err)  # the pruned part of the column: w - q
        err.div_(pivots[i])
        if i + 1 < b:
            W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1)
        w.masked_fill_(maskT[i], 0)  # exactly zero where pruned
