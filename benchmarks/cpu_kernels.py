"""llmctl's CPU decode kernels vs torch on the same inputs: where the engine's decode step spends its time.

1. Every linear of SmolLM2-135M (or --quick: llama-tiny's shapes x 30) once, at 1 to 16 rows of input, by
   ``F.linear`` on row-major weights (nn.Linear's layout), ``F.linear`` on column-major weights (the layout
   the engine used for batch 1 before the kernel), and ``llmctl.core.generate.cpu_kernels.linear``; with the
   GB/s of weights read, against a plain ``sum`` over the same bytes (what the memory system gives).
2. RMSNorm and one decode step's attention (RoPE + cache write + masked GQA attention) at SmolLM2's sizes,
   torch reference vs kernel, in microseconds per call.
Medians over --repeats passes; no model is loaded (random weights of the real shapes).

    python benchmarks/cpu_kernels.py            # SmolLM2-135M shapes
    python benchmarks/cpu_kernels.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from llmctl.core.generate import cpu_kernels

# SmolLM2-135M: hidden 576, MLP 1536, 9 query / 3 kv heads of 64, 30 layers, vocabulary 49152
SMOLLM2 = dict(hidden=576, mlp=1536, heads=9, kv_heads=3, head_dim=64, layers=30, vocab=49152)
TINY = dict(hidden=64, mlp=128, heads=4, kv_heads=2, head_dim=16, layers=30, vocab=256)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def linear_shapes(c: dict) -> list[tuple[int, int]]:
    qkv = (c["heads"] + 2 * c["kv_heads"]) * c["head_dim"]
    per_layer = [(qkv, c["hidden"]), (c["hidden"], c["heads"] * c["head_dim"]), (2 * c["mlp"], c["hidden"]),
                 (c["hidden"], c["mlp"])]  # fmt: skip
    return per_layer * c["layers"] + [(c["vocab"], c["hidden"])]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("llmctl's CPU kernels are not available here (no AVX2 CPU or no C compiler)")
    c = TINY if args.quick else SMOLLM2
    repeats = 2 if args.quick else args.repeats
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=gen) * 0.05 for n, k in linear_shapes(c)]
    columns = [w.T.contiguous().T for w in weights]
    total_bytes = sum(w.numel() for w in weights) * 4
    sum_ms = median_ms(torch.randn(total_bytes // 4, generator=gen).sum, repeats)
    print(f"torch threads {torch.get_num_threads()}; weights {total_bytes / 1e6:.0f} MB")
    print(f"plain sum over the same bytes: {sum_ms:.1f} ms = {total_bytes / sum_ms / 1e6:.1f} GB/s")
    header = f"{'rows':>5}{'F.linear row-major':>20}{'F.linear col-major':>20}{'llmctl kernel':>15}"
    print(f"{header}{'GB/s':>7}{'speedup':>9}")
    for rows in (1, 2, 4, 5, 8, 16):
        xs = {k: torch.randn(rows, k, generator=gen) for k in {w.shape[1] for w in weights}}

        def run(fn, ws, xs=xs):
            return lambda: [fn(xs[w.shape[1]], w) for w in ws]

        row = median_ms(run(F.linear, weights), repeats)
        col = median_ms(run(F.linear, columns), repeats)
        ours = median_ms(run(cpu_kernels.linear, weights), repeats)
        best = min(row, col)
        print(f"{rows:>5}{row:>17.1f} ms{col:>17.1f} ms{ours:>12.1f} ms{total_bytes / ours / 1e6:>7.1f}"
              f"{best / ours:>8.2f}x")  # fmt: skip

    def per_call_us(fn, n=2000 if not args.quick else 200):
        fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n * 1e6

    x = torch.randn(1, 1, c["hidden"], generator=gen)
    w = torch.randn(c["hidden"], generator=gen)
    ref = per_call_us(lambda: cpu_kernels.rms_norm_reference(x, w, 1e-5))
    ours = per_call_us(lambda: cpu_kernels.rms_norm(x, w, 1e-5))
    print(f"RMSNorm, one token: torch {ref:.1f} us, kernel {ours:.1f} us ({ref / ours:.1f}x)")
    h, kv, d, ctx = c["heads"], c["kv_heads"], c["head_dim"], 128
    qkv = torch.randn(1, 1, (h + 2 * kv) * d, generator=gen)
    angles = torch.rand(1, 1, 1, d // 2, generator=gen)
    cos, nsin = torch.cat((angles.cos(),) * 2, -1), torch.cat((-angles.sin(), angles.sin()), -1)
    cache_k, cache_v = torch.randn(1, kv, 256, d, generator=gen), torch.randn(1, kv, 256, d, generator=gen)
    slots, mask = torch.tensor([ctx - 1]), torch.ones(1, 1, h // kv, ctx, dtype=torch.bool)
    call = (qkv, h, kv, cos, nsin, cache_k, cache_v, slots, mask, d**-0.5)
    ref = per_call_us(lambda: cpu_kernels.decode_attention_reference(*call))
    ours = per_call_us(lambda: cpu_kernels.decode_attention(*call))
    print(
        f"decode attention, {ctx} cached tokens: torch {ref:.1f} us, kernel {ours:.1f} us ({ref / ours:.1f}x)"
    )


if __name__ == "__main__":
    main()
