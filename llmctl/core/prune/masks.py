"""Which weights to zero: masks from a score matrix, at a sparsity or in an N:M pattern.

Every mask here is a boolean ``[out, in]`` tensor that is ``True`` where a weight is *pruned* (set to
zero), and every function prunes an exact count: ties are broken by position (a stable sort), never by a
``<=`` threshold that could prune more than asked.

N:M follows NVIDIA's sparse tensor cores: at most ``N`` non-zero weights in every group of ``M``
consecutive input columns of a row (2:4 keeps 2 of every 4, so it is 50% sparse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.core.errors import UsageError


@dataclass(frozen=True)
class Pattern:
    """``n`` weights kept in every group of ``m`` consecutive input columns."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(text: str) -> Pattern:
    """``"2:4"`` -> Pattern(2, 4); a usage error for anything that is not ``0 < N < M``."""
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise UsageError(f"--pattern {text!r}: expected N:M, for example 2:4") from None
    if not 0 < n < m:
        raise UsageError(f"--pattern {text}: need 0 < N < M (N weights kept in every M)")
    return Pattern(n, m)


def check_sparsity(sparsity: float) -> float:
    if not 0 < sparsity < 1:
        raise UsageError(f"--sparsity {sparsity}: must be between 0 and 1 (exclusive), e.g. 0.5")
    return sparsity


def lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` lowest entries of each row of ``score [rows, cols]``."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        order = torch.argsort(score, dim=1, stable=True)
        mask.scatter_(1, order[:, :count], True)
    return mask


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune ``int(in * sparsity)`` weights in every output row (Wanda's comparison group)."""
    return lowest(score, int(score.shape[1] * sparsity))


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune ``int(numel * sparsity)`` weights of the whole matrix (one threshold per layer)."""
    flat = lowest(score.reshape(1, -1), int(score.numel() * sparsity))
    return flat.reshape(score.shape)


def nm_mask(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Prune the ``M - N`` lowest of every group of ``M`` consecutive columns in each row."""
    rows, cols = score.shape
    if cols % pattern.m:
        raise UsageError(f"--pattern {pattern}: M={pattern.m} does not divide the input dimension {cols}")
    groups = score.reshape(rows * cols // pattern.m, pattern.m)  # [rows * groups, M]
    return lowest(groups, pattern.m - pattern.n).reshape(rows, cols)


def select(
    score: torch.Tensor, sparsity: float | None, pattern: Pattern | None, *, per_row: bool
) -> torch.Tensor:
    if pattern is not None:
        return nm_mask(score, pattern)
    assert sparsity is not None
    return row_mask(score, sparsity) if per_row else matrix_mask(score, sparsity)


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((weight == 0).sum()) / weight.numel()
