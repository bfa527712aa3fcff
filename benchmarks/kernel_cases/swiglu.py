"""SwiGLU ``silu(gate) * up`` vs torch eager as Hugging Face's LlamaMLP computes it
(``F.silu(gate) * up`` in the model dtype): forward and backward, no goal in the issue.

Full size: 8192 tokens x intermediate 14336 (Llama-3-8B) bf16. Bytes: gate and up read, out written
(backward: dout, gate, up read, dgate and dup written).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.kernel_cases import Case
from llmctl.kernels.swiglu import swiglu_triton


def _grad_step(fn, inputs, dout):
    out = fn()
    return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        shapes, dtype = [(16, 96), (5, 1100)], torch.float32
    else:
        shapes, dtype = [(8192, 14336)], torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    out = []
    for tokens, inter in shapes:
        gate = torch.randn(tokens, inter, generator=gen).to(device=device, dtype=dtype)
        up = torch.randn(tokens, inter, generator=gen).to(device=device, dtype=dtype)
        act = gate.numel() * dtype.itemsize
        label = f"tokens={tokens} intermediate={inter} {str(dtype).removeprefix('torch.')}"
        out.append(
            Case(
                kernel="swiglu fwd",
                shape=label,
                run=lambda g=gate, u=up: swiglu_triton(g, u),
                baseline=lambda g=gate, u=up: F.silu(g) * u,
                baseline_name="torch eager (HF)",
                bytes=3 * act,
            )
        )
        gg, ug = gate.clone().requires_grad_(), up.clone().requires_grad_()
        dout = torch.randn(tokens, inter, generator=gen).to(device=device, dtype=dtype)
        out.append(
            Case(
                kernel="swiglu bwd",
                shape=label,
                run=_grad_step(lambda gg=gg, ug=ug: swiglu_triton(gg, ug), (gg, ug), dout),
                baseline=_grad_step(lambda gg=gg, ug=ug: F.silu(gg) * ug, (gg, ug), dout),
                baseline_name="torch eager (HF)",
                bytes=5 * act,
            )
        )
    return out
