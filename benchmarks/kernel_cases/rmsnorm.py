"""RMSNorm (Llama convention) vs torch eager: forward, forward with the fused residual add, backward.

Full size: 16384 tokens x hidden 4096 bf16 (goal: 80% of the measured copy bandwidth for the forward
passes), and hidden 8192. Bytes count what must move: x (and residual) read, out (and new residual)
written, the weight once; the backward reads dy and x, writes dx (dweight's partial sums are small).
"""

from __future__ import annotations

import torch

from benchmarks.kernel_cases import Case
from llmctl.kernels.rmsnorm import rms_norm_reference, rms_norm_triton


def _grad_step(fn, inputs, dy):
    out = fn()
    out = out[0] if isinstance(out, tuple) else out
    return lambda: torch.autograd.grad(out, inputs, dy, retain_graph=True)


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        shapes, dtype = [(64, 96), (33, 130)], torch.float32
    else:
        shapes, dtype = [(16384, 4096), (8192, 8192)], torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    out = []
    for tokens, hidden in shapes:
        x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
        r = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
        w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device=device, dtype=dtype)
        size = dtype.itemsize
        act = tokens * hidden * size
        label = f"tokens={tokens} hidden={hidden} {str(dtype).removeprefix('torch.')}"
        goal = None if quick else ("roofline", 0.8)
        out.append(
            Case(
                kernel="rmsnorm fwd",
                shape=label,
                run=lambda x=x, w=w: rms_norm_triton(x, w, 1e-6),
                baseline=lambda x=x, w=w: rms_norm_reference(x, w, 1e-6),
                bytes=2 * act + hidden * size,
                goal=goal,
            )
        )
        out.append(
            Case(
                kernel="rmsnorm+residual fwd",
                shape=label,
                run=lambda x=x, w=w, r=r: rms_norm_triton(x, w, 1e-6, residual=r),
                baseline=lambda x=x, w=w, r=r: rms_norm_reference(x, w, 1e-6, residual=r),
                bytes=4 * act + hidden * size,
                goal=goal,
            )
        )
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        dy = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
        out.append(
            Case(
                kernel="rmsnorm bwd",
                shape=label,
                run=_grad_step(lambda xg=xg, wg=wg: rms_norm_triton(xg, wg, 1e-6), (xg, wg), dy),
                baseline=_grad_step(lambda xg=xg, wg=wg: rms_norm_reference(xg, wg, 1e-6), (xg, wg), dy),
                bytes=3 * act + 2 * hidden * size,
            )
        )
    return out
