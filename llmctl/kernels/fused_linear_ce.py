"""Fused linear + cross-entropy: the LM head's loss without ever holding the [tokens, vocab] logits.

For hidden states ``h`` [N, H], the LM head ``W`` [V, H] (and optional bias ``b`` [V]) and labels ``y``::

    z_i    = h_i Wᵀ + b                                          logits of token i
    lse_i  = log Σ_j exp(z_ij)
    loss_i = (1 − ε)(lse_i − z_iy) + ε (lse_i − Σ_j z_ij / V)     (label smoothing ε, as torch defines it)
    ∂loss_i/∂z_ij = softmax(z_i)_j − (1 − ε)[j = y_i] − ε / V     (0 for rows whose label is ignore_index)

and ``reduction`` "mean" divides the sum by the number of non-ignored tokens (all ignored: the loss is NaN
and the gradients zero, as in ``torch.nn.functional.cross_entropy``), "sum" sums, "none" returns loss_i.

The tokens are processed ``chunk_size`` rows at a time (Liger-Kernel's FusedLinearCrossEntropy, Hsu et al.
2024, https://arxiv.org/abs/2410.10989): per chunk, the logits are one matmul (fp32 accumulation, stored in
the input dtype), a Triton kernel computes each row's loss and overwrites its logits with ∂loss/∂z in
place, and two more matmuls give the chunk's ``grad_hidden = ∂z W`` and add ``∂zᵀ h`` to ``grad_weight``.
All of that happens in the forward pass, so only one chunk of logits exists at a time, and the backward
pass only multiplies the stored gradients by ``grad_output`` (for "mean"/"sum"). With ``reduction="none"``
the per-row upstream gradients are unknown in forward, so the backward pass recomputes the chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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

NAME = "fused_linear_ce"
REFERENCE = "Liger-Kernel FusedLinearCrossEntropy, https://arxiv.org/abs/2410.10989"
REDUCTIONS = ("mean", "sum", "none")

__all__ = [
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "fused_linear_cross_entropy_triton",
]


def _validate(hidden, weight, labels, bias, label_smoothing, reduction, chunk_size) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != (hidden.shape[0],) or labels.dtype.is_floating_point:
        raise ValueError(
            f"labels must be integer [N={hidden.shape[0]}], got {labels.dtype} {tuple(labels.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def fused_linear_cross_entropy_reference(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ignore_index=-100,
    label_smoothing=0.0,
    reduction="mean",
    chunk_size=None,
) -> torch.Tensor:
    """The unfused definition: full logits, upcast to fp32, torch's cross-entropy (chunk_size unused)."""
    _validate(hidden, weight, labels, bias, label_smoothing, reduction, chunk_size)
    logits = F.linear(hidden, weight, bias).float()  # [N, V]
    return F.cross_entropy(
        logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )


# ----------------------------------------------------------------------------------------------------------
# Triton: per-row loss and in-place logits gradient
# ----------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _ce_loss_grad_kernel(
        logits_ptr,  # [rows, V] logits in; ∂loss/∂logits (times the row scale) out when WRITE_GRAD
        stride_row,  # elements between rows of logits
        labels_ptr,  # [rows] int64 labels
        loss_ptr,  # [rows] float32 per-row loss (0 where ignored)
        scale_ptr,  # [rows] float32 per-row gradient scale (HAS_SCALE), else unused
        ignore_index,
        smoothing,  # ε
        N_COLS: tl.constexpr,  # V (a constexpr: the interpreter needs static loop bounds)
        BLOCK_V: tl.constexpr,
        SMOOTH: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        HAS_SCALE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride_row
        label = tl.load(labels_ptr + row)
        ignored = label == ignore_index
        cols = tl.arange(0, BLOCK_V)

        # Pass 1: running max and sum of exponentials (and the sum of logits for label smoothing).
        m = float("-inf")
        s = 0.0
        z_sum = 0.0
        for v0 in range(0, N_COLS, BLOCK_V):
            c = v0 + cols
            mask = c < N_COLS
            z = tl.load(ptr + c, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            if SMOOTH:
                z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
            m = m_new
        lse = m + tl.log(s)
        safe_label = tl.where(ignored, 0, label)
        z_label = tl.load(ptr + safe_label).to(tl.float32)  # read before pass 2 overwrites it

        loss = lse - z_label
        if SMOOTH:
            loss = (1.0 - smoothing) * loss + smoothing * (lse - z_sum / N_COLS)
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))

        # Pass 2: ∂loss/∂z = softmax − (1 − ε)·onehot − ε/V, written over the logits.
        if WRITE_GRAD:
            scale = 1.0
            if HAS_SCALE:
                scale = tl.load(scale_ptr + row)
            scale = tl.where(ignored, 0.0, scale)
            for v0 in range(0, N_COLS, BLOCK_V):
                c = v0 + cols
                mask = c < N_COLS
                z = tl.load(ptr + c, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(z - lse)
                if SMOOTH:
                    g = g - smoothing / N_COLS
                g = tl.where(c == safe_label, g - (1.0 - smoothing), g) * scale
                tl.store(ptr + c, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _loss_and_grad_rows(logits, labels, *, ignore_index, label_smoothing, write_grad, row_scale=None):
    """Per-row loss [rows] float32; if write_grad, logits is overwritten by (row_scale ×) ∂loss/∂logits."""
    rows, vocab = logits.shape
    loss = empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block_v = min(next_power_of_2(vocab), 1024 if interpreting() else 4096)
    _ce_loss_grad_kernel[(rows,)](
        logits,
        logits.stride(0),
        labels,
        loss,
        row_scale if row_scale is not None else loss,
        ignore_index,
        float(label_smoothing),
        N_COLS=vocab,
        BLOCK_V=block_v,
        SMOOTH=label_smoothing > 0,
        WRITE_GRAD=write_grad,
        HAS_SCALE=row_scale is not None,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return loss


def _default_chunk_size(n: int, vocab: int) -> int:
    """About 32M logits per chunk (64 MiB in bf16): big matmuls, a small fraction of the full matrix."""
    return max(16, min(next_power_of_2(n), next_power_of_2(max(1, (1 << 25) // vocab))))


def _chunked_pass(
    hidden, weight, bias, labels, *, ignore_index, label_smoothing, chunk_size, needs, row_scale
):
    """One sweep over token chunks: per-row loss and, for the inputs in ``needs``, their gradients.

    ``needs`` = (hidden, weight, bias) booleans. Gradients are of Σ_i row_scale_i · loss_i (row_scale None
    means 1). grad_weight accumulates in weight's dtype with in-place addmm (fp32 accumulation inside each
    matmul, as Liger does); grad_bias in float32.
    """
    n, _ = hidden.shape
    vocab = weight.shape[0]
    need_h, need_w, need_b = needs
    write_grad = need_h or need_w or need_b
    chunk = chunk_size or _default_chunk_size(n, vocab)
    losses = []
    grad_h = empty(*hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None  # accumulator: zeros is its start value
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        h = hidden[start:end]  # [rows, H]
        logits = F.linear(h, weight, bias)  # [rows, V] in the input dtype (fp32 accumulation)
        losses.append(
            _loss_and_grad_rows(
                logits,
                labels[start:end],
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
                write_grad=write_grad,
                row_scale=None if row_scale is None else row_scale[start:end],
            )
        )
        if need_h:
            torch.mm(logits, weight, out=grad_h[start:end])  # [rows, H]
        if need_w:
            grad_w.addmm_(logits.t(), h)  # [V, H]
        if need_b:
            grad_b += logits.sum(dim=0, dtype=torch.float32)
        del logits
    loss = torch.cat(losses) if losses else empty(0, dtype=torch.float32, device=hidden.device)
    return loss, grad_h, grad_w, grad_b


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, reduction, chunk_size):
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, chunk_size=chunk_size)
        ctx.reduction = reduction
        ctx.kw = kw
        ctx.needs = needs
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if reduction == "none":  # per-row upstream gradients come later: backward recomputes the chunks
            loss, *_ = _chunked_pass(hidden, weight, bias, labels, **kw, needs=(False,) * 3, row_scale=None)
            ctx.save_for_backward(hidden, weight, bias, labels)
            return loss
        loss_rows, grad_h, grad_w, grad_b = _chunked_pass(
            hidden, weight, bias, labels, **kw, needs=needs, row_scale=None
        )
        total = loss_rows.sum()
        if reduction == "mean":
            count = (labels != ignore_index).sum()
            loss = total / count  # all ignored: 0 / 0 = NaN, as torch
            scale = torch.where(count > 0, 1.0 / count.clamp_min(1), torch.zeros_like(total))
        else:
            loss, scale = total, torch.ones_like(total)
        ctx.save_for_backward(grad_h, grad_w, grad_b, scale)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            _, grad_h, grad_w, grad_b = _chunked_pass(
                hidden,
                weight,
                bias,
                labels,
                **ctx.kw,
                needs=ctx.needs,
                row_scale=grad_output.float().contiguous(),
            )
        else:
            grad_h, grad_w, grad_b, scale = ctx.saved_tensors
            # 0-dim fp32 factor: the products round once to the gradients' dtype. Not in place, so a
            # second backward (retain_graph=True) sees the stored gradients unchanged.
            factor = grad_output.float() * scale
            grad_h = grad_h * factor if grad_h is not None else None
            grad_w = grad_w * factor if grad_w is not None else None
            grad_b = grad_b * factor if grad_b is not None else None
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def fused_linear_cross_entropy_triton(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ignore_index=-100,
    label_smoothing=0.0,
    reduction="mean",
    chunk_size=None,
) -> torch.Tensor:
    """The chunked path (Triton row kernel + torch matmuls), differentiable in hidden, weight and bias."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    _validate(hidden, weight, labels, bias, label_smoothing, reduction, chunk_size)
    check_launchable(hidden, weight, labels)
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias must share a dtype")
    vocab = weight.shape[0]
    labels = labels.long().contiguous()
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):  # one sync per call: an out-of-range label would read outside the logits
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index ({ignore_index})")
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    return _FusedLinearCrossEntropy.apply(
        hidden, weight, bias, labels, ignore_index, float(label_smoothing), reduction, chunk_size
    )


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


def fused_linear_cross_entropy(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ignore_index=-100,
    label_smoothing=0.0,
    reduction="mean",
    chunk_size=None,
) -> torch.Tensor:
    """``cross_entropy(linear(hidden, weight, bias).float(), labels)`` without the full logits on CUDA."""
    fn = get_kernel(NAME, on_cuda=hidden.is_cuda)
    return fn(
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
        chunk_size=chunk_size,
    )


register_kernel(
    NAME,
    torch=fused_linear_cross_entropy_reference,
    triton=fused_linear_cross_entropy_triton if HAS_TRITON else None,
    reference=REFERENCE,
)
