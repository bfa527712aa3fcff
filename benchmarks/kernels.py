"""llmctl's Triton kernels vs torch eager / SDPA: time, GB/s or TFLOP/s, ratio, fraction of the roofline.

Needs only torch and triton (the GPU machine has nothing else installed), so it runs there as

    PYTHONPATH=. python benchmarks/kernels.py            # every kernel, full shapes, under 5 minutes
    PYTHONPATH=. python benchmarks/kernels.py --only rmsnorm,rope

The roofline is measured at start on this device: a device-to-device copy (bytes read + written) for
memory-bound kernels and an 8192^3 bf16 matmul for compute-bound ones. On a machine without CUDA
(``--quick``, as the test suite runs it) the cases shrink to tiny shapes under TRITON_INTERPRET=1, which
checks that the script works; CPU timings of the interpreter mean nothing and are labelled so.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported by the kernel modules

from benchmarks import kernel_cases  # noqa: E402


def _time_ms(fn, device: str, reps: int) -> float:
    """Median milliseconds of ``fn()``: CUDA events with the L2 flushed between runs on GPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _peak_bytes(fn, device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _copy_gbs(device: str) -> float:
    n = 1 << 28  # 512 MiB of bf16 per buffer
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, 0)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _matmul_tflops(device: str) -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    ms = _time_ms(lambda: a @ b, device, 0)
    return 2 * 8192**3 / ms / 1e9


def roofline(device: str) -> tuple[float, float]:
    """(copy GB/s counting bytes read + written, bf16 matmul TFLOP/s) measured here and now."""
    if device != "cuda":
        return float("nan"), float("nan")
    copy_gbs, tflops = _copy_gbs(device), _matmul_tflops(device)
    torch.cuda.empty_cache()
    return copy_gbs, tflops


def load_cases(only: set[str] | None):
    for info in sorted(pkgutil.iter_modules(kernel_cases.__path__), key=lambda m: m.name):
        if only and info.name not in only:
            continue
        yield info.name, importlib.import_module(f"benchmarks.kernel_cases.{info.name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU interpreter), seconds")
    parser.add_argument("--only", default="", help="comma-separated case modules (rmsnorm,rope,...)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions on the CPU")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device != "cuda"
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None

    import triton

    name = (
        torch.cuda.get_device_name() if device == "cuda" else "CPU (TRITON_INTERPRET=1: timings meaningless)"
    )
    print(f"# device: {name}; torch {torch.__version__}; triton {triton.__version__}; quick={quick}")
    copy_gbs, mm_tflops = roofline(device)
    print(f"# roofline: copy {copy_gbs:.0f} GB/s (read+write), bf16 matmul {mm_tflops:.0f} TFLOP/s")
    header = (
        f"{'kernel':<26} {'shape':<44} {'llmctl ms':>10} {'peer ms':>9} {'vs peer':>8} "
        f"{'achieved':>14} {'roofline':>8}  goal"
    )
    print(header)
    ratios, failures, missed = [], [], []
    started = time.perf_counter()
    for module_name, module in load_cases(only):
        try:
            cases = module.cases(device, quick)
        except Exception as exc:  # a broken case module must not hide the others' numbers
            failures.append(f"{module_name}: {type(exc).__name__}: {exc}")
            print(f"{module_name:<26} FAILED to build cases: {type(exc).__name__}: {exc}")
            continue
        for case in cases:
            try:
                ms = _time_ms(case.run, device, args.reps)
                peer_ms = _time_ms(case.baseline, device, args.reps) if case.baseline else float("nan")
                mem = peer_mem = None
                if case.measure_memory:
                    mem = _peak_bytes(case.run, device)
                    peer_mem = _peak_bytes(case.baseline, device) if case.baseline else None
            except Exception as exc:
                failures.append(f"{case.kernel} {case.shape}: {type(exc).__name__}: {exc}")
                print(f"{case.kernel:<26} {case.shape:<44} FAILED: {type(exc).__name__}: {exc}")
                continue
            speedup = peer_ms / ms if case.baseline else float("nan")
            if case.bound == "compute":
                achieved = case.flops / ms / 1e9
                unit, frac = "TFLOP/s", achieved / mm_tflops
            else:
                achieved = case.bytes / ms / 1e6
                unit, frac = "GB/s", achieved / copy_gbs
            goal_text = ""
            if case.goal:
                kind, target = case.goal
                if kind == "roofline":
                    value = frac
                elif kind == "speedup":
                    value = speedup
                else:
                    value = (mem / peer_mem) if mem is not None and peer_mem else float("nan")
                met = value >= target if kind != "memory" else value <= target
                verdict = "n/a (no GPU)" if device != "cuda" else ("met" if met else "NOT met")
                goal_text = f"{kind} {'<=' if kind == 'memory' else '>='} {target:g}: {value:.2f} {verdict}"
                if device == "cuda" and not met:
                    missed.append(f"{case.kernel} {case.shape}")
            if mem is not None:
                goal_text += f" [peak MiB {mem / 2**20:.0f} vs {(peer_mem or 0) / 2**20:.0f}]"
            if case.baseline:
                ratios.append(speedup)
            print(
                f"{case.kernel:<26} {case.shape:<44} {ms:>10.3f} {peer_ms:>9.3f} {speedup:>7.2f}x "
                f"{achieved:>9.1f} {unit:<7} {frac:>7.0%}  {goal_text}",
                flush=True,
            )
    elapsed = time.perf_counter() - started
    for failure in failures:
        print(f"# FAILED: {failure}")
    if missed:
        print(f"# goals not met: {'; '.join(missed)}")
    median = statistics.median(ratios) if ratios else float("nan")
    print(f"# {len(ratios)} cases in {elapsed:.0f}s; median speed vs peer: {median:.2f}x")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
