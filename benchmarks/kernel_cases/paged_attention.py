"""Paged-attention decode (serve's per-step attention): KV bytes read per second vs the torch reference.

Full size: batch 64, 32 query heads over 8 KV heads, head_dim 128, context 2048 in blocks of 16 with
shuffled block ids, bf16 and int8 caches. The kernel is bound by reading the KV cache once.
"""

from __future__ import annotations

import torch

from benchmarks.kernel_cases import Case
from llmctl.kernels import paged_attention as pa


def _inputs(batch, heads_q, heads_kv, head_dim, context, block_size, dtype, int8, device):
    gen = torch.Generator().manual_seed(0)
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    block_tables = torch.randperm(num_blocks, generator=gen).reshape(batch, blocks_per_seq).to(torch.int32)
    shape = (num_blocks, block_size, heads_kv, head_dim)
    k = torch.randn(shape, generator=gen, dtype=torch.float32)
    v = torch.randn(shape, generator=gen, dtype=torch.float32)
    scales = {}
    if int8:
        k, ks = pa.quantize_kv_block_int8(k)
        v, vs = pa.quantize_kv_block_int8(v)
        scales = {"k_scales": ks.to(device), "v_scales": vs.to(device)}
    else:
        k, v = k.to(dtype), v.to(dtype)
    q = torch.randn(batch, heads_q, head_dim, generator=gen).to(dtype)
    lens = torch.full((batch,), context, dtype=torch.int32)
    return q.to(device), k.to(device), v.to(device), block_tables.to(device), lens.to(device), scales


def cases(device: str, quick: bool) -> list[Case]:
    if quick:
        shapes = [(2, 4, 2, 64, 40, 16)]
    else:
        shapes = [(64, 32, 8, 128, 2048, 16), (4, 32, 8, 128, 8192, 16)]
    out = []
    for batch, heads_q, heads_kv, head_dim, context, block_size in shapes:
        for int8 in (False, True):
            q, k, v, bt, lens, scales = _inputs(
                batch, heads_q, heads_kv, head_dim, context, block_size, torch.bfloat16, int8, device
            )
            kv_bytes = 2 * k.numel() * k.element_size()
            if int8:
                kv_bytes += 2 * scales["k_scales"].numel() * 4
            out.append(
                Case(
                    kernel="paged_decode int8" if int8 else "paged_decode",
                    shape=f"b={batch} hq={heads_q} hkv={heads_kv} d={head_dim} ctx={context} bs={block_size}",
                    run=lambda q=q, k=k, v=v, bt=bt, lens=lens, s=scales: pa.paged_decode_triton(
                        q, k, v, bt, lens, **s
                    ),
                    baseline=lambda q=q, k=k, v=v, bt=bt, lens=lens, s=scales: pa.paged_decode_reference(
                        q, k, v, bt, lens, **s
                    ),
                    baseline_name="torch reference",
                    bytes=float(kv_bytes + 2 * q.numel() * q.element_size()),
                    bound="memory",
                )
            )
    return out
