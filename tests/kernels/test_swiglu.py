"""SwiGLU: the Triton kernel against the torch reference, forward and gradients of gate and up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.kernels.swiglu import swiglu, swiglu_reference, swiglu_triton
from tests.kernels._check import assert_close
from tests.kernels.conftest import ON_CUDA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(3, 37), (1, 1), (2, 5, 130), (1025,)]  # odd sizes, one element, across a block boundary
if ON_CUDA:
    SHAPES += [(4, 2048, 11008), (8191, 1376)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_forward_and_gradients_match_reference(device, dtype, shape):
    g = torch.Generator().manual_seed(0)
    gate = (3 * torch.randn(shape, generator=g)).to(dtype).to(device).requires_grad_()
    up = torch.randn(shape, generator=g).to(dtype).to(device).requires_grad_()
    gate_r, up_r = (t.detach().clone().float().requires_grad_() for t in (gate, up))
    out = swiglu_triton(gate, up)
    ref = swiglu_reference(gate_r, up_r)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, what="swiglu out")
    dout = torch.randn(shape, generator=g).to(device)
    out.backward(dout.to(dtype))
    ref.backward(dout)
    assert_close(gate.grad, gate_r.grad, dtype, what="swiglu dgate")
    assert_close(up.grad, up_r.grad, dtype, what="swiglu dup")


def test_non_contiguous_inputs_and_hugging_face_mlp_formula(device):
    x = torch.randn(6, 40, device=device)
    gate, up = x[:, :20], x[:, 20:]  # column slices: not contiguous
    assert_close(swiglu_triton(gate, up), F.silu(gate) * up, torch.float32, what="vs silu(gate) * up")


def test_mismatched_shapes_are_refused(device):
    with pytest.raises(ValueError, match="gate shape"):
        swiglu_triton(torch.zeros(2, 3, device=device), torch.zeros(3, 2, device=device))


def test_dispatcher_follows_llmctl_kernels(monkeypatch, device):
    gate, up = torch.randn(4, 9, device=device), torch.randn(4, 9, device=device)
    monkeypatch.setenv("LLMCTL_KERNELS", "torch")
    ref = swiglu(gate, up)
    monkeypatch.setenv("LLMCTL_KERNELS", "triton")
    assert_close(swiglu(gate, up), ref, torch.float32, what="dispatched swiglu")
