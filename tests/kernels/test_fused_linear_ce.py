"""Fused linear + cross-entropy: loss and gradients (hidden, weight, bias) against the unfused reference."""

from __future__ import annotations

import pytest
import torch

from llmctl.kernels import fused_linear_ce as flce
from tests.kernels._check import assert_close
from tests.kernels.conftest import ON_CUDA

IGNORE = -100


def make_inputs(n, hidden, vocab, dtype, device, *, bias=True, ignored_every=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) / hidden**0.5
    b = torch.randn(vocab, generator=gen) * 0.1 if bias else None
    labels = torch.randint(0, vocab, (n,), generator=gen)
    if ignored_every:
        labels[::ignored_every] = IGNORE
    to = lambda t: None if t is None else t.to(dtype).to(device).requires_grad_()  # noqa: E731
    return to(h), to(w), to(b), labels.to(device)


def loss_and_grads(fn, h, w, b, labels, upstream, **kw):
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    loss = fn(h, w, labels, bias=b, **kw)
    loss.backward(upstream)
    return loss.detach(), [t.grad.clone() for t in (h, w, b) if t is not None]


def check(h, w, b, labels, dtype, what, **kw):
    """Triton path on (h, w, b) vs the reference on fp32 copies of the same values."""
    gen = torch.Generator().manual_seed(1)
    n = labels.shape[0]
    upstream = torch.randn(n, generator=gen) if kw.get("reduction") == "none" else torch.tensor(1.7)
    upstream = upstream.to(h.device)
    loss, grads = loss_and_grads(flce.fused_linear_cross_entropy_triton, h, w, b, labels, upstream, **kw)
    ref_inputs = [None if t is None else t.detach().float().requires_grad_() for t in (h, w, b)]
    kw.pop("chunk_size", None)
    ref_loss, ref_grads = loss_and_grads(
        flce.fused_linear_cross_entropy_reference, *ref_inputs, labels, upstream, **kw
    )
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, dtype, what=f"{what} loss")
    assert len(grads) == len(ref_grads)
    for name, g, ref in zip(("hidden", "weight", "bias")[: len(grads)], grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert_close(g, ref, dtype, what=f"{what} grad_{name}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_reference_for_every_reduction_with_and_without_smoothing(device, reduction, smoothing):
    # 37 tokens in chunks of 16 (the last one partial), vocab 300 (not a power of two), every 5th ignored
    h, w, b, labels = make_inputs(37, 32, 300, torch.float32, device)
    check(
        h, w, b, labels, torch.float32, f"flce {reduction} eps={smoothing}",
        reduction=reduction, label_smoothing=smoothing, chunk_size=16,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_matches_the_fp32_reference(device, dtype):
    h, w, b, labels = make_inputs(33, 64, 257, dtype, device)
    check(h, w, b, labels, dtype, f"flce {dtype}", label_smoothing=0.05, chunk_size=8)


def test_without_bias_and_with_one_chunk_of_everything(device):
    h, w, _, labels = make_inputs(20, 16, 100, torch.float32, device, bias=False, ignored_every=0)
    check(h, w, None, labels, torch.float32, "flce no bias", chunk_size=None)


def test_a_single_token_and_chunks_of_one(device):
    h, w, b, labels = make_inputs(3, 16, 50, torch.float32, device, ignored_every=0)
    check(h, w, b, labels, torch.float32, "flce chunk=1", chunk_size=1, reduction="sum")
    check(h[:1].detach().requires_grad_(), w, b, labels[:1], torch.float32, "flce n=1")


def test_all_ignored_gives_nan_loss_and_zero_gradients_like_torch(device):
    h, w, b, labels = make_inputs(6, 16, 40, torch.float32, device)
    labels[:] = IGNORE
    loss = flce.fused_linear_cross_entropy_triton(h, w, labels, bias=b, chunk_size=4)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_custom_ignore_index_and_only_hidden_requiring_grad(device):
    h, w, b, labels = make_inputs(12, 16, 40, torch.float32, device, ignored_every=0)
    labels[3] = 7
    w.requires_grad_(False)
    b.requires_grad_(False)
    loss = flce.fused_linear_cross_entropy_triton(h, w, labels, bias=b, ignore_index=7, chunk_size=5)
    loss.backward()
    ref_h = h.detach().clone().requires_grad_()
    ref = flce.fused_linear_cross_entropy_reference(ref_h, w, labels, bias=b, ignore_index=7)
    ref.backward()
    assert_close(loss, ref.detach(), torch.float32, what="flce ignore_index=7 loss")
    assert_close(h.grad, ref_h.grad, torch.float32, what="flce ignore_index=7 grad_hidden")
    assert torch.equal(h.grad[3], torch.zeros_like(h.grad[3]))


def test_public_function_dispatches_to_both_backends(device, monkeypatch):
    h, w, b, labels = make_inputs(9, 16, 40, torch.float32, device)
    ref = flce.fused_linear_cross_entropy_reference(h, w, labels, bias=b)
    assert_close(flce.fused_linear_cross_entropy(h, w, labels, bias=b), ref, torch.float32, what="dispatch")
    monkeypatch.setenv("LLMCTL_KERNELS", "torch")
    assert torch.equal(flce.fused_linear_cross_entropy(h, w, labels, bias=b), ref)


def test_bad_inputs_fail_with_clear_errors(device):
    h, w, b, labels = make_inputs(4, 16, 40, torch.float32, device)
    with pytest.raises(ValueError, match="reduction"):
        flce.fused_linear_cross_entropy_triton(h, w, labels, reduction="avg")
    with pytest.raises(ValueError, match="labels must be in"):
        flce.fused_linear_cross_entropy_triton(h, w, torch.full_like(labels, 40))
    with pytest.raises(ValueError, match="weight"):
        flce.fused_linear_cross_entropy_reference(h, w[:, :8], labels)


@pytest.mark.skipif(not ON_CUDA, reason="large shapes only on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_vocab_on_cuda(dtype):
    h, w, b, labels = make_inputs(1000, 256, 32000, dtype, "cuda", bias=False)
    check(h, w, None, labels, dtype, f"flce large {dtype}", label_smoothing=0.1, chunk_size=384)
