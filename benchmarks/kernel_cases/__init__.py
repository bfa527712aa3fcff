"""Benchmark cases for ``benchmarks/kernels.py``: one module per kernel, each with ``cases(device, quick)``.

A module returns a list of :class:`Case`; the harness times ``run`` (llmctl's Triton path, inputs built
once) against ``baseline`` (torch eager, or SDPA's flash backend for attention), and reports achieved
GB/s or TFLOP/s, the ratio to the baseline, the fraction of the measured roofline and the case's goal.
Needs only torch and triton (the GPU machine has nothing else).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Case:
    kernel: str  # "rmsnorm fwd"
    shape: str  # "tokens=8192 hidden=4096 bf16"
    run: Callable[[], Any]  # llmctl's kernel on prepared inputs
    baseline: Callable[[], Any] | None = None  # the peer on the same inputs
    baseline_name: str = "torch eager"
    bytes: float = 0.0  # bytes the kernel must move (read + write): achieved GB/s = bytes / time
    flops: float = 0.0  # useful floating-point operations: achieved TFLOP/s = flops / time
    bound: str = (
        "memory"  # "memory" (roofline = measured copy bandwidth) or "compute" (= measured bf16 matmul)
    )
    # A goal, checked and printed by the harness:
    #   ("roofline", 0.8)   achieved >= 80% of the measured roofline
    #   ("speedup", 0.9)    baseline_time / run_time >= 0.9
    #   ("memory", 0.25)    peak memory of run <= 25% of the baseline's (measured with CUDA's allocator)
    goal: tuple[str, float] | None = None
    measure_memory: bool = False  # also report peak allocated memory of run and baseline
