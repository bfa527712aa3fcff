"""Round-to-nearest (RTN) quantization: the min/max grid every integer method starts from.

The grid is GPTQ's reference ``Quantizer`` (IST-DASLab/gptq ``quant.py``): per row (and group) the range
``[min(x, 0), max(x, 0)]``; symmetric grids use ``max(|min|, max)`` on both sides with the zero point at
``(2**bits) / 2``; an all-zero row gets the range ``[-1, 1]``.
"""

from __future__ import annotations

import torch

from llmctl.core.errors import UsageError
from llmctl.core.quantize.formats import QuantizedWeight, natural_g_idx

SUPPORTED_BITS = (2, 3, 4, 8)


def check_group_size(in_features: int, group_size: int, name: str = "layer") -> None:
    if group_size == -1:
        return
    if group_size <= 0 or in_features % group_size:
        fits = [str(g) for g in (256, 128, 64, 32, 16) if in_features % g == 0][:2] or ["-1"]
        raise UsageError(
            f"--group-size {group_size} does not divide {name}'s input dimension {in_features}; "
            f"use a divisor such as {' or '.join(fits)} (or -1 for one group per row)"
        )


def grid_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``x [N, C]``: two ``[N]`` tensors (zero as float)."""
    maxq = 2**bits - 1
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers ``clamp(round(x / scale) + zero, 0, maxq)``; ``scale``/``zero`` broadcast against ``x``."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return scale * (quantize_int(x, scale, zero, bits) - zero)


def rtn_quantize(weight: torch.Tensor, *, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Round every group of ``weight [N, K]`` to its own min/max grid, with no error compensation."""
    if bits not in SUPPORTED_BITS:
        raise UsageError(
            f"--bits {bits} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}"
        )
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    check_group_size(k, group_size)
    size = k if group_size == -1 else group_size
    groups = w.reshape(n, k // size, size).permute(1, 0, 2).reshape(-1, size)  # [G*N, size]
    scale, zero = grid_params(groups, bits, sym)
    q = quantize_int(groups, scale[:, None], zero[:, None], bits)
    g = k // size
    q = q.reshape(g, n, size).permute(1, 0, 2).reshape(n, k)
    return QuantizedWeight(
        qweight=q.to(torch.uint8), scales=scale.reshape(g, n).T.contiguous(),
        zeros=zero.reshape(g, n).T.to(torch.int32).contiguous(), g_idx=natural_g_idx(k, group_size),
        bits=bits, group_size=group_size, sym=sym,
    )  # fmt: skip


def fp8_quantize(weight: torch.Tensor) -> QuantizedWeight:
    """FP8 e4m3 with one scale per output channel: ``scale = max|w_row| / 448``."""
    from llmctl.core.quantize.formats import FP8_MAX

    w = weight.detach().to(torch.float32)
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [N, 1]
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight(
        qweight=q, scales=scale, zeros=None, g_idx=None, bits=8, group_size=-1, sym=True, kind="fp8"
    )
