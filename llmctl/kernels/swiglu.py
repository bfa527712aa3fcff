"""SwiGLU activation, forward and backward: ``silu(gate) * up`` on separate gate and up tensors.

The gated linear unit with a Swish/SiLU gate (Shazeer 2020, https://arxiv.org/abs/2002.05202), as Hugging
Face's ``LlamaMLP`` computes ``act_fn(gate_proj(x)) * up_proj(x)``::

    out   = silu(g) * u,                silu(g) = g * sigmoid(g)
    du    = dout * silu(g)
    dg    = dout * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))

One fused elementwise pass (fp32 inside, one rounding to the output dtype) instead of three; the backward
pass recomputes ``sigmoid(g)`` instead of storing it. Any shape; gate and up must match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmctl.kernels._common import HAS_TRITON, check_launchable, empty, tl, triton
from llmctl.kernels.dispatch import get_kernel, register_kernel

NAME = "swiglu"
BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The definition of correct: ``silu(gate) * up`` in fp32, cast to the inputs' common dtype."""
    dtype = torch.promote_types(gate.dtype, up.dtype)
    return (F.silu(gate.to(torch.float32)) * up.to(torch.float32)).to(dtype)


if HAS_TRITON:

    @triton.jit
    def _swiglu_fwd_kernel(
        G,  # [n] gate, flattened contiguous
        U,  # [n] up
        OUT,  # [n] output
        n,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        out = g * tl.sigmoid(g) * u
        tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        DO,  # [n] gradient of the output
        G,  # [n] gate
        U,  # [n] up
        DG,  # [n] gradient of gate (dtype of gate)
        DU,  # [n] gradient of up (dtype of up)
        n,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        tl.store(DU + offs, (do * silu).to(DU.dtype.element_ty), mask=mask)
        tl.store(DG + offs, (do * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = _flat(gate), _flat(up)
        out = empty(g.numel(), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        if g.numel():
            _swiglu_fwd_kernel[(triton.cdiv(g.numel(), BLOCK),)](
                g, u, out, g.numel(), BLOCK=BLOCK, num_warps=4
            )
        ctx.save_for_backward(g, u)
        ctx.shape = gate.shape
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout):
        g, u = ctx.saved_tensors
        do = _flat(dout)
        dg = empty(g.numel(), dtype=g.dtype, device=g.device)
        du = empty(u.numel(), dtype=u.dtype, device=u.device)
        if g.numel():
            _swiglu_bwd_kernel[(triton.cdiv(g.numel(), BLOCK),)](
                do, g, u, dg, du, g.numel(), BLOCK=BLOCK, num_warps=4
            )
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Triton path, same contract as :func:`swiglu_reference`."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")
    check_launchable(gate, up)
    return _SwiGLUFunction.apply(gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; Triton on CUDA tensors, the torch reference elsewhere (``LLMCTL_KERNELS``)."""
    return get_kernel(NAME, on_cuda=gate.is_cuda)(gate, up)


register_kernel(
    NAME,
    torch=swiglu_reference,
    triton=swiglu_triton if HAS_TRITON else None,
    reference="Shazeer 2020, https://arxiv.org/abs/2002.05202 (HF LlamaMLP act_fn(gate) * up)",
)

__all__ = ["swiglu", "swiglu_reference", "swiglu_triton"]
