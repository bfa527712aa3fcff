"""Paged-attention decode: one query token per sequence attending over its KV cache stored in blocks.

The KV cache is a pool of fixed-size blocks (pages); each sequence owns a list of block ids, its row of
``block_tables``. Token ``t`` of sequence ``b`` lives in block ``block_tables[b, t // block_size]`` at
slot ``t % block_size`` (vLLM's PagedAttention, Kwon et al. 2023, https://arxiv.org/abs/2309.06180).
For every query head ``h`` (KV head ``h // (heads_q // heads_kv)``, grouped-query attention)::

    out[b, h] = softmax(scale * q[b, h] · K[b, :len_b, kv(h)]ᵀ) · V[b, :len_b, kv(h)]

Shapes::

    q             [batch, heads_q, head_dim]                      fp32 / fp16 / bf16
    k_cache       [num_blocks, block_size, heads_kv, head_dim]    q's dtype, or int8 with scales
    v_cache       [num_blocks, block_size, heads_kv, head_dim]
    k_scales      [num_blocks, heads_kv] float32 (int8 caches only; dequantized value = int8 * scale)
    v_scales      [num_blocks, heads_kv] float32
    block_tables  [batch, max_blocks_per_seq] int32
    context_lens  [batch] int32, each >= 1 (the query attends to positions 0 .. len-1)
    out           [batch, heads_q, head_dim] in q's dtype

The Triton kernel runs one program per (sequence, KV head) and handles the whole GQA group at once (the
group's query rows padded to 16 form the M side of ``tl.dot``), so each K/V element is read once per
group. It walks the sequence's tokens ``BLOCK_N`` at a time (gathering the block id of every token, so
any block size works) with an online softmax (FlashAttention-2). When there are few (sequence, KV head)
pairs for the GPU's SMs and contexts are long, the context is split in ``num_splits`` parts computed in
parallel, each writing a partial output and its log-sum-exp, and a second kernel merges them
(flash-decoding). int8 blocks are used as is in the dot products (int8 values are exact in fp16/bf16) and
the per-block scales multiply the scores (K) and the probabilities (V).
"""

from __future__ import annotations

import math

import torch

from llmctl.kernels._common import (
    HAS_TRITON,
    check_launchable,
    empty,
    interpreting,
    next_power_of_2,
    tl,
    triton,
)
from llmctl.kernels.dispatch import get_kernel, register_kernel

NAME = "paged_decode"
REFERENCE = "PagedAttention (vLLM), https://arxiv.org/abs/2309.06180; flash-decoding split-K"

__all__ = ["paged_decode", "paged_decode_reference", "paged_decode_triton", "quantize_kv_block_int8"]


# ----------------------------------------------------------------------------------------------------------
# Shapes and the int8 helper
# ----------------------------------------------------------------------------------------------------------


def _validate(q, k_cache, v_cache, block_tables, context_lens, k_scales, v_scales) -> None:
    """Clear errors for shapes and dtypes (no device sync: context_lens values are not read here)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, heads_q, head_dim], got shape {tuple(q.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q must be fp32, fp16 or bf16, got {q.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, heads_kv, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    batch, heads_q, head_dim = q.shape
    num_blocks, _, heads_kv, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the cache ({cache_dim}) differ")
    if heads_q % heads_kv:
        raise ValueError(f"heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv})")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if k_cache.dtype == torch.int8:
        if k_scales is None or v_scales is None:
            raise ValueError("int8 caches need k_scales and v_scales [num_blocks, heads_kv] (float32)")
        for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
            if tuple(s.shape) != (num_blocks, heads_kv):
                raise ValueError(f"{name} must be [num_blocks, heads_kv] = {(num_blocks, heads_kv)}")
    elif k_cache.dtype != q.dtype:
        raise ValueError(f"the cache dtype ({k_cache.dtype}) must be q's ({q.dtype}) or int8")
    elif k_scales is not None or v_scales is not None:
        raise ValueError("k_scales/v_scales are only for int8 caches")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [batch={batch}, max_blocks_per_seq]")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [batch={batch}], got {tuple(context_lens.shape)}")


def quantize_kv_block_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 for KV blocks, one scale per (block, head): ``x ≈ int8 * scale``.

    ``x`` is ``[..., block_size, heads_kv, head_dim]`` (one block or a whole pool); returns the int8
    tensor of the same shape and float32 scales ``[..., heads_kv]`` (``amax / 127``; 0 for an all-zero
    block, which dequantizes to zeros).
    """
    if x.dim() < 3:
        raise ValueError(f"expected [..., block_size, heads_kv, head_dim], got shape {tuple(x.shape)}")
    xf = x.float()
    scales = xf.abs().amax(dim=(-3, -1)) / 127.0  # [..., heads_kv]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(xf / safe.unsqueeze(-2).unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scales


def _dequantize(cache: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    if scales is None:
        return cache.float()
    return cache.float() * scales.float()[:, None, :, None]


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def paged_decode_reference(
    q, k_cache, v_cache, block_tables, context_lens, *, softmax_scale=None, k_scales=None, v_scales=None
) -> torch.Tensor:
    """Gather each sequence's tokens from its blocks, then plain softmax attention in fp32."""
    _validate(q, k_cache, v_cache, block_tables, context_lens, k_scales, v_scales)
    batch, heads_q, head_dim = q.shape
    _, block_size, heads_kv, _ = k_cache.shape
    group = heads_q // heads_kv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    lens = context_lens.tolist()
    capacity = block_tables.shape[1] * block_size
    for b, n in enumerate(lens):
        if not 1 <= n <= capacity:
            raise ValueError(
                f"context_lens[{b}] = {n}: each sequence needs 1 <= len <= max_blocks_per_seq * block_size "
                f"= {capacity}"
            )
    # Gather only the blocks the batch uses (never the whole cache), masked past each sequence's length.
    used = -(-max(lens) // block_size)
    ids = block_tables[:, :used].long().clamp(0, k_cache.shape[0] - 1)  # [batch, used]; unused slots masked
    k = _dequantize(k_cache[ids].flatten(0, 1), k_scales[ids].flatten(0, 1) if k_scales is not None else None)
    v = _dequantize(v_cache[ids].flatten(0, 1), v_scales[ids].flatten(0, 1) if v_scales is not None else None)
    k = k.reshape(batch, used * block_size, heads_kv, head_dim)  # [batch, len, heads_kv, head_dim]
    v = v.reshape(batch, used * block_size, heads_kv, head_dim)
    valid = (
        torch.arange(used * block_size, device=q.device)[None, :] < context_lens.to(q.device).long()[:, None]
    )
    qg = q.float().reshape(batch, heads_kv, group, head_dim)  # query heads grouped by their kv head
    scores = torch.einsum("bkgd,blkd->bkgl", qg, k) * scale  # [batch, heads_kv, group, len]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgl,blkd->bkgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(batch, heads_q, head_dim).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _paged_decode_tile(
        q, m_i, l_i, acc, t0, end, bt_row, k_ptr, v_ptr, ks_ptr, vs_ptr,
        pid_h, d, dmask, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_sb, qk_scale, block_size,
        BLOCK_N: tl.constexpr, QUANT: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """One online-softmax step over tokens t0 .. t0+BLOCK_N-1 (those >= end masked out)."""
        pos = t0 + tl.arange(0, BLOCK_N)
        tmask = pos < end
        block = tl.load(bt_row + pos // block_size, mask=tmask, other=0).to(tl.int64)  # physical block ids
        slot = (pos % block_size).to(tl.int64)
        kv_mask = tmask[:, None] & dmask[None, :]
        k_off = block[:, None] * stride_kb + slot[:, None] * stride_kt + pid_h * stride_kh + d[None, :]
        k = tl.load(k_ptr + k_off, mask=kv_mask, other=0).to(q.dtype)  # [BLOCK_N, D_PAD]
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [GROUP_PAD, BLOCK_N]
        else:
            s = tl.dot(q, tl.trans(k))
        if QUANT:
            k_sc = tl.load(ks_ptr + block * stride_sb + pid_h, mask=tmask, other=0.0)
            s = s * k_sc[None, :]
        s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile before any token
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_off = block[:, None] * stride_vb + slot[:, None] * stride_vt + pid_h * stride_vh + d[None, :]
        v = tl.load(v_ptr + v_off, mask=kv_mask, other=0).to(q.dtype)  # [BLOCK_N, D_PAD]
        if QUANT:
            v_sc = tl.load(vs_ptr + block * stride_sb + pid_h, mask=tmask, other=0.0)
            p = p * v_sc[None, :]
        if IEEE:
            pv = tl.dot(p.to(q.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(q.dtype), v)
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def _paged_decode_kernel(
        q_ptr,  # [batch, heads_q, head_dim], last dim contiguous
        k_ptr,  # [num_blocks, block_size, heads_kv, head_dim], last dim contiguous
        v_ptr,  # same layout as k
        ks_ptr,  # [num_blocks, heads_kv] float32 K scales (int8 only; else any pointer)
        vs_ptr,  # [num_blocks, heads_kv] float32 V scales
        bt_ptr,  # [batch, max_blocks_per_seq] int32 block ids
        lens_ptr,  # [batch] int32 context lengths
        out_ptr,  # [batch, heads_q, head_dim] final output (NUM_SPLITS == 1)
        po_ptr,  # [batch, heads_q, NUM_SPLITS, HEAD_DIM] float32 partial outputs (NUM_SPLITS > 1)
        plse_ptr,  # [batch, heads_q, NUM_SPLITS] float32 partial log2-sum-exp (NUM_SPLITS > 1)
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        stride_sb,
        stride_btb,
        stride_ob,
        stride_oh,
        qk_scale,  # softmax scale * log2(e): the softmax runs in base 2
        tokens_per_split,
        block_size,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        D_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        QUANT: tl.constexpr,
        IEEE: tl.constexpr,
        STATIC_LOOP: tl.constexpr,
        MAX_ITERS: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_h = tl.program_id(1)
        pid_s = tl.program_id(2)
        seq_len = tl.load(lens_ptr + pid_b)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D_PAD)
        gmask = g < GROUP
        dmask = d < HEAD_DIM
        heads = pid_h * GROUP + g  # the query heads of this KV head
        q_off = pid_b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_off, mask=gmask[:, None] & dmask[None, :], other=0.0)  # [GROUP_PAD, D_PAD]
        if UPCAST:  # the interpreter's tl.dot is wrong for bf16: compute in fp32 there
            q = q.to(tl.float32)

        start = pid_s * tokens_per_split
        end = tl.minimum(seq_len, start + tokens_per_split)
        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
        bt_row = bt_ptr + pid_b.to(tl.int64) * stride_btb
        if STATIC_LOOP:  # the CPU interpreter cannot take tensor loop bounds: a fixed trip count, masked
            for it in range(0, MAX_ITERS):
                m_i, l_i, acc = _paged_decode_tile(
                    q, m_i, l_i, acc, start + it * BLOCK_N, end, bt_row, k_ptr, v_ptr, ks_ptr, vs_ptr,
                    pid_h, d, dmask, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                    stride_sb, qk_scale, block_size, BLOCK_N, QUANT, IEEE,
                )  # fmt: skip
        else:
            for t0 in range(start, end, BLOCK_N):
                m_i, l_i, acc = _paged_decode_tile(
                    q, m_i, l_i, acc, t0, end, bt_row, k_ptr, v_ptr, ks_ptr, vs_ptr,
                    pid_h, d, dmask, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                    stride_sb, qk_scale, block_size, BLOCK_N, QUANT, IEEE,
                )  # fmt: skip

        # A split past the end of a short sequence saw no token: l = 0, write 0 and lse = -inf.
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        omask = gmask[:, None] & dmask[None, :]
        if NUM_SPLITS == 1:
            o_off = pid_b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
            tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            row = pid_b.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads  # [GROUP_PAD] index b*heads_q+h
            po_off = (row[:, None] * NUM_SPLITS + pid_s) * HEAD_DIM + d[None, :]
            tl.store(po_ptr + po_off, o, mask=omask)
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(plse_ptr + row * NUM_SPLITS + pid_s, lse, mask=gmask)

    @triton.jit
    def _paged_decode_reduce_kernel(
        po_ptr,  # [batch * heads_q, NUM_SPLITS, HEAD_DIM] float32 partial outputs
        plse_ptr,  # [batch * heads_q, NUM_SPLITS] float32 partial log2-sum-exp
        out_ptr,  # [batch, heads_q, head_dim]
        heads_q,
        stride_ob,
        stride_oh,
        HEAD_DIM: tl.constexpr,
        D_PAD: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        S_PAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # b * heads_q + h
        b = row // heads_q
        h = row % heads_q
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        smask = s < NUM_SPLITS
        dmask = d < HEAD_DIM
        lse = tl.load(plse_ptr + row * NUM_SPLITS + s, mask=smask, other=float("-inf"))  # [S_PAD]
        m = tl.max(lse, axis=0)  # finite: split 0 always holds token 0
        w = tl.where(smask, tl.exp2(lse - m), 0.0)
        po = tl.load(
            po_ptr + (row * NUM_SPLITS + s[:, None]) * HEAD_DIM + d[None, :],
            mask=smask[:, None] & dmask[None, :],
            other=0.0,
        )  # [S_PAD, D_PAD]
        o = tl.sum(po * w[:, None], axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=dmask)


_SM_COUNT: dict[int, int] = {}
SPLIT_WAVES = 2  # split until there are this many programs per SM


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _choose_splits(batch: int, heads_kv: int, max_tokens: int, block_n: int, device: torch.device) -> int:
    """Split long contexts when (sequence, KV head) programs alone would leave SMs idle."""
    if device.type != "cuda":
        return 1
    programs = batch * heads_kv
    target = SPLIT_WAVES * _sm_count(device)
    if programs >= target or max_tokens <= 4 * block_n:
        return 1
    return max(1, min(-(-target // programs), max_tokens // (2 * block_n), 32))


def paged_decode_triton(
    q,
    k_cache,
    v_cache,
    block_tables,
    context_lens,
    *,
    softmax_scale=None,
    k_scales=None,
    v_scales=None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """The Triton path. ``num_splits``/``block_n``/``num_warps``/``num_stages`` override the heuristics
    (tests and tuning use them).

    Context lengths are not read on the host (no device sync): a length of 0 gives a zero output row
    here, where the reference raises; lengths beyond the block table are the caller's bug.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    _validate(q, k_cache, v_cache, block_tables, context_lens, k_scales, v_scales)
    check_launchable(q, k_cache, v_cache, block_tables, context_lens)
    batch, heads_q, head_dim = q.shape
    _, block_size, heads_kv, _ = k_cache.shape
    group = heads_q // heads_kv
    q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    block_tables = block_tables.contiguous()
    context_lens = context_lens.contiguous()
    quant = k_cache.dtype == torch.int8
    if quant:
        k_scales = k_scales.float().contiguous()
        v_scales = v_scales.float().contiguous()
    else:
        k_scales = v_scales = context_lens  # unused pointers
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    d_pad = max(16, next_power_of_2(head_dim))
    group_pad = max(16, next_power_of_2(group))
    block_n = block_n or 64
    max_tokens = block_tables.shape[1] * block_size
    splits = num_splits or _choose_splits(batch, heads_kv, max_tokens, block_n, q.device)
    tokens_per_split = -(-max_tokens // splits)
    tokens_per_split = -(-tokens_per_split // block_n) * block_n
    splits = max(1, -(-max_tokens // tokens_per_split))

    upcast = interpreting() and q.dtype == torch.bfloat16
    out = empty(batch, heads_q, head_dim, dtype=q.dtype, device=q.device)
    if splits > 1:
        part_o = empty(batch * heads_q, splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = empty(batch * heads_q, splits, dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    _paged_decode_kernel[(batch, heads_kv, splits)](
        q,
        k_cache,
        v_cache,
        k_scales,
        v_scales,
        block_tables,
        context_lens,
        out,
        part_o,
        part_lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        k_scales.stride(0) if quant else 0,
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        scale * math.log2(math.e),
        tokens_per_split,
        block_size,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        BLOCK_N=block_n,
        NUM_SPLITS=splits,
        QUANT=quant,
        IEEE=q.dtype == torch.float32 or upcast,
        STATIC_LOOP=interpreting(),
        MAX_ITERS=tokens_per_split // block_n if interpreting() else 0,
        UPCAST=upcast,
        num_warps=num_warps or 4,
        **({"num_stages": num_stages} if num_stages else {}),
    )
    if splits > 1:
        _paged_decode_reduce_kernel[(batch * heads_q,)](
            part_o,
            part_lse,
            out,
            heads_q,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            D_PAD=d_pad,
            NUM_SPLITS=splits,
            S_PAD=next_power_of_2(splits),
            num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


def paged_decode(
    q, k_cache, v_cache, block_tables, context_lens, *, softmax_scale=None, k_scales=None, v_scales=None
) -> torch.Tensor:
    """Decode attention over a paged KV cache (see the module docstring for shapes); Triton on CUDA."""
    fn = get_kernel(NAME, on_cuda=q.is_cuda)
    return fn(
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        softmax_scale=softmax_scale,
        k_scales=k_scales,
        v_scales=v_scales,
    )


register_kernel(
    NAME,
    torch=paged_decode_reference,
    triton=paged_decode_triton if HAS_TRITON else None,
    reference=REFERENCE,
)
