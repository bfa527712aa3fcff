"""RMSNorm, forward and backward, with an optional fused residual add.

Root-mean-square layer normalisation (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467)::

    rstd = 1 / sqrt(mean(x^2) + eps)
    y    = weight * to_input_dtype(x * rstd)

in the **Llama/Qwen2/Mistral convention** of Hugging Face's ``LlamaRMSNorm``: the input is cast to fp32,
normalised, cast back to the input dtype, and only then multiplied by the weight (so the output dtype is
``torch.result_type(weight, x)``). Gemma's ``(1 + weight)`` convention is not this one.

With ``residual`` given, the add in front of the norm is fused as Liger-Kernel and vLLM do::

    new_residual = x + residual          # in the input dtype, like the unfused ``residual + hidden``
    out          = rms_norm(new_residual)
    return out, new_residual

All reductions are in fp32. Any leading shape works (the last dimension is normalised) and the hidden
size need not be a power of two. The backward pass gives ``dx`` (also ``dresidual``, the same tensor),
and ``dweight``, reduced over rows in fp32 partial sums per program.
"""

from __future__ import annotations

import torch

from llmctl.kernels._common import (
    HAS_TRITON,
    check_launchable,
    empty,
    interpreting,
    next_power_of_2,
    tl,
    triton,
)
from llmctl.kernels.dispatch import get_kernel, register_kernel

NAME = "rms_norm"
MAX_HIDDEN = 65536  # one row per program held in registers; wider rows fall back to the reference


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
):
    """The definition of correct: plain torch, autograd-capable, fp32 inside (HF ``LlamaRMSNorm``)."""
    new_residual = None
    if residual is not None:
        x = x + residual
        new_residual = x
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(input_dtype)
    return out if residual is None else (out, new_residual)


if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(
        X,  # [rows, N] input (row stride stride_x, unit column stride)
        R,  # [rows, N] residual, read only when HAS_RESIDUAL
        W,  # [N] weight
        Y,  # [rows, N] output, dtype result_type(weight, x)
        S,  # [rows, N] x + residual (the new residual), written only when HAS_RESIDUAL
        RSTD,  # [rows] fp32 1/rms, kept for the backward pass
        stride_x,
        stride_r,
        stride_y,
        stride_s,
        n_rows,
        N,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_R: tl.constexpr,  # rows per program (1 for wide rows on a GPU)
        BLOCK: tl.constexpr,  # next power of two >= N
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < N)[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
            s = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)  # rounded like the unfused add
            tl.store(S + rows[:, None] * stride_s + cols[None, :], s, mask=mask)
            x = s
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)  # [BLOCK_R]
        tl.store(RSTD + rows, rstd, mask=row_mask)
        xhat = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)  # cast back to the input dtype, then weight
        w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(
            Y + rows[:, None] * stride_y + cols[None, :],
            (xhat * w[None, :]).to(Y.dtype.element_ty),
            mask=mask,
        )

    @triton.jit
    def _rms_norm_bwd_kernel(
        DY,  # [rows, N] gradient of the output
        X,  # [rows, N] the normalised input (x, or x + residual)
        W,  # [N] weight
        RSTD,  # [rows] fp32 from the forward pass
        DS,  # [rows, N] gradient arriving on the new residual, read only when HAS_DRESIDUAL
        DX,  # [rows, N] gradient of the normalised input (dtype of X)
        DW_PART,  # [programs, N] fp32 partial sums of dweight, one row per program
        stride_dy,
        stride_x,
        stride_ds,
        stride_dx,
        n_rows,
        N,
        ROWS_PER_PROGRAM: tl.constexpr,  # a multiple of BLOCK_R; constexpr (the interpreter here cannot
        HAS_DRESIDUAL: tl.constexpr,  # loop to a runtime bound), a power of two so variants stay few
        BLOCK_R: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_mask = cols < N
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        first = pid.to(tl.int64) * ROWS_PER_PROGRAM
        for i in range(0, ROWS_PER_PROGRAM, BLOCK_R):
            rows = first + i + tl.arange(0, BLOCK_R)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            x_raw = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            x = x_raw.to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
            xhat = x * rstd
            dw += tl.sum(dy * xhat.to(x_raw.dtype).to(tl.float32), axis=0)
            dxhat = dy * w[None, :]
            c = tl.sum(dxhat * xhat, axis=1)[:, None] / N
            dx = rstd * (dxhat - xhat * c)
            if HAS_DRESIDUAL:
                dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(
                    tl.float32
                )
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw, mask=col_mask)


def _block_rows(block: int) -> int:
    """Rows per tile: one wide row per program on a GPU; under the interpreter, whole tiles of rows (each
    program costs Python overhead there, so fewer and bigger programs run much faster)."""
    budget = 16384 if interpreting() else 2048
    return max(1, min(64, budget // block))


def _num_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` -> ``[rows, N]`` with unit column stride (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _programs_for_backward(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))  # the interpreter: few programs, each looping over rows


def _forward(x, weight, residual, eps):
    shape, n = x.shape, x.shape[-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    block = next_power_of_2(n)
    if residual is not None:
        r2 = _rows(residual)
        s2 = empty(rows, n, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    else:
        r2 = s2 = x2  # unused by the kernel when HAS_RESIDUAL is False
    normed_dtype = s2.dtype if residual is not None else x.dtype
    y2 = empty(rows, n, dtype=torch.promote_types(weight.dtype, normed_dtype), device=x.device)
    rstd = empty(rows, dtype=torch.float32, device=x.device)
    if rows > 0:
        block_r = _block_rows(block)
        _rms_norm_fwd_kernel[(triton.cdiv(rows, block_r),)](
            x2, r2, weight, y2, s2, rstd,
            x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0),
            rows, n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK=block,
            num_warps=_num_warps(block * block_r),
        )  # fmt: skip
    return (
        y2.view(shape),
        (s2.view(shape) if residual is not None else None),
        x2 if residual is None else s2,
        rstd,
    )


def _backward(dy, x2, weight, rstd, ds):
    n = x2.shape[-1]
    dy2 = _rows(dy)
    rows = x2.shape[0]
    block = next_power_of_2(n)
    block_r = _block_rows(block)
    rows_per_program = max(
        block_r, next_power_of_2(triton.cdiv(rows, _programs_for_backward(rows, x2.device)))
    )
    programs = max(1, triton.cdiv(rows, rows_per_program))
    dx2 = empty(rows, n, dtype=x2.dtype, device=x2.device)
    dw_part = empty(programs, n, dtype=torch.float32, device=x2.device)
    ds2 = _rows(ds) if ds is not None else dy2
    if rows > 0:
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight, rstd, ds2, dx2, dw_part,
            dy2.stride(0), x2.stride(0), ds2.stride(0), dx2.stride(0),
            rows, n,
            ROWS_PER_PROGRAM=rows_per_program, HAS_DRESIDUAL=ds is not None, BLOCK_R=block_r, BLOCK=block,
            num_warps=_num_warps(block * block_r),
        )  # fmt: skip
        dw = dw_part.sum(0)
    else:
        dw = torch.zeros(n, dtype=torch.float32, device=x2.device)
    return dx2, dw.to(weight.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        y, s, x2, rstd = _forward(x, weight, residual, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        ctx.has_residual = residual is not None
        ctx.residual_dtype = residual.dtype if residual is not None else None
        return (y, s) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, ds=None):
        x2, weight, rstd = ctx.saved_tensors
        dx2, dw = _backward(dy, x2, weight, rstd, ds if ctx.has_residual else None)
        dx = dx2.view(ctx.shape)
        dres = dx.to(ctx.residual_dtype) if ctx.has_residual else None
        dweight = dw if ctx.needs_input_grad[1] else None
        return dx, dweight, dres, None


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None
):
    """The Triton path (CUDA, or the CPU under ``TRITON_INTERPRET=1``), same contract as the reference."""
    if x.shape[-1] > MAX_HIDDEN or x.shape[-1] == 0:
        return rms_norm_reference(x, weight, eps, residual)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({x.shape[-1]},)")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    check_launchable(x, weight)
    return _RMSNormFunction.apply(x, weight, residual, float(eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """RMSNorm of the last dimension (Llama convention); with ``residual``, returns ``(out, x + residual)``.

    Dispatches to Triton on CUDA tensors, the torch reference elsewhere (``LLMCTL_KERNELS`` overrides).
    """
    return get_kernel(NAME, on_cuda=x.is_cuda)(x, weight, eps, residual)


register_kernel(
    NAME,
    torch=rms_norm_reference,
    triton=rms_norm_triton if HAS_TRITON else None,
    reference="Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467 (HF LlamaRMSNorm convention)",
)

__all__ = ["rms_norm", "rms_norm_reference", "rms_norm_triton"]
