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
from llmctl.core.quantize.gptq import BLOCK_SIZE, HessianAccumulator, _damped_cholesky_inverse

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

    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        W1 = W[:, i1:i2].clone()  # [N, B]
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)  # [B]
        if pattern is None:
            saliency = W1.pow(2) / d.pow(2)[None, :]
            count = int(W1.numel() * sparsity)
            mask1 = lowest(saliency.reshape(1, -1), count).reshape(W1.shape)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern.m == 0:
                g = slice(i, i + pattern.m)
                saliency = W1[:, g].pow(2) / d[g].pow(2)[None, :]
                mask1[:, g] = lowest(saliency, pattern.m - pattern.n)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q  # exactly zero where pruned (the update above leaves rounding noise)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W
