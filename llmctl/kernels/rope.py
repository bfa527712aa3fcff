"""Rotary position embedding (RoPE) for q and k, forward and backward, and its inverse-frequency builders.

RoPE (Su et al. 2021, https://arxiv.org/abs/2104.09864) rotates each pair of channels of q and k by an
angle ``position * inv_freq[i]``. The layout here is Hugging Face's "rotate_half" one (Llama, Qwen2,
Mistral): channel ``i`` of the first half pairs with channel ``i`` of the second half, and ``cos``/``sin``
tables hold ``cat(freqs, freqs)`` over the head dimension::

    out = x * cos + rotate_half(x) * sin,     rotate_half([x1, x2]) = [-x2, x1]

so ``out1 = x1 * cos1 - x2 * sin1`` and ``out2 = x2 * cos2 + x1 * sin2``. The backward pass is the rotation
by the opposite angle: ``dx1 = dy1 * cos1 + dy2 * sin2`` and ``dx2 = dy2 * cos2 - dy1 * sin1``.

Positions are per token: ``cos``/``sin`` are ``[..., head_dim]`` with the same leading (token) shape as q
and k, so packed / variable-length batches and arbitrary ``position_ids`` work. :func:`rope_cos_sin` builds
the tables from positions and inverse frequencies, :func:`apply_rope` does both steps.

Inverse frequencies (each builder returns ``(inv_freq, attention_factor)``, the factor multiplying cos/sin):

- default: ``theta ** (-2i / dim)``;
- Llama 3 (https://github.com/meta-llama/llama-models, "use_scaled_rope"): low frequencies (wavelength
  above ``original_max_position_embeddings / low_freq_factor``) divided by ``factor``, high ones kept,
  smooth interpolation between;
- YaRN (Peng et al. 2023, https://arxiv.org/abs/2309.00071): per-dimension blend of interpolated and
  extrapolated frequencies through a linear ramp between the ``beta_fast``/``beta_slow`` correction
  dimensions, and attention factor ``0.1 * ln(factor) + 1``.

Math is fp32 inside; outputs keep the dtype of q and k. No gradient flows to ``cos``/``sin`` on the
Triton path (they come from non-trainable buffers in every model this serves).
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

NAME = "rope"


# --- inverse frequencies -----------------------------------------------------------------------------------


def default_inv_freq(head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, float]:
    """``[head_dim // 2]`` fp32 ``theta ** (-2i / head_dim)``, attention factor 1."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta**exponents), 1.0


def llama3_inv_freq(
    head_dim: int,
    theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> tuple[torch.Tensor, float]:
    """Llama 3.1 frequency scaling: long wavelengths divided by ``factor``, short ones kept, blend between."""
    inv_freq, _ = default_inv_freq(head_dim, theta)
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # 0 at the low-frequency edge (fully scaled) .. 1 at the high-frequency edge (unscaled)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, out), 1.0


def yarn_inv_freq(
    head_dim: int,
    theta: float,
    factor: float,
    original_max_position_embeddings: int,
    *,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    truncate: bool = True,
) -> tuple[torch.Tensor, float]:
    """YaRN: NTK-by-parts blend of interpolated (``/ factor``) and extrapolated frequencies, plus mscale."""

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength completes `rotations` turns over the original context
        return (
            head_dim
            * math.log(original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp  # 1: keep the original frequency, 0: interpolate
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(torch.float32) / head_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq, float(attention_factor)


def inv_freq_from_rope_parameters(
    params: dict, head_dim: int, max_position_embeddings: int | None = None
) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_factor)`` from a HF-style ``rope_parameters`` dict (default, llama3, yarn)."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", 10000.0))
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    if rope_type == "default":
        return default_inv_freq(dim, theta)
    if rope_type == "llama3":
        return llama3_inv_freq(
            dim,
            theta,
            params["factor"],
            params["low_freq_factor"],
            params["high_freq_factor"],
            params["original_max_position_embeddings"],
        )
    if rope_type == "yarn":
        original = params.get("original_max_position_embeddings") or max_position_embeddings
        factor = params.get("factor") or (max_position_embeddings / original)
        return yarn_inv_freq(
            dim,
            theta,
            factor,
            original,
            beta_fast=params.get("beta_fast") or 32.0,
            beta_slow=params.get("beta_slow") or 1.0,
            attention_factor=params.get("attention_factor"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=params.get("truncate", True),
        )
    raise ValueError(f"rope_type {rope_type!r} is not supported here (default, llama3, yarn)")


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``[*positions.shape, 2 * len(inv_freq)]`` in the rotate_half layout."""
    freqs = positions[..., None].to(torch.float32) * inv_freq.to(positions.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


# --- the reference ---------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q ``[..., heads_q, head_dim]``, k ``[..., heads_k, head_dim]``, cos/sin ``[..., head_dim]``."""
    c, s = cos.to(torch.float32).unsqueeze(-2), sin.to(torch.float32).unsqueeze(-2)
    rotate = lambda x: (x.to(torch.float32) * c + _rotate_half(x.to(torch.float32)) * s).to(x.dtype)  # noqa: E731
    return rotate(q), rotate(k)


# --- the Triton path -------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _rotate_heads(
        X,  # [tokens, heads, head_dim] input, unit last stride
        Y,  # [tokens, heads, head_dim] contiguous output
        t,  # [BLOCK_T] int64 token indices of this program
        stride_xt,
        stride_xh,
        c1,  # [BLOCK_T, BLOCK_D] fp32 cos of the first half
        c2,  # [BLOCK_T, BLOCK_D] fp32 cos of the second half
        sa,  # [BLOCK_T, BLOCK_D] fp32 sine multiplying -x2 into out1
        sb,  # [BLOCK_T, BLOCK_D] fp32 sine multiplying x1 into out2
        n_tokens,
        H,
        HALF,
        BLOCK_T: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        tt = t[:, None, None]
        h = tl.arange(0, BLOCK_H)[None, :, None]
        d = tl.arange(0, BLOCK_D)[None, None, :]
        mask = (tt < n_tokens) & (h < H) & (d < HALF)
        x_ptr = X + tt * stride_xt + h * stride_xh + d
        y_ptr = Y + tt * (H * 2 * HALF) + h * (2 * HALF) + d
        x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1[:, None, :] - x2 * sa[:, None, :]
        y2 = x2 * c2[:, None, :] + x1 * sb[:, None, :]
        tl.store(y_ptr, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(y_ptr + HALF, y2.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        Q,  # [tokens, heads_q, head_dim] (dq in the backward pass), unit last stride
        K,  # [tokens, heads_k, head_dim]
        COS,  # [tokens, head_dim] cos table, rotate_half layout, unit last stride
        SIN,  # [tokens, head_dim] sin table
        QO,  # [tokens, heads_q, head_dim] contiguous output
        KO,  # [tokens, heads_k, head_dim] contiguous output
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_ct,
        stride_st,
        n_tokens,
        HQ,
        HK,
        HALF,  # head_dim // 2
        BACKWARD: tl.constexpr,  # rotate by the opposite angle (the gradient)
        BLOCK_T: tl.constexpr,  # tokens per program
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_D: tl.constexpr,  # next power of two >= HALF
    ):
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        tmask = (t < n_tokens)[:, None] & (d < HALF)[None, :]
        c_ptr = COS + t[:, None] * stride_ct + d[None, :]
        s_ptr = SIN + t[:, None] * stride_st + d[None, :]
        c1 = tl.load(c_ptr, mask=tmask, other=0.0).to(tl.float32)
        c2 = tl.load(c_ptr + HALF, mask=tmask, other=0.0).to(tl.float32)
        s1 = tl.load(s_ptr, mask=tmask, other=0.0).to(tl.float32)
        s2 = tl.load(s_ptr + HALF, mask=tmask, other=0.0).to(tl.float32)
        if BACKWARD:
            sa = -s2
            sb = -s1
        else:
            sa = s1
            sb = s2
        _rotate_heads(
            Q, QO, t, stride_qt, stride_qh, c1, c2, sa, sb, n_tokens, HQ, HALF, BLOCK_T, BLOCK_HQ, BLOCK_D
        )  # fmt: skip
        _rotate_heads(
            K, KO, t, stride_kt, stride_kh, c1, c2, sa, sb, n_tokens, HK, HALF, BLOCK_T, BLOCK_HK, BLOCK_D
        )  # fmt: skip


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[..., heads, head_dim]`` -> ``[tokens, heads, head_dim]``, unit last stride (a view if possible)."""
    t = x.reshape(-1, x.shape[-2], x.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _table(t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """cos/sin ``[..., head_dim]`` broadcast to the tokens' leading shape -> ``[tokens, head_dim]``."""
    t = t.expand(*lead, t.shape[-1]).reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q3, k3, cos2, sin2, backward: bool):
    tokens, hq, head_dim = q3.shape
    hk = k3.shape[1]
    qo = empty(tokens, hq, head_dim, dtype=q3.dtype, device=q3.device)
    ko = empty(tokens, hk, head_dim, dtype=k3.dtype, device=k3.device)
    if tokens > 0:
        block_hq, block_hk = next_power_of_2(hq), next_power_of_2(hk)
        block_d = next_power_of_2(head_dim // 2)
        # one token per program for real heads on a GPU; whole tiles of tokens under the interpreter, where
        # every program costs Python overhead
        budget = 16384 if interpreting() else 2048
        block_t = max(1, min(64, budget // (block_hq * block_d)))
        _rope_kernel[(triton.cdiv(tokens, block_t),)](
            q3, k3, cos2, sin2, qo, ko,
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), cos2.stride(0), sin2.stride(0),
            tokens, hq, hk, head_dim // 2,
            BACKWARD=backward, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
            num_warps=8 if block_t * block_hq * block_d >= 2048 else 4,
        )  # fmt: skip
    return qo, ko


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        lead = q.shape[:-2]
        cos2, sin2 = _table(cos, lead), _table(sin, lead)
        qo, ko = _launch(_tokens(q), _tokens(k), cos2, sin2, backward=False)
        ctx.save_for_backward(cos2, sin2)
        ctx.shapes = (q.shape, k.shape)
        return qo.view(q.shape), ko.view(k.shape)

    @staticmethod
    def backward(ctx, dq, dk):
        cos2, sin2 = ctx.saved_tensors
        q_shape, k_shape = ctx.shapes
        dq = torch.zeros(q_shape, dtype=cos2.dtype, device=cos2.device) if dq is None else dq
        dk = torch.zeros(k_shape, dtype=cos2.dtype, device=cos2.device) if dk is None else dk
        dqo, dko = _launch(_tokens(dq), _tokens(dk), cos2, sin2, backward=True)
        return dqo.view(q_shape), dko.view(k_shape), None, None


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The Triton path, same contract as :func:`rope_reference`."""
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"rope: q and k need the same even head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    if cos.shape[-1] != head_dim or sin.shape[-1] != head_dim:
        raise ValueError(f"rope: cos/sin last dim {cos.shape[-1]} != head_dim {head_dim} (partial rotary?)")
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"rope: q and k token shapes differ: {tuple(q.shape[:-2])} vs {tuple(k.shape[:-2])}")
    check_launchable(q, k, cos, sin)
    return _RopeFunction.apply(q, k, cos, sin)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q ``[..., heads_q, head_dim]`` and k ``[..., heads_k, head_dim]`` by per-token cos/sin
    ``[..., head_dim]`` (rotate_half layout); returns ``(q_rotated, k_rotated)``."""
    return get_kernel(NAME, on_cuda=q.is_cuda)(q, k, cos, sin)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float = 1.0,
):
    """RoPE from per-token ``positions`` (shape = q's leading shape, e.g. ``[tokens]`` for a packed batch)."""
    cos, sin = rope_cos_sin(positions, inv_freq, attention_factor)
    return rope(q, k, cos, sin)


register_kernel(
    NAME,
    torch=rope_reference,
    triton=rope_triton if HAS_TRITON else None,
    reference="Su et al. 2021, https://arxiv.org/abs/2104.09864 (HF rotate_half layout)",
)

__all__ = [
    "apply_rope",
    "default_inv_freq",
    "inv_freq_from_rope_parameters",
    "llama3_inv_freq",
    "rope",
    "rope_cos_sin",
    "rope_reference",
    "rope_triton",
    "yarn_inv_freq",
]
