"""Exact attention, FlashAttention-2 style: forward and backward, causal or not, GQA/MQA, packed varlen.

Two layouts, one function::

    # q (batch, heads_q, seq_q, d), k/v (batch, heads_kv, seq_k, d)
    flash_attention(q, k, v, causal=True)
    # q (tokens, heads_q, d), k/v (tokens, heads_kv, d), cu_seqlens int32 (batch + 1,)
    flash_attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=n)

``heads_q`` must be a multiple of ``heads_kv`` (GQA; MQA when ``heads_kv == 1``): query head ``h`` reads
key/value head ``h // (heads_q // heads_kv)``, and the gradients of a key/value head are summed over its
group. Causal masking with ``seq_q != seq_k`` is aligned to the bottom right, as in flash-attn: query ``i``
sees keys ``j <= i + seq_k - seq_q``; a query row that sees no key at all outputs zeros. In the packed
layout ``cu_seqlens`` (int32, ``batch + 1`` offsets, first 0, last ``tokens``) delimits the examples, which
never attend across each other (queries and keys share the offsets).

The reference (:func:`attention_reference`) is the definition: ``softmax(q k^T * scale + mask) v`` in fp32,
GQA by ``repeat_interleave``, varlen by looping over segments, autograd for the backward.

The Triton path (Dao, "FlashAttention-2", 2023) never materialises the seq_q x seq_k matrix: each program
owns a block of query rows and streams key/value blocks through an online softmax in base 2 (scores are
pre-multiplied by ``scale * log2(e)``), keeping the row max and sum; it stores the output and the
log-sum-exp per row. With ``causal`` only key blocks at or below the diagonal are visited, and the mask is
applied only in the blocks that straddle it. The backward recomputes the probabilities tile by tile from
the saved log-sum-exp: one kernel per key block accumulates dK and dV (looping over the query heads of
its group, so no atomics), another per query block accumulates dQ, after a small kernel has formed
``delta = rowsum(dO * O)``. Head dims up to 128 are supported (tiles padded to a power of two and masked);
fp32 inputs use full-precision (not TF32) dots.
"""

from __future__ import annotations

import math

import torch

from llmctl.kernels._common import (
    HAS_TRITON,
    check_launchable,
    empty,
    interpreter_compat,
    interpreting,
    next_power_of_2,
    tl,
    triton,
)
from llmctl.kernels.dispatch import get_kernel, register_kernel

NAME = "attention"
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------
# Shape checks shared by both paths
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, cu_seqlens, max_seqlen) -> None:
    varlen = cu_seqlens is not None
    rank = 3 if varlen else 4
    layout = "(tokens, heads, head_dim)" if varlen else "(batch, heads, seq, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"attention: {name} must be {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: head_dim of q ({q.shape[-1]}) and k ({k.shape[-1]}) differ")
    heads_axis = 1
    hq, hk = q.shape[heads_axis], k.shape[heads_axis]
    if hk == 0 or hq % hk:
        raise ValueError(f"attention: query heads ({hq}) must be a multiple of key/value heads ({hk})")
    if varlen:
        if q.shape[0] != k.shape[0]:
            raise ValueError("attention: packed q and k/v must hold the same tokens (one cu_seqlens)")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("attention: cu_seqlens must be a 1-d tensor of batch + 1 offsets")
    elif q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ")


# ----------------------------------------------------------------------------------------------------------
# The torch reference
# ----------------------------------------------------------------------------------------------------------


def _dense_reference(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """(batch, heads, seq, d) attention in fp32, returned in fp32."""
    group = q.shape[1] // k.shape[1]
    qf = q.float()
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = qf @ kf.transpose(-1, -2) * scale
    seq_q, seq_k = q.shape[2], k.shape[2]
    if not causal:
        return torch.softmax(scores, dim=-1) @ vf
    # bottom-right aligned: query i sees keys j <= i + seq_k - seq_q
    allowed = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(diagonal=seq_k - seq_q)
    has_key = allowed.any(dim=-1, keepdim=True)  # rows that see no key output 0
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    probs = torch.softmax(scores, dim=-1) * has_key
    return probs @ vf


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` computed in fp32 (plain torch, autograd for the backward)."""
    _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        return _dense_reference(q, k, v, causal, scale).to(q.dtype)
    offsets = cu_seqlens.tolist()
    outs = []
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        seg = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, heads, len, d)
        outs.append(_dense_reference(*seg, causal, scale)[0].transpose(0, 1))
    return torch.cat(outs, dim=0).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _segment(CU, b, SEQ_Q, SEQ_K, VARLEN: tl.constexpr):
        """(first token, query length, key length) of batch entry ``b``."""
        if VARLEN:
            start = tl.load(CU + b)
            end = tl.load(CU + b + 1)
            return start.to(tl.int64), end - start, end - start
        else:
            return tl.full([], 0, tl.int64), SEQ_Q, SEQ_K

    @triton.jit
    def _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        offs_m,
        offs_d,
        lo,
        hi,
        seq_k,
        diag,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
        CAUSAL: tl.constexpr,
        DOT_PREC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Online softmax over key blocks [lo, hi): MASKED blocks straddle the diagonal or the end."""
        offs_n0 = tl.arange(0, BLOCK_N)
        d_ok = offs_d[None, :] < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
            v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
            if MASKED:
                kv_mask = (offs_n[:, None] < seq_k) & d_ok
                k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            elif BLOCK_D != HEAD_DIM:
                k = tl.load(k_ptrs, mask=d_ok, other=0.0)
            else:
                k = tl.load(k_ptrs)
            if UPCAST:
                k = k.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            if MASKED:
                keep = offs_n[None, :] < seq_k
                if CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
                qk = tl.where(keep, qk * qk_scale, float("-inf"))
                m_ij = tl.maximum(m_i, tl.max(qk, 1))
                qk = qk - m_ij[:, None]
            else:
                m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                qk = qk * qk_scale - m_ij[:, None]
            p = tl.math.exp2(qk)
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if MASKED:
                v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            elif BLOCK_D != HEAD_DIM:
                v = tl.load(v_ptrs, mask=d_ok, other=0.0)
            else:
                v = tl.load(v_ptrs)
            if UPCAST:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_ij
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(
        Q,
        K,
        V,
        Out,
        LSE,
        CU,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_ob,
        stride_oh,
        stride_om,
        stride_lb,
        stride_lh,
        H_Q,
        GROUP,
        SEQ_Q,
        SEQ_K,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        VARLEN: tl.constexpr,
        DOT_PREC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        pid_bh = tl.program_id(1)
        b = pid_bh // H_Q
        h = pid_bh % H_Q
        hk = h // GROUP
        tok0, seq_q, seq_k = _segment(CU, b, SEQ_Q, SEQ_K, VARLEN)
        if start_m >= seq_q:
            return
        b64 = b.to(tl.int64)
        tok64 = tok0
        q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + tok64 * stride_qm
        k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + tok64 * stride_kn
        v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + tok64 * stride_vn
        o_base = Out + b64 * stride_ob + h.to(tl.int64) * stride_oh + tok64 * stride_om
        l_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + tok64

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m[:, None] < seq_q
        d_ok = offs_d[None, :] < HEAD_DIM
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok & d_ok, other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong (Triton 3.6): fp32 there
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a fully masked row never makes NaN
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        diag = seq_k - seq_q  # query i sees keys j <= i + diag when causal
        if CAUSAL:
            hi = tl.minimum(seq_k, start_m + BLOCK_M + diag)
            # key blocks ending at or before the first row's last visible key need no mask
            first_visible_end = tl.maximum(start_m + diag + 1, 0)
            full_end = tl.minimum((first_visible_end // BLOCK_N) * BLOCK_N, (seq_k // BLOCK_N) * BLOCK_N)
            full_end = tl.maximum(tl.minimum(full_end, hi), 0)
        else:
            hi = seq_k
            full_end = (seq_k // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, 0, full_end, seq_k,
            diag, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, DOT_PREC, UPCAST,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, full_end, hi, seq_k,
            diag, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, DOT_PREC, UPCAST,
        )  # fmt: skip

        has_key = l_i > 0.0
        out = acc / tl.where(has_key, l_i, 1.0)[:, None]
        lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
        tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=row_ok & d_ok)  # fmt: skip
        tl.store(l_base + offs_m, lse, mask=offs_m < seq_q)

    @triton.jit
    def _attn_bwd_delta_kernel(
        Out,
        DO,
        DELTA,
        CU,
        stride_ob,
        stride_oh,
        stride_om,
        stride_db,
        stride_dh,
        stride_dm,
        stride_lb,
        stride_lh,
        H_Q,
        SEQ_Q,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        VARLEN: tl.constexpr,
    ):
        """delta = rowsum(dO * O) in fp32, laid out like the log-sum-exp."""
        start_m = tl.program_id(0) * BLOCK_M
        pid_bh = tl.program_id(1)
        b = pid_bh // H_Q
        h = pid_bh % H_Q
        tok0, seq_q, _ = _segment(CU, b, SEQ_Q, SEQ_Q, VARLEN)
        if start_m >= seq_q:
            return
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        tok64 = tok0
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
        o_ptrs = Out + b64 * stride_ob + h64 * stride_oh + tok64 * stride_om
        do_ptrs = DO + b64 * stride_db + h64 * stride_dh + tok64 * stride_dm
        o = tl.load(o_ptrs + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(do_ptrs + offs_m[:, None] * stride_dm + offs_d[None, :], mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + tok64 + offs_m, delta, mask=offs_m < seq_q)

    @triton.jit
    def _bwd_dkdv_inner(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        l_base,
        d_base,
        stride_qm,
        stride_dm,
        offs_n,
        offs_d,
        lo,
        hi,
        seq_q,
        diag,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        MASK_CAUSAL: tl.constexpr,
        DOT_PREC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Accumulate dK, dV of one key block over query blocks [lo, hi) of one query head (transposed)."""
        offs_m0 = tl.arange(0, BLOCK_M)
        d_ok = offs_d[None, :] < HEAD_DIM
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            m_ok = offs_m < seq_q
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=m_ok[:, None] & d_ok,
                        other=0.0)  # fmt: skip
            do = tl.load(do_base + offs_m[:, None] * stride_dm + offs_d[None, :], mask=m_ok[:, None] & d_ok,
                         other=0.0)  # fmt: skip
            lse = tl.load(l_base + offs_m, mask=m_ok, other=float("inf"))  # padding rows: p = 0
            delta = tl.load(d_base + offs_m, mask=m_ok, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
            if MASK_CAUSAL:
                p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, p_t, 0.0)
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DK,
        DV,
        CU,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_db,
        stride_dh,
        stride_dm,
        stride_dkb,
        stride_dkh,
        stride_dkn,
        stride_dvb,
        stride_dvh,
        stride_dvn,
        stride_lb,
        stride_lh,
        H_KV,
        GROUP,
        SEQ_Q,
        SEQ_K,
        qk_scale,
        softmax_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        VARLEN: tl.constexpr,
        DOT_PREC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        start_n = tl.program_id(0) * BLOCK_N
        pid_bh = tl.program_id(1)
        b = pid_bh // H_KV
        hk = pid_bh % H_KV
        tok0, seq_q, seq_k = _segment(CU, b, SEQ_Q, SEQ_K, VARLEN)
        if start_n >= seq_k:
            return
        b64 = b.to(tl.int64)
        hk64 = hk.to(tl.int64)
        tok64 = tok0
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
        k_base = K + b64 * stride_kb + hk64 * stride_kh + tok64 * stride_kn
        v_base = V + b64 * stride_vb + hk64 * stride_vh + tok64 * stride_vn
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

        diag = seq_k - seq_q
        if CAUSAL:
            # the first query that sees key start_n is start_n - diag; rows from q_full on see the whole block
            q_lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
            q_full = q_lo + tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag - q_lo, 0), BLOCK_M) * BLOCK_M
            q_full = tl.minimum(q_full, seq_q)
        else:
            q_lo = 0
            q_full = 0
        for g in range(0, GROUP):
            h64 = (hk * GROUP + g).to(tl.int64)
            q_base = Q + b64 * stride_qb + h64 * stride_qh + tok64 * stride_qm
            do_base = DO + b64 * stride_db + h64 * stride_dh + tok64 * stride_dm
            l_base = LSE + b64 * stride_lb + h64 * stride_lh + tok64
            d_base = DELTA + b64 * stride_lb + h64 * stride_lh + tok64
            if CAUSAL:
                dk, dv = _bwd_dkdv_inner(
                    dk, dv, k, v, q_base, do_base, l_base, d_base, stride_qm, stride_dm, offs_n, offs_d,
                    q_lo, q_full, seq_q, diag, qk_scale, HEAD_DIM, BLOCK_M, True, DOT_PREC, UPCAST,
                )  # fmt: skip
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, l_base, d_base, stride_qm, stride_dm, offs_n, offs_d,
                q_full, seq_q, seq_q, diag, qk_scale, HEAD_DIM, BLOCK_M, False, DOT_PREC, UPCAST,
            )  # fmt: skip
        dk = dk * softmax_scale
        dk_base = DK + b64 * stride_dkb + hk64 * stride_dkh + tok64 * stride_dkn
        dv_base = DV + b64 * stride_dvb + hk64 * stride_dvh + tok64 * stride_dvn
        tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=kv_mask)  # fmt: skip
        tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=kv_mask)  # fmt: skip

    @triton.jit
    def _bwd_dq_inner(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        offs_m,
        offs_d,
        lo,
        hi,
        seq_k,
        diag,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
        CAUSAL: tl.constexpr,
        DOT_PREC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        offs_n0 = tl.arange(0, BLOCK_N)
        d_ok = offs_d[None, :] < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            kv_mask = (offs_n[:, None] < seq_k) & d_ok
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
            if MASKED:
                keep = offs_n[None, :] < seq_k
                if CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
        return dq

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q,
        K,
        V,
        DO,
        LSE,
        DELTA,
        DQ,
        CU,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_db,
        stride_dh,
        stride_dm,
        stride_dqb,
        stride_dqh,
        stride_dqm,
        stride_lb,
        stride_lh,
        H_Q,
        GROUP,
        SEQ_Q,
        SEQ_K,
        qk_scale,
        softmax_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr,
        VARLEN: tl.constexpr,
        DOT_PREC: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        pid_bh = tl.program_id(1)
        b = pid_bh // H_Q
        h = pid_bh % H_Q
        hk = h // GROUP
        tok0, seq_q, seq_k = _segment(CU, b, SEQ_Q, SEQ_K, VARLEN)
        if start_m >= seq_q:
            return
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        hk64 = hk.to(tl.int64)
        tok64 = tok0
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < seq_q
        mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + tok64 * stride_qm + offs_m[:, None] * stride_qm
                    + offs_d[None, :], mask=mask, other=0.0)  # fmt: skip
        do = tl.load(DO + b64 * stride_db + h64 * stride_dh + tok64 * stride_dm + offs_m[:, None] * stride_dm
                     + offs_d[None, :], mask=mask, other=0.0)  # fmt: skip
        l_off = b64 * stride_lb + h64 * stride_lh + tok64 + offs_m
        lse = tl.load(LSE + l_off, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + l_off, mask=m_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        k_base = K + b64 * stride_kb + hk64 * stride_kh + tok64 * stride_kn
        v_base = V + b64 * stride_vb + hk64 * stride_vh + tok64 * stride_vn
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        diag = seq_k - seq_q
        if CAUSAL:
            hi = tl.minimum(seq_k, start_m + BLOCK_M + diag)
            first_visible_end = tl.maximum(start_m + diag + 1, 0)
            full_end = tl.minimum((first_visible_end // BLOCK_N) * BLOCK_N, (seq_k // BLOCK_N) * BLOCK_N)
            full_end = tl.maximum(tl.minimum(full_end, hi), 0)
        else:
            hi = seq_k
            full_end = (seq_k // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, 0, full_end, seq_k,
            diag, qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_PREC, UPCAST,
        )  # fmt: skip
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, full_end, hi, seq_k,
            diag, qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PREC, UPCAST,
        )  # fmt: skip
        dq = dq * softmax_scale
        tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + tok64 * stride_dqm + offs_m[:, None] * stride_dqm
                 + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mask)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _layout(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides; the packed layout has no batch stride (cu_seqlens gives the offset)."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _upcast(dtype: torch.dtype) -> bool:
    """The CPU interpreter's bf16 ``tl.dot`` is wrong in Triton 3.6: there bf16 tiles are upcast to fp32."""
    return dtype == torch.bfloat16 and interpreting()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 (or upcast) inputs: full-precision dots, not TF32; the setting is ignored for 16-bit inputs
    return "ieee" if dtype == torch.float32 or _upcast(dtype) else "tf32"


def _small_blocks() -> bool:
    return interpreting()  # the CPU interpreter: small tiles keep the tests fast


def _big_shared_memory(device: torch.device) -> bool:
    """At least 227 KiB of shared memory per block (H100/H200/B200); the 128x128 d=128 tiles need it."""
    if device.type != "cuda":
        return False
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) >= 227 * 1024


def _fwd_blocks(dtype: torch.dtype, block_d: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward.

    16-bit picks are the winners of a Triton autotuning run over 128x64 (8 and 4 warps) and 128x128 (8 warps),
    3 stages, on an H200 (batch 4, 32 heads, seq 4096, causal bf16): 128x128 with 8 warps at head dim 128 (its
    3-stage K/V ring needs ~224 KiB of shared memory, which only Hopper-class parts have: elsewhere 128x64),
    128x64 with 8 warps at head dim 64.
    """
    if _small_blocks():
        return 32, 16, 4, 1
    if dtype == torch.float32:
        return (64, 32, 4, 2) if block_d > 64 else (64, 64, 4, 2)
    if block_d > 64:
        return (128, 128, 8, 3) if _big_shared_memory(device) else (128, 64, 8, 3)
    return (128, 64, 8, 3) if block_d > 32 else (128, 64, 4, 3)


def _bwd_blocks(dtype: torch.dtype, block_d: int) -> tuple[int, int, int, int, int, int]:
    """(dkdv BLOCK_M, dkdv BLOCK_N, dq BLOCK_M, dq BLOCK_N, num_warps, num_stages)."""
    if _small_blocks():
        return 16, 32, 32, 16, 4, 1
    if dtype == torch.float32:
        return 32, 64, 64, 32, 4, 1
    if block_d > 64:  # dK and dV accumulators of 64 x 128 fp32 each stay in registers with 8 warps
        return 64, 64, 128, 32, 8, 2
    return 64, 64, 64, 64, 4, 2


class _Problem:
    """Sizes of one call, shared by forward and backward."""

    def __init__(self, q, k, cu_seqlens, max_seqlen):
        self.varlen = cu_seqlens is not None
        if self.varlen:
            self.batch = cu_seqlens.numel() - 1
            self.heads_q, self.heads_kv = q.shape[1], k.shape[1]
            self.seq_q = self.seq_k = int(max_seqlen)
            self.tokens = q.shape[0]
        else:
            self.batch, self.heads_q, self.seq_q = q.shape[0], q.shape[1], q.shape[2]
            self.heads_kv, self.seq_k = k.shape[1], k.shape[2]
        self.head_dim = q.shape[-1]
        self.block_d = max(16, next_power_of_2(self.head_dim))
        self.group = self.heads_q // self.heads_kv

    def lse_strides(self) -> tuple[int, int]:
        if self.varlen:
            return 0, self.tokens  # (heads_q, tokens)
        return self.heads_q * self.seq_q, self.seq_q  # (batch, heads_q, seq_q)

    def lse_shape(self) -> tuple[int, ...]:
        return (self.heads_q, self.tokens) if self.varlen else (self.batch, self.heads_q, self.seq_q)


def _forward(q, k, v, causal, scale, cu_seqlens, max_seqlen):
    pb = _Problem(q, k, cu_seqlens, max_seqlen)
    out = empty(*q.shape, dtype=q.dtype, device=q.device)
    lse = empty(*pb.lse_shape(), dtype=torch.float32, device=q.device)
    cu = cu_seqlens if pb.varlen else q  # a dummy pointer when unused
    args = (
        q, k, v, out, lse, cu,
        *_layout(q, pb.varlen), *_layout(k, pb.varlen), *_layout(v, pb.varlen), *_layout(out, pb.varlen),
        *pb.lse_strides(), pb.heads_q, pb.group, pb.seq_q, pb.seq_k, scale * LOG2E,
    )  # fmt: skip
    common = dict(
        HEAD_DIM=pb.head_dim,
        BLOCK_D=pb.block_d,
        CAUSAL=bool(causal),
        VARLEN=pb.varlen,
        DOT_PREC=_dot_precision(q.dtype),
        UPCAST=_upcast(q.dtype),
    )
    block_m, block_n, warps, stages = _fwd_blocks(q.dtype, pb.block_d, q.device)
    grid = (triton.cdiv(pb.seq_q, block_m), pb.batch * pb.heads_q)
    _attn_fwd_kernel[grid](
        *args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common
    )
    return out, lse


def _backward(do, q, k, v, out, lse, causal, scale, cu_seqlens, max_seqlen):
    pb = _Problem(q, k, cu_seqlens, max_seqlen)
    cu = cu_seqlens if pb.varlen else q
    dkv_m, dkv_n, dq_m, dq_n, warps, stages = _bwd_blocks(q.dtype, pb.block_d)
    delta = empty(*pb.lse_shape(), dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(pb.seq_q, 64), pb.batch * pb.heads_q)](
        out, do, delta, cu, *_layout(out, pb.varlen), *_layout(do, pb.varlen), *pb.lse_strides(),
        pb.heads_q, pb.seq_q, HEAD_DIM=pb.head_dim, BLOCK_D=pb.block_d, BLOCK_M=64, VARLEN=pb.varlen,
    )  # fmt: skip
    dq = empty(*q.shape, dtype=q.dtype, device=q.device)
    dk = empty(*k.shape, dtype=k.dtype, device=k.device)
    dv = empty(*v.shape, dtype=v.dtype, device=v.device)
    common = dict(
        HEAD_DIM=pb.head_dim,
        BLOCK_D=pb.block_d,
        CAUSAL=bool(causal),
        VARLEN=pb.varlen,
        DOT_PREC=_dot_precision(q.dtype),
        UPCAST=_upcast(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    _attn_bwd_dkdv_kernel[(triton.cdiv(pb.seq_k, dkv_n), pb.batch * pb.heads_kv)](
        q, k, v, do, lse, delta, dk, dv, cu,
        *_layout(q, pb.varlen), *_layout(k, pb.varlen), *_layout(v, pb.varlen), *_layout(do, pb.varlen),
        *_layout(dk, pb.varlen), *_layout(dv, pb.varlen), *pb.lse_strides(),
        pb.heads_kv, pb.group, pb.seq_q, pb.seq_k, scale * LOG2E, scale,
        BLOCK_M=dkv_m, BLOCK_N=dkv_n, **common,
    )  # fmt: skip
    _attn_bwd_dq_kernel[(triton.cdiv(pb.seq_q, dq_m), pb.batch * pb.heads_q)](
        q, k, v, do, lse, delta, dq, cu,
        *_layout(q, pb.varlen), *_layout(k, pb.varlen), *_layout(v, pb.varlen), *_layout(do, pb.varlen),
        *_layout(dq, pb.varlen), *pb.lse_strides(),
        pb.heads_q, pb.group, pb.seq_q, pb.seq_k, scale * LOG2E, scale,
        BLOCK_M=dq_m, BLOCK_N=dq_n, **common,
    )  # fmt: skip
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, cu_seqlens, max_seqlen):
        out, lse = _forward(q, k, v, causal, scale, cu_seqlens, max_seqlen)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.causal, ctx.scale, ctx.max_seqlen = causal, scale, max_seqlen
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        dq, dk, dv = _backward(do, q, k, v, out, lse, ctx.causal, ctx.scale, cu_seqlens, ctx.max_seqlen)
        return dq, dk, dv, None, None, None, None


def flash_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """The Triton path (CUDA, or CPU under ``TRITON_INTERPRET=1``); same contract as the reference."""
    _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported by the kernel")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    check_launchable(q, k, v)
    if interpreting():
        interpreter_compat()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return _FlashAttention.apply(q, k, v, bool(causal), float(scale), cu_seqlens, max_seqlen)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Exact (flash) attention; Triton on CUDA, the torch reference elsewhere (``LLMCTL_KERNELS`` forces).

    Batched: q (batch, heads_q, seq_q, d), k/v (batch, heads_kv, seq_k, d) -> (batch, heads_q, seq_q, d).
    Packed: q (tokens, heads_q, d), k/v (tokens, heads_kv, d), ``cu_seqlens`` int32 (batch + 1,) and
    ``max_seqlen`` (the longest segment; computed when omitted) -> (tokens, heads_q, d).
    ``softmax_scale`` defaults to ``1/sqrt(d)``.
    """
    fn = get_kernel(NAME, on_cuda=q.is_cuda)
    return fn(
        q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
    )


register_kernel(
    NAME,
    torch=attention_reference,
    triton=flash_attention_triton if HAS_TRITON else None,
    reference="Dao, FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning (2023)",
)
