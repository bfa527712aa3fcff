"""W4A16 dequantize-matmul: ``y = x @ dequant(W) + bias`` for group-wise 4-bit weights, fp16/bf16 activations.

    w[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]        g(k) = g_idx[k]  (default k // group_size)

q and z are unsigned ``bits``-bit integers, s is a per-group scale, K = in_features, N = out_features.
Accumulation is fp32 in the reference and in both Triton paths.

Anchors: GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323) and its checkpoint format as
AutoGPTQ/GPTQModel write it; AWQ (Lin et al. 2023, https://arxiv.org/abs/2306.00978) in AutoAWQ's GEMM
format; compressed-tensors ``pack-quantized`` (llm-compressor, vLLM); ExLlama/Marlin for the kernel ideas.

Checkpoint layouts (all int32 words, value ``i`` of a word in bits ``bits*i ..``; K = in, N = out):

- ``gptq`` (AutoGPTQ/GPTQModel ``checkpoint_format="gptq"``, v1, what transformers loads):
  ``qweight`` (K*bits/32, N) packed along K; ``qzeros`` (G, N*bits/32) packed along N holding ``zero - 1``
  (the v1 off-by-one: a zero of 0 cannot be stored); ``scales`` fp16 (G, N); ``g_idx`` int32 (K,).
  3-bit packs 32 values into 3 words as one little-endian 96-bit stream (values straddle words).
- ``gptq_v2`` (GPTQModel's internal format): the same, with the zeros stored as they are.
- ``awq`` (AutoAWQ ``WQLinear_GEMM``, 4-bit only): ``qweight`` (K, N/8) and ``qzeros`` (G, N/8) packed
  along N with the order map [0, 2, 4, 6, 1, 3, 5, 7] (value ``i`` of word ``c`` is column
  ``8c + order[i]``), no off-by-one; ``scales`` fp16 (G, N).
- ``compressed-tensors`` (``pack-quantized``; weights stored (out, in)): ``weight_packed`` (N, K*bits/32)
  packed along K, each value stored as ``q_signed + 2**(bits-1)``; ``weight_scale`` (N, G); optional
  ``weight_zero_point`` (N*bits/32, G) packed along N (dim 0), also offset by ``2**(bits-1)``; optional
  ``weight_g_idx`` (K,). In the unsigned convention used here that offset is exactly q and z, and a
  symmetric checkpoint (no zero point) has z = 2**(bits-1).

The Triton kernels read the GPTQ layout natively (``qweight`` packed along K, ``qzeros`` packed along N in
natural order) plus a ``zero_offset`` (1 for v1, 0 otherwise). AWQ and compressed-tensors tensors are
repacked once to that layout by :func:`to_kernel_layout` (``W4A16Linear.from_awq`` /
``from_compressed_tensors`` do it at load; :func:`w4a16_matmul` with ``layout="awq"`` repacks per call).

Two Triton paths: a GEMV (M == 1: no tensor cores, K split over programs so that batch-1 decode streams the
packed weights with many loads in flight; per-group ``s * (x·q - z * Σx)`` so the inner loop is a
multiply-add) and a tiled GEMM (tl.dot on dequantized [BLOCK_K, BLOCK_N] tiles, split-K when the
output tiles alone would not fill the GPU). With ``g_idx`` (act-order) the scale and zero of every row are
gathered. Only 4-bit has Triton paths; 2/3/8-bit GPTQ and 8-bit compressed-tensors run the reference.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from llmctl.kernels._common import HAS_TRITON, check_launchable, empty, interpreting, tl, triton
from llmctl.kernels.dispatch import get_kernel, register_kernel

NAME = "w4a16_matmul"
LAYOUTS = ("gptq", "gptq_v2", "awq", "compressed-tensors")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # value i of an AWQ word holds column 8c + AWQ_ORDER[i]
GEMV_MAX_M = 1
# Launch configurations (picked by hand; the benchmark probe on an H100 chose them). GEMV:
# (BLOCK_N, preferred BLOCK_K, num_warps, programs per SM to reach by splitting K). GEMM rows:
# (max M, BLOCK_M, BLOCK_N, preferred BLOCK_K, num_warps, num_stages, programs per SM).
GEMV_CONFIG = (128, 128, 4, 4)
GEMV_KIND = "3d"  # "2d": [BLOCK_K, BLOCK_N] tiles; "3d": [BLOCK_K/8, 8, BLOCK_N] tiles
GEMM_CONFIGS = [
    (16, 16, 64, 128, 4, 4, 0),
    (32, 32, 64, 128, 4, 4, 1),
    (64, 64, 128, 64, 8, 3, 1),
    (1 << 62, 128, 128, 64, 8, 3, 2),
]


# ---------------------------------------------------------------------------------------------------------
# Bit packing (vectorised): values along one dim -> a little-endian bit stream of int32 words
# ---------------------------------------------------------------------------------------------------------


def _block(bits: int) -> tuple[int, int]:
    """(values, words) per packing block: 32/bits values in one word, or 32 values in 3 words for 3-bit."""
    if bits in (2, 4, 8):
        return 32 // bits, 1
    if bits == 3:
        return 32, 3
    raise ValueError(f"bits={bits}: expected 2, 3, 4 or 8")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers along ``dim`` into int32 words (value j at bit ``bits*j``)."""
    per, nwords = _block(bits)
    v = values.movedim(dim, 0).to(torch.int64)
    if v.shape[0] % per:
        raise ValueError(f"cannot pack {v.shape[0]} values of {bits} bits: need a multiple of {per}")
    if v.numel() and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing: [{int(v.min())}, {int(v.max())}]")
    rest = v.shape[1:]
    v = v.reshape(v.shape[0] // per, per, *rest)
    out = torch.zeros(v.shape[0], nwords, *rest, dtype=torch.int64, device=v.device)
    for j in range(per):
        pos = bits * j
        word, off = divmod(pos, 32)
        out[:, word] |= v[:, j] << off
        if off + bits > 32:  # 3-bit values straddle two words
            out[:, word + 1] |= v[:, j] >> (32 - off)
    out = out.reshape(-1, *rest)
    return _to_int32(out).movedim(0, dim).contiguous()


def unpack_int(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_int`: int32 words along ``dim`` -> unsigned int32 values."""
    per, nwords = _block(bits)
    w = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    if w.shape[0] % nwords:
        raise ValueError(f"{w.shape[0]} packed words along dim {dim}: need a multiple of {nwords}")
    rest = w.shape[1:]
    w = w.reshape(w.shape[0] // nwords, nwords, *rest)
    mask = (1 << bits) - 1
    vals = []
    for j in range(per):
        pos = bits * j
        word, off = divmod(pos, 32)
        v = w[:, word] >> off
        if off + bits > 32:
            v = v | (w[:, word + 1] << (32 - off))
        vals.append(v & mask)
    out = torch.stack(vals, dim=1).reshape(-1, *rest)
    return out.to(torch.int32).movedim(0, dim).contiguous()


# ---------------------------------------------------------------------------------------------------------
# Layout helpers. Every pack_* takes the same logical tensors: q [K, N] and zeros [G, N] unsigned
# (w = (q - z) * s), scales [G, N], optional g_idx [K]; every unpack_* returns them.
# ---------------------------------------------------------------------------------------------------------


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    gs = in_features if group_size in (-1, 0, None) else group_size
    return torch.arange(in_features, dtype=torch.int32, device=device) // gs


def pack_gptq(q, zeros, scales, g_idx=None, *, bits: int = 4, group_size: int = 128, v1: bool = True):
    """(qweight [K*bits/32, N], qzeros [G, N*bits/32], scales fp16 [G, N], g_idx int32 [K]) in GPTQ layout.

    ``v1=True`` (checkpoint_format "gptq", what transformers/AutoGPTQ load) stores ``zeros - 1``; a zero
    of 0 cannot be represented there and raises (clamp zeros to >= 1 or write v2).
    """
    if v1:
        if zeros.numel() and int(zeros.min()) < 1:
            raise ValueError("GPTQ v1 stores zero-1 and cannot hold a zero point of 0; clamp zeros to >= 1")
        zeros = zeros - 1
    if g_idx is None:
        g_idx = default_g_idx(q.shape[0], group_size, q.device)
    qweight = pack_int(q, bits, dim=0)
    qzeros = pack_int(zeros, bits, dim=1)
    return qweight, qzeros, scales.to(torch.float16).contiguous(), g_idx.to(torch.int32).contiguous()


def unpack_gptq(
    qweight, qzeros, scales, g_idx=None, *, bits: int = 4, group_size: int = 128, v1: bool = True
):
    """(q [K, N], zeros [G, N], scales, g_idx) from GPTQ tensors; v1 adds the stored zero's +1 back."""
    q = unpack_int(qweight, bits, dim=0)
    zeros = unpack_int(qzeros, bits, dim=1) + (1 if v1 else 0)
    if g_idx is None:
        g_idx = default_g_idx(q.shape[0], group_size, q.device)
    return q, zeros, scales, g_idx


def pack_awq(q, zeros, scales):
    """AutoAWQ GEMM layout (4-bit): (qweight [K, N/8], qzeros [G, N/8], scales fp16 [G, N])."""
    order = torch.tensor(AWQ_ORDER, device=q.device)

    def interleave(t):  # column 8c + order[i] -> slot 8c + i
        return t.reshape(t.shape[0], -1, 8)[:, :, order].reshape(t.shape)

    return (
        pack_int(interleave(q), 4, dim=1),
        pack_int(interleave(zeros), 4, dim=1),
        scales.to(torch.float16).contiguous(),
    )


def unpack_awq(qweight, qzeros, scales):
    """(q [K, N], zeros [G, N], scales) from AutoAWQ GEMM tensors."""
    inverse = torch.argsort(torch.tensor(AWQ_ORDER, device=qweight.device))

    def deinterleave(t):
        return t.reshape(t.shape[0], -1, 8)[:, :, inverse].reshape(t.shape)

    return deinterleave(unpack_int(qweight, 4, dim=1)), deinterleave(unpack_int(qzeros, 4, dim=1)), scales


def pack_compressed_tensors(q, scales, zeros=None, g_idx=None, *, bits: int = 4) -> dict:
    """compressed-tensors ``pack-quantized`` tensors of one Linear (weights stored [out, in]).

    q/zeros are unsigned (= the signed value + 2**(bits-1), which is how the format stores them);
    ``zeros=None`` means symmetric (no ``weight_zero_point``, z = 2**(bits-1)).
    """
    if 32 % bits:
        raise ValueError(f"compressed-tensors pack-quantized: bits={bits} must divide 32 here")
    out = {
        "weight_packed": pack_int(q.t(), bits, dim=1),
        "weight_scale": scales.t().contiguous(),
        "weight_shape": torch.tensor([q.shape[1], q.shape[0]], dtype=torch.int64),
    }
    if zeros is not None:
        out["weight_zero_point"] = pack_int(zeros.t(), bits, dim=0)
    if g_idx is not None:
        out["weight_g_idx"] = g_idx.to(torch.int32).contiguous()
    return out


def unpack_compressed_tensors(tensors: dict, *, bits: int = 4):
    """(q [K, N], zeros [G, N] (None if symmetric), scales [G, N], g_idx or None) from pack-quantized."""
    q = unpack_int(tensors["weight_packed"], bits, dim=1).t().contiguous()
    if "weight_shape" in tensors:
        n, k = (int(v) for v in tensors["weight_shape"])
        q = q[:k, :n]
    zp = tensors.get("weight_zero_point")
    zeros = None if zp is None else unpack_int(zp, bits, dim=0).t().contiguous()[:, : q.shape[1]]
    return q, zeros, tensors["weight_scale"].t().contiguous(), tensors.get("weight_g_idx")


def to_kernel_layout(layout: str, qweight, scales, qzeros=None, g_idx=None, *, bits: int = 4):
    """Repack a checkpoint's tensors once into what the kernels read natively.

    Returns ``(qweight [K*bits/32, N], scales [G, N], qzeros [G, N*bits/32] or None, g_idx or None,
    zero_offset)``. ``gptq``/``gptq_v2`` pass through. For ``compressed-tensors`` pass ``weight_packed``,
    ``weight_scale``, ``weight_zero_point`` as qweight/scales/qzeros: its repack is two transposes (its
    stored values are already the unsigned q and z).
    """
    if layout == "gptq":
        return qweight, scales, qzeros, g_idx, 1
    if layout == "gptq_v2":
        return qweight, scales, qzeros, g_idx, 0
    if layout == "awq":
        if bits != 4:
            raise ValueError("AWQ GEMM format is 4-bit only")
        q, zeros, scales = unpack_awq(qweight, qzeros, scales)
        return pack_int(q, 4, dim=0), scales.contiguous(), pack_int(zeros, 4, dim=1), g_idx, 0
    if layout == "compressed-tensors":
        if bits == 3:
            raise ValueError("compressed-tensors packs 32//bits values per word; 3-bit is not supported")
        qzeros = None if qzeros is None else qzeros.t().contiguous()
        return qweight.t().contiguous(), scales.t().contiguous(), qzeros, g_idx, 0
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def dequantize(qweight, scales, qzeros, g_idx=None, *, bits=4, group_size=128, zero_offset=1):
    """Dense fp32 weight [K, N] from kernel-layout tensors (the reference's first half)."""
    q = unpack_int(qweight, bits, dim=0).float()  # [K, N]
    k, n = q.shape
    if g_idx is None:
        g_idx = default_g_idx(k, group_size, q.device)
    g = g_idx.long()
    if qzeros is None:
        z = torch.full((1, n), float(2 ** (bits - 1)), device=q.device)
        z = z.expand(scales.shape[0], n)
    else:
        z = (unpack_int(qzeros, bits, dim=1)[:, :n] + zero_offset).float()
    return (q - z[g]) * scales.float()[g]


def quantize_rtn(weight: torch.Tensor, *, bits: int = 4, group_size: int = 128, sym: bool = True):
    """Round-to-nearest group quantization of a Linear weight [N, K] (GPTQ reference's min/max rule).

    Returns (q [K, N], zeros [G, N], scales fp16 [G, N]) with w ≈ (q - z) * s; scales are rounded to fp16
    before q is computed so that dequantizing the stored tensors reproduces exactly what was rounded.
    """
    n, k = weight.shape
    gs = k if group_size in (-1, 0, None) else group_size
    if k % gs:
        raise ValueError(f"group size {gs} does not divide in_features {k}")
    maxq = 2**bits - 1
    w = weight.detach().float().t().reshape(k // gs, gs, n)  # [G, gs, N]
    xmin = w.amin(dim=1).clamp(max=0)
    xmax = w.amax(dim=1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    dead = xmax == xmin
    xmin, xmax = torch.where(dead, -1.0, xmin), torch.where(dead, 1.0, xmax)
    scales = ((xmax - xmin) / maxq).to(torch.float16)
    if sym:
        zeros = torch.full_like(scales, (maxq + 1) // 2, dtype=torch.int32)
    else:
        zeros = torch.round(-xmin / scales.float()).clamp(0, maxq).to(torch.int32)
    q = torch.clamp(torch.round(w / scales.float()[:, None]) + zeros[:, None], 0, maxq).to(torch.int32)
    return q.reshape(k, n), zeros, scales


# ---------------------------------------------------------------------------------------------------------
# The torch reference: unpack -> dequantize (fp32) -> matmul (fp32) -> + bias -> cast
# ---------------------------------------------------------------------------------------------------------


def w4a16_reference(x, qweight, scales, qzeros, g_idx, bias, group_size, bits, zero_offset):
    """x [..., K] -> [..., N]; autograd flows to x (and bias)."""
    w = dequantize(qweight, scales, qzeros, g_idx, bits=bits, group_size=group_size, zero_offset=zero_offset)
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _w4a16_gemv_kernel(
        x_ptr,  # [M, K] activations, contiguous
        qw_ptr,  # [K // 8, N] int32: 8 4-bit rows per word, row k in bits 4*(k % 8)
        s_ptr,  # [G, N] scales
        z_ptr,  # [G, N // 8] int32 packed zeros (unused without HAS_ZEROS)
        g_ptr,  # [K] int32 group of each input row (unused without HAS_GIDX)
        b_ptr,  # [N] bias (unused without HAS_BIAS)
        y_ptr,  # [M, N] output, or [SPLIT, M, N] fp32 partial sums when WRITE_PARTIAL
        M,
        N,
        K,
        group_size,
        ZERO_OFFSET: tl.constexpr,
        HAS_ZEROS: tl.constexpr,
        HAS_GIDX: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        WRITE_PARTIAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        TILES: tl.constexpr,  # K tiles per program (split-K share)
    ):
        """One program: BLOCK_N outputs of row m over its share of K. Weights unpacked as [BLOCK_K/8, 8, BN]
        so no reshape is needed; with one group per tile, acc += s * (Σ x q - z Σ x)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        PK: tl.constexpr = BLOCK_K // 8
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_r = tl.arange(0, PK)
        offs_j = tl.arange(0, 8)
        shifts = offs_j * 4
        zshift = (offs_n % 8) * 4
        k_rows = K // 8
        x_row = x_ptr + pid_m.to(tl.int64) * K
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for t in range(0, TILES):
            k0 = (pid_k * TILES + t) * BLOCK_K
            rows = k0 // 8 + offs_r  # [PK]
            w_ptrs = qw_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :]
            packed = tl.load(w_ptrs, mask=(rows < k_rows)[:, None] & n_mask[None, :], other=0)  # [PK, BN]
            q = ((packed[:, None, :] >> shifts[None, :, None]) & 0xF).to(tl.float32)  # [PK, 8, BN]
            k_idx = k0 + offs_r[:, None] * 8 + offs_j[None, :]  # [PK, 8]
            k_mask = k_idx < K
            xv = tl.load(x_row + k_idx, mask=k_mask, other=0.0).to(tl.float32)  # [PK, 8]
            if HAS_GIDX:
                g = tl.load(g_ptr + k_idx, mask=k_mask, other=0).to(tl.int64)[:, :, None]  # [PK, 8, 1]
                m3 = k_mask[:, :, None] & n_mask[None, None, :]
                s = tl.load(s_ptr + g * N + offs_n[None, None, :], mask=m3, other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    zp = tl.load(z_ptr + g * (N // 8) + (offs_n // 8)[None, None, :], mask=m3, other=0)
                    z = ((zp >> zshift[None, None, :]) & 0xF).to(tl.float32) + ZERO_OFFSET
                else:
                    z = 8.0
                w = (q - z) * s
                acc += tl.sum(tl.sum(xv[:, :, None] * w, axis=1), axis=0)
            else:
                g = k0 // group_size  # the whole tile lies in one group (host guarantees it)
                gm = n_mask & (k0 < K)
                s = tl.load(s_ptr + g.to(tl.int64) * N + offs_n, mask=gm, other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    zp = tl.load(z_ptr + g.to(tl.int64) * (N // 8) + offs_n // 8, mask=gm, other=0)
                    z = ((zp >> zshift) & 0xF).to(tl.float32) + ZERO_OFFSET
                else:
                    z = 8.0
                dot = tl.sum(tl.sum(xv[:, :, None] * q, axis=1), axis=0)  # [BN]
                xsum = tl.sum(tl.sum(xv, axis=1), axis=0)
                acc += s * (dot - z * xsum)
        if WRITE_PARTIAL:
            out_ptrs = y_ptr + (pid_k.to(tl.int64) * M + pid_m) * N + offs_n
            tl.store(out_ptrs, acc, mask=n_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + pid_m.to(tl.int64) * N + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _w4a16_gemv2d_kernel(
        x_ptr,  # [M, K] activations, contiguous
        qw_ptr,  # [K // 8, N] int32 packed weights (GPTQ layout)
        s_ptr,  # [G, N] scales
        z_ptr,  # [G, N // 8] int32 packed zeros
        g_ptr,  # [K] int32 group index per input row
        b_ptr,  # [N] bias
        y_ptr,  # [M, N] output, or [SPLIT, M, N] fp32 partials
        M,
        N,
        K,
        group_size,
        ZERO_OFFSET: tl.constexpr,
        HAS_ZEROS: tl.constexpr,
        HAS_GIDX: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        WRITE_PARTIAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        TILES: tl.constexpr,
    ):
        """GEMV on [BLOCK_K, BLOCK_N] tiles: elementwise fp32 accumulation, one reduction over K at the end
        (no cross-thread reduction in the loop). Each packed word is read by its 8 rows (L1 hits)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        zshift = (offs_n % 8) * 4
        x_row = x_ptr + pid_m.to(tl.int64) * K
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for t in range(0, TILES):
            k0 = (pid_k * TILES + t) * BLOCK_K
            k_idx = k0 + offs_k
            k_mask = k_idx < K
            kn_mask = k_mask[:, None] & n_mask[None, :]
            packed = tl.load(
                qw_ptr + (k_idx // 8).to(tl.int64)[:, None] * N + offs_n[None, :], mask=kn_mask, other=0
            )
            q = ((packed >> ((k_idx % 8) * 4)[:, None]) & 0xF).to(tl.float32)  # [BK, BN]
            xv = tl.load(x_row + k_idx, mask=k_mask, other=0.0).to(tl.float32)[:, None]  # [BK, 1]
            if HAS_GIDX:
                g = tl.load(g_ptr + k_idx, mask=k_mask, other=0).to(tl.int64)[:, None]
                s = tl.load(s_ptr + g * N + offs_n[None, :], mask=kn_mask, other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    zp = tl.load(z_ptr + g * (N // 8) + (offs_n // 8)[None, :], mask=kn_mask, other=0)
                    z = ((zp >> zshift[None, :]) & 0xF).to(tl.float32) + ZERO_OFFSET
                else:
                    z = 8.0
            else:
                g = (k0 // group_size).to(tl.int64)
                gm = n_mask & (k0 < K)
                s = tl.load(s_ptr + g * N + offs_n, mask=gm, other=0.0).to(tl.float32)[None, :]
                if HAS_ZEROS:
                    zp = tl.load(z_ptr + g * (N // 8) + offs_n // 8, mask=gm, other=0)
                    z = ((zp >> zshift) & 0xF).to(tl.float32)[None, :] + ZERO_OFFSET
                else:
                    z = 8.0
            acc += xv * ((q - z) * s)
        out = tl.sum(acc, axis=0)  # [BN]
        if WRITE_PARTIAL:
            tl.store(y_ptr + (pid_k.to(tl.int64) * M + pid_m) * N + offs_n, out, mask=n_mask)
        else:
            if HAS_BIAS:
                out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + pid_m.to(tl.int64) * N + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit
    def _w4a16_gemm_kernel(
        x_ptr,  # [M, K] activations, contiguous
        qw_ptr,  # [K // 8, N] int32 packed weights (GPTQ layout)
        s_ptr,  # [G, N] scales
        z_ptr,  # [G, N // 8] int32 packed zeros
        g_ptr,  # [K] int32 group index per input row
        b_ptr,  # [N] bias
        y_ptr,  # [M, N] output, or [SPLIT, M, N] fp32 partials
        M,
        N,
        K,
        group_size,
        ZERO_OFFSET: tl.constexpr,
        HAS_ZEROS: tl.constexpr,
        HAS_GIDX: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        WRITE_PARTIAL: tl.constexpr,
        DOT_IEEE: tl.constexpr,
        UPCAST: tl.constexpr,  # bf16 tl.dot is wrong in Triton 3.6's CPU interpreter: fp32 there
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        TILES: tl.constexpr,  # K tiles per program (split-K share)
    ):
        """One program: a [BLOCK_M, BLOCK_N] output tile over its share of K, tl.dot on dequantized
        [BLOCK_K, BLOCK_N] tiles (each packed word is read by its 8 rows; the repeats hit L1)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        zshift = (offs_n % 8) * 4
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(0, TILES):
            k0 = (pid_k * TILES + t) * BLOCK_K
            k_idx = k0 + offs_k
            k_mask = k_idx < K
            a = tl.load(
                x_ptr + offs_m.to(tl.int64)[:, None] * K + k_idx[None, :],
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
            kn_mask = k_mask[:, None] & n_mask[None, :]
            packed = tl.load(
                qw_ptr + (k_idx // 8).to(tl.int64)[:, None] * N + offs_n[None, :], mask=kn_mask, other=0
            )
            q = ((packed >> ((k_idx % 8) * 4)[:, None]) & 0xF).to(tl.float32)  # [BK, BN]
            if HAS_GIDX:
                g = tl.load(g_ptr + k_idx, mask=k_mask, other=0).to(tl.int64)[:, None]
                s = tl.load(s_ptr + g * N + offs_n[None, :], mask=kn_mask, other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    zp = tl.load(z_ptr + g * (N // 8) + (offs_n // 8)[None, :], mask=kn_mask, other=0)
                    z = ((zp >> zshift[None, :]) & 0xF).to(tl.float32) + ZERO_OFFSET
                else:
                    z = 8.0
            else:
                g = (k0 // group_size).to(tl.int64)
                gm = n_mask & (k0 < K)
                s = tl.load(s_ptr + g * N + offs_n, mask=gm, other=0.0).to(tl.float32)[None, :]
                if HAS_ZEROS:
                    zp = tl.load(z_ptr + g * (N // 8) + offs_n // 8, mask=gm, other=0)
                    z = ((zp >> zshift) & 0xF).to(tl.float32)[None, :] + ZERO_OFFSET
                else:
                    z = 8.0
            w = ((q - z) * s).to(a.dtype)
            if DOT_IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        out_mask = m_mask[:, None] & n_mask[None, :]
        if WRITE_PARTIAL:
            rows = pid_k.to(tl.int64) * M + offs_m.to(tl.int64)
            tl.store(y_ptr + rows[:, None] * N + offs_n[None, :], acc, mask=out_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter: a few programs exercise split-K without slowing the tests down


def _tile_k(group_size: int, n_groups: int, preferred: int) -> tuple[int, bool]:
    """(BLOCK_K, one_group_per_tile). A tile must not straddle groups for the per-tile scale path."""
    if n_groups == 1:
        return preferred, True
    pow2 = group_size & -group_size  # largest power of two dividing the group size
    if pow2 >= 16:
        return min(preferred, pow2), True
    return preferred, False


def _split(n_tiles_mn: int, n_tiles_k: int, device: torch.device, per_sm: float) -> tuple[int, int]:
    """(split, tiles_per_split): split K until there are about ``per_sm`` programs per SM (at most 16)."""
    if per_sm <= 0:
        return 1, n_tiles_k
    target = int(per_sm * _sm_count(device))
    max_split = 16
    split = max(1, min(max_split, n_tiles_k, -(-target // max(1, n_tiles_mn))))
    per = -(-n_tiles_k // split)
    return -(-n_tiles_k // per), per


def w4a16_triton(x, qweight, scales, qzeros, g_idx, bias, group_size, bits, zero_offset):
    """Triton path (4-bit only); x [..., K] -> [..., N]."""
    if bits != 4:
        return w4a16_reference(x, qweight, scales, qzeros, g_idx, bias, group_size, bits, zero_offset)
    lead = x.shape[:-1]
    k = x.shape[-1]
    n = qweight.shape[1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    tensors = [t for t in (x2, qweight, scales, qzeros, g_idx, bias) if t is not None]
    check_launchable(*tensors)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    qzeros = qzeros.contiguous() if qzeros is not None else None
    n_groups = scales.shape[0]
    y = empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    dummy = qweight  # placeholder pointer for unused arguments
    common = dict(
        ZERO_OFFSET=int(zero_offset),
        HAS_ZEROS=qzeros is not None,
        HAS_BIAS=bias is not None,
    )
    if m <= GEMV_MAX_M:
        block_n, preferred_k, warps, per_sm = GEMV_CONFIG
        block_k, one_group = _tile_k(group_size, n_groups, preferred_k)
        grid_mn = triton.cdiv(n, block_n)
    else:
        _, block_m, block_n, preferred_k, warps, stages, per_sm = next(
            (c for c in GEMM_CONFIGS if m <= c[0]), GEMM_CONFIGS[-1]
        )
        block_k, one_group = _tile_k(group_size, n_groups, preferred_k)
        grid_mn = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    use_gidx = g_idx is not None or not one_group
    if use_gidx and g_idx is None:
        g_idx = default_g_idx(k, group_size, x.device)
    n_tiles_k = triton.cdiv(k, block_k)
    split, per = _split(grid_mn, n_tiles_k, x.device, per_sm)
    out = empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    args = (
        x2,
        qweight,
        scales,
        qzeros if qzeros is not None else dummy,
        g_idx.contiguous() if use_gidx else dummy,
        bias if bias is not None else dummy,
        out,
        m,
        n,
        k,
        group_size if group_size > 0 else k,
    )
    if m <= GEMV_MAX_M:
        grid = (triton.cdiv(n, block_n), split, m)
        gemv = _w4a16_gemv2d_kernel if GEMV_KIND == "2d" else _w4a16_gemv_kernel
        gemv[grid](
            *args,
            HAS_GIDX=use_gidx,
            WRITE_PARTIAL=split > 1,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            TILES=per,
            num_warps=warps,
            **common,
        )
    else:
        upcast = x.dtype == torch.bfloat16 and interpreting()
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
        _w4a16_gemm_kernel[grid](
            *args,
            HAS_GIDX=use_gidx,
            WRITE_PARTIAL=split > 1,
            DOT_IEEE=x.dtype == torch.float32 or upcast,
            UPCAST=upcast,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            TILES=per,
            num_warps=warps,
            num_stages=stages,
            **common,
        )
    if split > 1:  # sum the partials with torch: cheaper to launch than a second Triton kernel
        total = out.sum(dim=0)
        if bias is not None:
            total += bias.float()
        y = total.to(x.dtype)
    return y.reshape(*lead, n)


class _W4A16Function(torch.autograd.Function):
    """Triton forward; backward dx = dy @ dequant(W)^T (fp32), so activations can carry gradients
    (adapters on a frozen quantized base). The quantized weight itself gets no gradient."""

    @staticmethod
    def forward(ctx, x, qweight, scales, qzeros, g_idx, bias, group_size, bits, zero_offset):
        ctx.save_for_backward(qweight, scales, qzeros, g_idx)
        ctx.meta = (group_size, bits, zero_offset, None if bias is None else bias.dtype, x.dtype)
        return w4a16_triton(x, qweight, scales, qzeros, g_idx, bias, group_size, bits, zero_offset)

    @staticmethod
    def backward(ctx, grad_y):
        qweight, scales, qzeros, g_idx = ctx.saved_tensors
        group_size, bits, zero_offset, bias_dtype, dtype = ctx.meta
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            w = dequantize(
                qweight, scales, qzeros, g_idx, bits=bits, group_size=group_size, zero_offset=zero_offset
            )
            grad_x = (grad_y.float() @ w.t()).to(dtype)
        if bias_dtype is not None and ctx.needs_input_grad[5]:
            grad_b = grad_y.float().reshape(-1, grad_y.shape[-1]).sum(0).to(bias_dtype)
        return grad_x, None, None, None, None, grad_b, None, None, None


def _triton_entry(x, qweight, scales, qzeros, g_idx, bias, group_size, bits, zero_offset):
    args = (x, qweight, scales, qzeros, g_idx, bias, group_size, bits, zero_offset)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _W4A16Function.apply(*args)
    return w4a16_triton(*args)


register_kernel(
    NAME,
    torch=w4a16_reference,
    triton=_triton_entry if HAS_TRITON else None,
    reference="GPTQ https://arxiv.org/abs/2210.17323; AWQ https://arxiv.org/abs/2306.00978",
)


def _check_shapes(x, qweight, scales, qzeros, g_idx, bits, group_size):
    k = x.shape[-1]
    n = qweight.shape[1]
    per, nwords = _block(bits)
    if k % per or qweight.shape[0] != k // per * nwords:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not match in_features {k} at {bits} bits")
    if group_size not in (-1, 0) and g_idx is None and k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    if scales.shape[1] != n:
        raise ValueError(f"scales {tuple(scales.shape)} do not match out_features {n}")
    if qzeros is not None and tuple(qzeros.shape) != (scales.shape[0], n // per * nwords):
        raise ValueError(f"qzeros {tuple(qzeros.shape)} do not match scales {tuple(scales.shape)}")
    if g_idx is None:
        gs = k if group_size in (-1, 0) else group_size
        if scales.shape[0] != -(-k // gs):
            raise ValueError(f"scales {tuple(scales.shape)}: expected {-(-k // gs)} groups of {gs} rows")
    elif g_idx.shape != (k,):
        raise ValueError(f"g_idx {tuple(g_idx.shape)} must have one group per input row ({k})")


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    g_idx: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    layout: str = "gptq",
    group_size: int = 128,
    bits: int = 4,
) -> torch.Tensor:
    """``x @ dequant(W) + bias`` for x [..., K] in fp16/bf16 (fp32 works too) -> [..., N] in x's dtype.

    ``layout`` names the checkpoint format of ``qweight/scales/qzeros/g_idx`` (see the module docstring);
    ``gptq``/``gptq_v2`` are read natively, ``awq``/``compressed-tensors`` are repacked on every call
    (use :class:`W4A16Linear`, which repacks once at load). ``group_size=-1`` is per-channel. With
    ``g_idx`` the scale/zero of every row is gathered (act-order); pass ``None`` when it is the default
    ``k // group_size`` to get the faster per-tile path. Triton on CUDA (4-bit only), reference elsewhere.
    """
    qweight, scales, qzeros, g_idx, zero_offset = to_kernel_layout(
        layout, qweight, scales, qzeros, g_idx, bits=bits
    )
    _check_shapes(x, qweight, scales, qzeros, g_idx, bits, group_size)
    fn = get_kernel(NAME, on_cuda=x.is_cuda)
    return fn(x, qweight, scales, qzeros, g_idx, bias, group_size, bits, zero_offset)


# ---------------------------------------------------------------------------------------------------------
# nn.Module
# ---------------------------------------------------------------------------------------------------------


class W4A16Linear(nn.Module):
    """A Linear with group-quantized weights in GPTQ buffers (``qweight``, ``qzeros``, ``scales``,
    ``g_idx``, ``bias``: the names and shapes of a GPTQ checkpoint, so ``load_state_dict`` takes one).

    ``zero_offset`` is 1 for GPTQ v1 checkpoints (stored zero - 1) and 0 for v2 and for AWQ /
    compressed-tensors tensors repacked by :meth:`from_awq` / :meth:`from_compressed_tensors`.
    Forward goes through :func:`w4a16_matmul` (Triton on CUDA, torch reference elsewhere).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 4,
        group_size: int = 128,
        zero_offset: int = 1,
        dtype: torch.dtype = torch.float16,
        device=None,
    ):
        super().__init__()
        per, nwords = _block(bits)
        gs = in_features if group_size in (-1, 0) else group_size
        if in_features % gs:
            raise ValueError(f"group size {gs} does not divide in_features {in_features}")
        if in_features % per or out_features % per:
            raise ValueError(f"in/out features must be multiples of {per} for {bits}-bit packing")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.zero_offset = bits, group_size, zero_offset
        n_groups = in_features // gs
        i32 = torch.int32
        self.register_buffer(
            "qweight", torch.zeros(in_features // per * nwords, out_features, dtype=i32, device=device)
        )
        self.register_buffer(
            "qzeros", torch.zeros(n_groups, out_features // per * nwords, dtype=i32, device=device)
        )
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=dtype, device=device))
        self.register_buffer("g_idx", default_g_idx(in_features, group_size, device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._g_idx_is_default: bool | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._g_idx_is_default = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _kernel_g_idx(self) -> torch.Tensor | None:
        """None when g_idx is the default k // group_size (checked once: the faster per-tile path)."""
        if self._g_idx_is_default is None:
            default = default_g_idx(self.in_features, self.group_size, self.g_idx.device)
            self._g_idx_is_default = bool(torch.equal(self.g_idx.to(torch.int32), default))
        return None if self._g_idx_is_default else self.g_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_matmul(
            x,
            self.qweight,
            self.scales,
            self.qzeros,
            self._kernel_g_idx(),
            bias=self.bias,
            layout="gptq" if self.zero_offset == 1 else "gptq_v2",
            group_size=self.group_size,
            bits=self.bits,
        )

    def dequantize_weight(self) -> torch.Tensor:
        """The dense weight [out, in] (fp32) that forward multiplies by."""
        return dequantize(
            self.qweight,
            self.scales,
            self.qzeros,
            self.g_idx,
            bits=self.bits,
            group_size=self.group_size,
            zero_offset=self.zero_offset,
        ).t()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, zero_offset={self.zero_offset}"
        )

    def _set(self, qweight, scales, qzeros, g_idx, bias):
        self.qweight.copy_(qweight)
        self.scales.copy_(scales)
        if qzeros is None:  # symmetric checkpoint without zeros: store the midpoint explicitly
            mid = torch.full_like(self.scales, 2 ** (self.bits - 1), dtype=torch.int32) - self.zero_offset
            qzeros = pack_int(mid, self.bits, dim=1)
        self.qzeros.copy_(qzeros)
        if g_idx is not None:
            self.g_idx.copy_(g_idx)
        if bias is not None:
            if self.bias is None:
                raise ValueError("bias given but the layer was built without one")
            self.bias.copy_(bias)
        self._g_idx_is_default = None
        return self

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        *,
        v1: bool = True,
        dtype: torch.dtype | None = None,
    ) -> W4A16Linear:
        """Round-to-nearest quantization of an ``nn.Linear`` (for tests and the RTN baseline).

        With ``v1`` (GPTQ checkpoint_format "gptq") asymmetric zeros are clamped to >= 1, since v1 cannot
        store 0; ``v1=False`` keeps them exact (zero_offset 0).
        """
        w = linear.weight
        dtype = dtype or (w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16)
        q, zeros, scales = quantize_rtn(w, bits=bits, group_size=group_size, sym=sym)
        if v1 and not sym and zeros.numel() and int(zeros.min()) < 1:
            # re-round the affected groups with zero 1: the grid shifts down by one step
            zeros = zeros.clamp(min=1)
            gs = w.shape[1] if group_size in (-1, 0) else group_size
            wq = w.detach().float().t().reshape(-1, gs, w.shape[0])
            q = torch.clamp(torch.round(wq / scales.float()[:, None]) + zeros[:, None], 0, 2**bits - 1)
            q = q.to(torch.int32).reshape(w.shape[1], w.shape[0])
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            bits=bits,
            group_size=group_size,
            zero_offset=1 if v1 else 0,
            dtype=dtype,
            device=w.device,
        )
        qweight, qzeros, scales, g_idx = pack_gptq(q, zeros, scales, bits=bits, group_size=group_size, v1=v1)
        bias = None if linear.bias is None else linear.bias.detach()
        return layer._set(qweight, scales.to(dtype), qzeros, g_idx, bias)

    @classmethod
    def from_integers(
        cls, q, zeros, scales, g_idx=None, bias=None, *, bits=4, group_size=128, dtype=torch.float16
    ) -> W4A16Linear:
        """From format-free integers: q [K, N], zeros [G, N] (unsigned, any value incl. 0; None =
        symmetric midpoint), scales [G, N]. Stored as GPTQ v2 (zero_offset 0), so nothing is clamped."""
        if zeros is None:
            zeros = torch.full(scales.shape, 2 ** (bits - 1), dtype=torch.int32, device=scales.device)
        k, n = q.shape
        layer = cls(
            k,
            n,
            bias=bias is not None,
            bits=bits,
            group_size=group_size,
            zero_offset=0,
            dtype=dtype,
            device=q.device,
        )
        qweight, qzeros, sc, gi = pack_gptq(
            q, zeros, scales, g_idx, bits=bits, group_size=group_size, v1=False
        )
        return layer._set(qweight, sc.to(dtype), qzeros, gi, bias)

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx=None, bias=None, *, bits=4, group_size=128, v1=True):
        per, nwords = _block(bits)
        in_features, out_features = qweight.shape[0] // nwords * per, qweight.shape[1]
        layer = cls(
            in_features,
            out_features,
            bias=bias is not None,
            bits=bits,
            group_size=group_size,
            zero_offset=1 if v1 else 0,
            dtype=scales.dtype,
            device=qweight.device,
        )
        return layer._set(qweight, scales, qzeros, g_idx, bias)

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, bias=None, *, group_size=128):
        """AutoAWQ GEMM tensors, repacked once to the GPTQ layout (zero_offset 0)."""
        qw, sc, qz, _, _ = to_kernel_layout("awq", qweight, scales, qzeros)
        layer = cls(
            qweight.shape[0],
            scales.shape[1],
            bias=bias is not None,
            group_size=group_size,
            zero_offset=0,
            dtype=scales.dtype,
            device=qweight.device,
        )
        return layer._set(qw, sc, qz, None, bias)

    @classmethod
    def from_compressed_tensors(cls, tensors: dict, bias=None, *, bits=4, group_size=128):
        """One Linear's pack-quantized tensors (``weight_packed``, ``weight_scale``, optional
        ``weight_zero_point``/``weight_g_idx``), transposed once into the GPTQ layout (zero_offset 0)."""
        qw, sc, qz, g_idx, _ = to_kernel_layout(
            "compressed-tensors",
            tensors["weight_packed"],
            tensors["weight_scale"],
            tensors.get("weight_zero_point"),
            tensors.get("weight_g_idx"),
            bits=bits,
        )
        per, _ = _block(bits)
        layer = cls(
            qw.shape[0] * per,
            qw.shape[1],
            bias=bias is not None,
            bits=bits,
            group_size=group_size,
            zero_offset=0,
            dtype=sc.dtype,
            device=qw.device,
        )
        return layer._set(qw, sc, qz, g_idx, bias)


__all__ = [
    "AWQ_ORDER",
    "LAYOUTS",
    "W4A16Linear",
    "default_g_idx",
    "dequantize",
    "pack_awq",
    "pack_compressed_tensors",
    "pack_gptq",
    "pack_int",
    "quantize_rtn",
    "to_kernel_layout",
    "unpack_awq",
    "unpack_compressed_tensors",
    "unpack_gptq",
    "unpack_int",
    "w4a16_matmul",
    "w4a16_reference",
    "w4a16_triton",
]
