"""Comparison helpers for kernel tests: relative error against the torch reference, per-dtype tolerance."""

from __future__ import annotations

import torch

# Relative-error tolerances ‖out − ref‖ / ‖ref‖ per dtype (the reference runs in fp32 where it matters).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, *, tol=None, what=""
):
    """Relative error within the dtype's tolerance, no NaN/inf (poisoned elements), same shape."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten output?)"
    err = rel_err(out, ref)
    limit = tol if tol is not None else TOLERANCE[dtype or out.dtype]
    print(
        f"[rel_err] {what or 'output'} {tuple(out.shape)} {dtype or out.dtype}: {err:.3e} (tol {limit:.1e})"
    )
    assert err <= limit, f"{what}: relative error {err:.3e} > {limit:.1e}"
