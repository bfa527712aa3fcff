"""Sparsifying a task vector (a fine-tune's delta from the base): which entries survive, and rescaling.

- ``magnitude`` (TIES, https://arxiv.org/abs/2306.01708): keep the ``k = max(1, int(density * n))`` largest
  |delta|.
- ``random`` (DARE, https://arxiv.org/abs/2311.03099): keep each entry with probability ``density``
  (Bernoulli); with rescaling the survivors are scaled so the L1 norm of the delta is unchanged, which in
  expectation is the paper's 1 / density.
- ``magnitude_outliers`` (Model Breadcrumbs, https://arxiv.org/abs/2312.06795): drop the ``int(gamma * n)``
  largest entries (outliers) and then the smallest, keeping ``int(density * n)``.
"""

from __future__ import annotations

import torch


def rescale_l1(delta: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``masked`` scaled so that its L1 norm equals ``delta``'s (unchanged when either is ~0)."""
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _magnitudes(delta: torch.Tensor) -> torch.Tensor:
    w = delta.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    if density >= 1:
        return delta
    if delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    w = _magnitudes(delta)
    # The k largest by a threshold: one k-th value search and a boolean mask instead of a full argsort
    # (int64 indices: twice the tensor, plus the sort's own copy) - the same set whenever the k-th
    # magnitude is not tied. Ties at the threshold are resolved by argsort's order, as mergekit does.
    threshold = torch.kthvalue(w, w.numel() - k + 1).values
    keep = w > threshold
    if int(keep.sum()) + int((w == threshold).sum()) == k:
        keep |= w == threshold
    else:
        keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
        keep[torch.argsort(w, descending=True)[:k]] = True
    del w
    masked = delta * keep.reshape_as(delta)
    return rescale_l1(delta, masked) if rescale else masked


def magnitude_outliers(delta: torch.Tensor, density: float, rescale: bool = False, gamma: float = 0.01):
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - keep - n_top)  # fewer outliers dropped when needed to keep `keep` entries
    w = _magnitudes(delta)
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if keep > 0:
        # Ranks [n_bottom, n_bottom + keep) in ascending order, by two k-th value searches when the
        # boundary values are not tied across the cut (else argsort's order decides, as in mergekit).
        low = torch.kthvalue(w, n_bottom + 1).values
        high = torch.kthvalue(w, n_bottom + keep).values
        if int((w < low).sum()) == n_bottom and int((w <= high).sum()) == n_bottom + keep:
            mask = (w >= low) & (w <= high)
        else:
            mask[torch.sort(w, descending=False).indices[n_bottom : n_bottom + keep]] = True
    del w
    masked = delta * mask.reshape_as(delta)
    return rescale_l1(delta, masked) if rescale else masked


def bernoulli(
    delta: torch.Tensor, density: float, rescale: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    if density >= 1:
        return delta
    dtype = delta.dtype if delta.device.type != "cpu" or delta.dtype == torch.bfloat16 else torch.float32
    keep = torch.full_like(delta, density, dtype=dtype)
    mask = torch.bernoulli(keep, generator=generator)
    work = delta.to(dtype)
    masked = work * mask
    return (rescale_l1(work, masked) if rescale else masked).to(delta.dtype)


SPARSIFIERS = {"magnitude": magnitude, "magnitude_outliers": magnitude_outliers, "random": bernoulli}
