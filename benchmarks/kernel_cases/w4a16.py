"""W4A16 dequantize-matmul (GPTQ layout, group 128, fp16) vs torch's fp16 matmul of the dense weight.

Full size: K = N = 4096 and K = 4096, N = 11008 (a Llama MLP up projection), M in {1, 16, 64, 256}.
Bytes counted: packed weight + scales + zeros + x + y. At M = 1 the kernel is bound by streaming the
packed weight: goal 70% of the measured copy bandwidth (issue #12).
"""

from __future__ import annotations

import torch

from benchmarks.kernel_cases import Case
from llmctl.kernels import w4a16 as wq


def _layer(k: int, n: int, device: str) -> wq.W4A16Linear:
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    return wq.W4A16Linear.from_float(linear, bits=4, group_size=128, sym=False, dtype=torch.float16).to(
        device
    )


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        shapes, batches = [(256, 128)], [1, 16]
    else:
        shapes, batches = [(4096, 4096), (4096, 11008)], [1, 16, 64, 256]
    out = []
    for k, n in shapes:
        layer = _layer(k, n, device)
        dense = layer.dequantize_weight().to(torch.float16).contiguous()  # [N, K] like nn.Linear
        quant_bytes = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.qzeros))
        for m in batches:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(torch.float16).to(device)
            args = (layer.qweight, layer.scales, layer.qzeros, None, None, 128, 4, 1)
            out.append(
                Case(
                    kernel="w4a16 gemv" if m == 1 else "w4a16 gemm",
                    shape=f"M={m} K={k} N={n} g128 fp16",
                    run=lambda x=x, args=args: wq.w4a16_triton(x, *args),
                    baseline=lambda x=x, w=dense: torch.nn.functional.linear(x, w),
                    baseline_name="torch fp16 dense",
                    bytes=float(quant_bytes + 2 * m * (k + n)),
                    flops=float(2 * m * k * n),
                    bound="memory",
                    goal=("roofline", 0.7) if m == 1 else None,
                )
            )
    return out
