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

from collections.abc import Callable, Iterator

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


# --- Streamed selection: the same kept sets, decided over a task vector read in chunks -----------------
#
# A large tensor (an embedding) would otherwise need several full-size temporaries per model (the delta,
# its magnitudes, masks, the weighted stack). The streamed path reads each delta in chunks and returns a
# function that masks each chunk in the merge pass. Only the magnitude cut needs the whole vector: the
# magnitudes are gathered once (one float32 copy), the cut found by k-th value search and, when magnitudes
# tie across it, decided by the reference's full sort. The reference functions above stay the definition;
# tests hold the two equal.


def streamed(
    kind: str,
    chunks: Callable[[], Iterator[torch.Tensor]],
    n: int,
    density: float,
    *,
    rescale: bool = False,
    gamma: float = 0.01,
    generator: torch.Generator | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Plan ``SPARSIFIERS[kind]`` over a float32 CPU delta of ``n`` entries that ``chunks()`` yields in order.

    Returns ``apply(chunk)``, to be called on the same chunks in the same order, giving the reference's
    result chunk by chunk. ``generator`` advances exactly as the reference's draw would. When magnitudes
    tie across the cut (common: fine-tuned deltas are multiples of a few ulps), which tied entries survive
    is decided as the reference decides it, by a sort of the whole magnitude vector: that one step needs
    the full-size temporaries the streamed path otherwise avoids.
    """
    if density >= 1:
        return lambda d: d
    if kind == "random":
        assert generator is not None
        replay = torch.Generator()
        replay.set_state(generator.get_state())
        select = _bernoulli_draws(generator, density)  # planning advances the caller's generator...
        draw = _bernoulli_draws(replay, density)  # ...and the merge pass replays the same draws
        if not rescale:
            for d in chunks():
                select(d)
    elif kind in ("magnitude", "magnitude_outliers"):
        draw = select = _magnitude_selection(kind, chunks, n, density, gamma)
    else:
        raise ValueError(f"unknown sparsifier {kind!r}")
    scale = None
    if rescale:
        before = after = 0.0
        for d in chunks():
            before += d.abs().sum(dtype=torch.float64).item()
            after += (d * select(d)).abs().sum(dtype=torch.float64).item()
        if before >= 1e-7 and after >= 1e-7:
            scale = torch.tensor(before / after, dtype=torch.float32)

    def apply(d: torch.Tensor) -> torch.Tensor:
        masked = d * draw(d)
        return masked * scale if scale is not None else masked

    return apply


def _bernoulli_draws(generator: torch.Generator, density: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda d: torch.bernoulli(torch.full_like(d, density), generator=generator).bool()


def _magnitude_selection(kind, chunks, n, density, gamma) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-chunk keep masks for ``magnitude`` (the k largest) or ``magnitude_outliers`` (a rank window)."""
    if kind == "magnitude":
        k = max(1, int(density * n))
        lo_rank, hi_rank = n - k + 1, n
    else:
        keep = int(density * n)
        if keep == 0:
            return lambda d: torch.zeros_like(d, dtype=torch.bool)
        n_bottom = max(0, n - keep - int(gamma * n))
        lo_rank, hi_rank = n_bottom + 1, n_bottom + keep
    w = torch.empty(n)
    offset = 0
    for d in chunks():
        w[offset : offset + d.numel()] = d.abs_()
        offset += d.numel()
    lo = torch.kthvalue(w, lo_rank).values.item()
    hi = torch.kthvalue(w, hi_rank).values.item() if hi_rank < n else w.max().item()
    if int((w < lo).sum()) == lo_rank - 1 and int((w <= hi).sum()) == hi_rank:  # no tie across a cut
        del w
        return lambda d: (d.abs() >= lo) & (d.abs() <= hi)
    mask = torch.zeros(n, dtype=torch.bool)
    if kind == "magnitude":
        mask[torch.argsort(w, descending=True)[:k]] = True  # the reference's (and mergekit's) tie order
    else:
        mask[torch.sort(w, descending=False).indices[lo_rank - 1 : hi_rank]] = True
    del w
    state = {"offset": 0}

    def select(d: torch.Tensor) -> torch.Tensor:
        start = state["offset"]
        state["offset"] = 0 if start + d.numel() >= n else start + d.numel()  # each pass restarts at 0
        return mask[start : start + d.numel()]

    return select
