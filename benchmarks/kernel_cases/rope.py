"""RoPE on q and k vs torch eager as Hugging Face computes it (``q * cos + rotate_half(q) * sin`` in the
model dtype): forward (goal: 80% of the measured copy bandwidth) and backward.

Full size: 16384 tokens, q 32 heads x 128 and k 8 heads x 128 (Llama-3-8B's GQA), bf16, cos/sin tables
[tokens, 128] in bf16 as HF hands them over. Bytes: q and k read and written, the tables read.
"""

from __future__ import annotations

import torch

from benchmarks.kernel_cases import Case
from llmctl.kernels.rope import default_inv_freq, rope_cos_sin, rope_triton


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _hf_eager(q, k, cos, sin):
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _grad_step(fn, inputs, dq, dk):
    qo, ko = fn()
    return lambda: torch.autograd.grad((qo, ko), inputs, (dq, dk), retain_graph=True)


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        shapes, dtype = [(24, 4, 2, 32), (7, 3, 1, 24)], torch.float32
    else:
        shapes, dtype = [(16384, 32, 8, 128), (16384, 28, 4, 128)], torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    out = []
    for tokens, hq, hk, d in shapes:
        q = torch.randn(tokens, hq, d, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(tokens, hk, d, generator=gen).to(device=device, dtype=dtype)
        positions = torch.arange(tokens, device=device) % 4096
        cos, sin = rope_cos_sin(positions, default_inv_freq(d, 500000.0)[0].to(device), dtype=dtype)
        size = dtype.itemsize
        moved = 2 * (q.numel() + k.numel()) * size + 2 * cos.numel() * size
        label = f"tokens={tokens} q={hq}x{d} k={hk}x{d} {str(dtype).removeprefix('torch.')}"
        out.append(
            Case(
                kernel="rope fwd",
                shape=label,
                run=lambda q=q, k=k, cos=cos, sin=sin: rope_triton(q, k, cos, sin),
                baseline=lambda q=q, k=k, cos=cos, sin=sin: _hf_eager(q, k, cos, sin),
                baseline_name="torch eager (HF)",
                bytes=moved,
                goal=None if quick else ("roofline", 0.8),
            )
        )
        qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        out.append(
            Case(
                kernel="rope bwd",
                shape=label,
                run=_grad_step(lambda a=(qg, kg, cos, sin): rope_triton(*a), (qg, kg), dq, dk),
                baseline=_grad_step(lambda a=(qg, kg, cos, sin): _hf_eager(*a), (qg, kg), dq, dk),
                baseline_name="torch eager (HF)",
                bytes=moved,
            )
        )
    return out
