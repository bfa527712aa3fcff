"""Fused linear + cross-entropy, forward and backward: time and peak memory vs the unfused torch path.

Full size: 8192 tokens, vocab 49152 (SmolLM2's), hidden 2048 and 576, bf16. The peer is
``F.cross_entropy(F.linear(h, W).float(), labels)`` and its backward; the goal is peak memory at most a
quarter of the peer's (the full [tokens, vocab] logits, their fp32 copy and gradients never exist here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.kernel_cases import Case
from llmctl.kernels import fused_linear_ce as flce


def _inputs(n, hidden, vocab, dtype, device):
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(n, hidden, generator=gen)).to(dtype).to(device).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(dtype).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::10] = -100
    return h, w, labels.to(device)


def cases(device: str, quick: bool) -> list[Case]:
    shapes = [(12, 16, 64, 6)] if quick else [(8192, 2048, 49152, None), (8192, 576, 49152, None)]
    out = []
    for n, hidden, vocab, chunk in shapes:
        h, w, labels = _inputs(
            n, hidden, vocab, torch.bfloat16 if device == "cuda" else torch.float32, device
        )

        def run(h=h, w=w, labels=labels, chunk=chunk):
            loss = flce.fused_linear_cross_entropy_triton(h, w, labels, chunk_size=chunk)
            return torch.autograd.grad(loss, (h, w))

        def baseline(h=h, w=w, labels=labels):
            loss = F.cross_entropy(F.linear(h, w).float(), labels)
            return torch.autograd.grad(loss, (h, w))

        out.append(
            Case(
                kernel="fused_linear_ce fwd+bwd",
                shape=f"tokens={n} hidden={hidden} vocab={vocab} {str(h.dtype).removeprefix('torch.')}",
                run=run,
                baseline=baseline,
                baseline_name="torch linear+cross_entropy",
                flops=6.0 * n * hidden * vocab,  # logits, grad_hidden, grad_weight matmuls
                bound="compute",
                goal=("memory", 0.25),
                measure_memory=True,
            )
        )
    return out
