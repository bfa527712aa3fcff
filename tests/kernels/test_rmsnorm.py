"""RMSNorm: the Triton kernel against the torch reference, forward and gradients, with/without residual."""

from __future__ import annotations

import pytest
import torch

from llmctl.kernels.rmsnorm import rms_norm, rms_norm_reference, rms_norm_triton
from tests.kernels._check import assert_close
from tests.kernels.conftest import ON_CUDA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading shape, hidden): odd hidden sizes, one row, 3-D inputs; bigger ones only on a GPU
SHAPES = [((5,), 96), ((1,), 3), ((2, 3), 67), ((7,), 130)]
if ON_CUDA:
    SHAPES += [((4, 1023), 4096), ((33,), 5120), ((2, 17), 8192)]


def _inputs(lead, hidden, dtype, device, residual: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=g).to(dtype).to(device).requires_grad_()
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(device).requires_grad_()
    r = torch.randn(*lead, hidden, generator=g).to(dtype).to(device).requires_grad_() if residual else None
    return x, w, r


def _clone(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,hidden", SHAPES)
def test_rms_norm_forward_and_gradients_match_reference(device, dtype, lead, hidden):
    x, w, _ = _inputs(lead, hidden, dtype, device, residual=False)
    xr, wr = _clone(x, w)
    out = rms_norm_triton(x, w, 1e-6)
    ref = rms_norm_reference(xr.float(), wr.float(), 1e-6)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, what="rms_norm out")
    dy = torch.randn_like(ref)
    out.backward(dy.to(dtype))
    ref.backward(dy)
    assert_close(x.grad, xr.grad, dtype, what="rms_norm dx")
    assert_close(w.grad, wr.grad, dtype, what="rms_norm dweight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,hidden", [((3,), 96), ((2, 5), 67)])
def test_fused_residual_add_returns_sum_and_propagates_both_gradients(device, dtype, lead, hidden):
    x, w, r = _inputs(lead, hidden, dtype, device, residual=True)
    xr, wr, rr = _clone(x, w, r)
    out, new_res = rms_norm_triton(x, w, 1e-5, residual=r)
    ref_out, ref_res = rms_norm_reference(xr, wr, 1e-5, residual=rr)
    assert_close(new_res, ref_res, dtype, what="new residual")
    assert_close(out, ref_out, dtype, what="rms_norm(x + residual)")
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(ref_out.shape, generator=g).to(dtype).to(device)
    dres = torch.randn(ref_out.shape, generator=g).to(dtype).to(device)
    (out * dy).sum().add_((new_res * dres).sum()).backward()
    (ref_out * dy).sum().add_((ref_res * dres).sum()).backward()
    assert_close(x.grad, xr.grad, dtype, what="dx")
    assert_close(r.grad, rr.grad, dtype, what="dresidual")
    assert_close(w.grad, wr.grad, dtype, what="dweight")


def test_half_input_with_fp32_weight_casts_back_before_the_weight_like_llama(device):
    x, _, _ = _inputs((4,), 48, torch.bfloat16, device, residual=False)
    w = torch.linspace(0.5, 1.5, 48, device=device)
    out = rms_norm_triton(x.detach(), w)
    ref = rms_norm_reference(x.detach(), w)
    assert out.dtype == ref.dtype == torch.float32
    assert_close(out, ref, torch.bfloat16, what="bf16 x, fp32 weight")  # xhat is rounded to bf16


def test_matches_hugging_face_llama_rmsnorm(device):
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = modeling.LlamaRMSNorm(80, eps=1e-5).to(device)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 80))
    x = torch.randn(3, 4, 80, device=device)
    assert_close(rms_norm_triton(x, norm.weight, 1e-5), norm(x), torch.float32, what="vs LlamaRMSNorm")


def test_dispatcher_follows_llmctl_kernels(monkeypatch, device):
    x, w = torch.randn(2, 8, device=device), torch.ones(8, device=device)
    monkeypatch.setenv("LLMCTL_KERNELS", "torch")
    assert torch.equal(rms_norm(x, w), rms_norm_reference(x, w))
    monkeypatch.setenv("LLMCTL_KERNELS", "triton")
    assert_close(rms_norm(x, w), rms_norm_reference(x, w), torch.float32, what="dispatched triton")
