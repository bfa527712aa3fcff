"""Flash attention (Triton) against the plain-torch reference: forward and dq/dk/dv, causal or not, GQA,
packed varlen, odd lengths, head dims 16..128, fp32/fp16/bf16. Small shapes on the CPU interpreter, long
sequences only on CUDA."""

from __future__ import annotations

import pytest
import torch

from llmctl.kernels import attention as attn
from tests.kernels._check import TOLERANCE, assert_close

ON_CUDA = torch.cuda.is_available()

# Gradients go through one more rounding of P and dS to the input dtype than the output does.
GRAD_TOLERANCE = {torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}


def _inputs(shape_q, shape_kv, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(*s, generator=gen).to(device=device, dtype=dtype) for s in (shape_q, shape_kv, shape_kv)
    )
    return q, k, v


def _compare(q, k, v, *, causal, what, **kw):
    """Run the kernel (forced Triton) and the fp32 reference; compare output and the three gradients."""
    dtype = q.dtype
    q1, k1, v1 = (t.clone().requires_grad_() for t in (q, k, v))
    out = attn.flash_attention(q1, k1, v1, causal=causal, **kw)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=dtype)
    grads = torch.autograd.grad(out, (q1, k1, v1), dout)

    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attn.attention_reference(q2, k2, v2, causal=causal, **kw)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2), dout.float())

    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out.float(), ref, dtype, tol=TOLERANCE[dtype], what=f"{what} out")
    for name, g, r, t in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v), strict=True):
        assert g.dtype == dtype and g.shape == t.shape
        assert_close(g.float(), r, dtype, tol=GRAD_TOLERANCE[dtype], what=f"{what} {name}")


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, dtype)
CPU_CASES = [
    (1, 2, 2, 1, 1, 64, True, torch.float32),  # a single token
    (2, 2, 1, 17, 17, 64, True, torch.float32),  # GQA 2, odd length
    (1, 4, 1, 64, 64, 32, False, torch.float32),  # GQA 4 (MQA), not causal, several blocks
    (1, 2, 1, 100, 100, 128, True, torch.float32),  # head dim 128, causal over several blocks
    (1, 2, 2, 33, 33, 80, False, torch.float32),  # head dim padded to 128
    (1, 2, 1, 50, 50, 64, True, torch.float16),
    (1, 2, 1, 70, 70, 96, True, torch.bfloat16),
    (1, 2, 2, 17, 40, 64, True, torch.float32),  # more keys than queries: bottom-right aligned
    (1, 2, 1, 40, 17, 32, True, torch.float32),  # more queries than keys: leading rows see nothing
    (1, 2, 2, 23, 57, 16, False, torch.float32),
]
# On CUDA: long sequences at the real tile sizes; few distinct (head dim, causal, dtype) combinations, since
# each compiles its own kernels (the whole kernel suite gets one short run on the GPU machine).
CUDA_CASES = [
    (2, 8, 2, 1024, 1024, 128, True, torch.bfloat16),
    (1, 8, 8, 2048, 2048, 128, True, torch.float16),
    (2, 8, 4, 1000, 1000, 64, False, torch.bfloat16),
    (1, 4, 1, 777, 777, 96, True, torch.float32),
    (2, 4, 4, 300, 1100, 128, True, torch.bfloat16),
    (1, 4, 2, 1100, 300, 128, True, torch.bfloat16),
    (3, 4, 2, 1, 1, 128, True, torch.bfloat16),
    (2, 4, 1, 17, 17, 128, True, torch.bfloat16),
    (1, 2, 2, 100, 100, 64, False, torch.bfloat16),
]


def _case_id(case):
    b, hq, hk, sq, sk, d, causal, dtype = case
    return f"b{b}-h{hq}/{hk}-s{sq}x{sk}-d{d}-{'causal' if causal else 'full'}-{str(dtype).split('.')[-1]}"


@pytest.mark.parametrize("case", CUDA_CASES if ON_CUDA else CPU_CASES, ids=_case_id)
def test_batched_forward_and_gradients_match_the_reference(case, device):
    b, hq, hk, sq, sk, d, causal, dtype = case
    q, k, v = _inputs((b, hq, sq, d), (b, hk, sk, d), dtype, device)
    _compare(q, k, v, causal=causal, what=_case_id(case))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_varlen_matches_the_reference_segment_by_segment(causal, device):
    lengths = [1, 17, 40, 2] if not ON_CUDA else [1, 17, 1000, 2, 333, 2048, 129]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total = int(cu[-1])
    if ON_CUDA:
        configs = [(8, 2, 128, torch.bfloat16)] + ([(4, 4, 80, torch.float16)] if causal else [])
    else:
        configs = [(4, 2, 64, torch.float32)] if causal else [(2, 1, 32, torch.bfloat16)]
    for hq, hk, d, dtype in configs:
        q, k, v = _inputs((total, hq, d), (total, hk, d), dtype, device)
        _compare(
            q, k, v, causal=causal, cu_seqlens=cu, max_seqlen=max(lengths),
            what=f"varlen h{hq}/{hk} d{d} {dtype}",
        )  # fmt: skip


def test_packed_examples_never_see_each_other(device):
    cu = torch.tensor([0, 5, 6, 30], dtype=torch.int32, device=device)
    q, k, v = _inputs((30, 2, 32), (30, 1, 32), torch.float32, device)
    out = attn.flash_attention(q, k, v, causal=False, cu_seqlens=cu)  # max_seqlen computed
    k2, v2 = k.clone(), v.clone()
    k2[6:] += 3.0  # change only the last example's keys and values
    v2[6:] -= 1.0
    out2 = attn.flash_attention(q, k2, v2, causal=False, cu_seqlens=cu)
    assert torch.equal(out[:6], out2[:6])
    assert not torch.allclose(out[6:], out2[6:])
    # each packed example equals the batched kernel on that example alone
    alone = attn.flash_attention(q[:5].transpose(0, 1)[None], k[:5].transpose(0, 1)[None],
                                 v[:5].transpose(0, 1)[None], causal=False)  # fmt: skip
    assert_close(out[:5], alone[0].transpose(0, 1), what="packed example vs alone")


def test_rows_that_see_no_key_output_zeros_and_zero_gradients(device):
    q, k, v = _inputs((1, 2, 9, 32), (1, 2, 4, 32), torch.float32, device)
    q.requires_grad_()
    out = attn.flash_attention(q, k, v, causal=True)  # bottom-right: the first 5 queries see no key
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.equal(dq[:, :, :5], torch.zeros_like(dq[:, :, :5]))


@pytest.mark.skipif(ON_CUDA, reason="on CUDA every test runs the real tile sizes")
def test_gpu_tile_sizes_also_give_the_reference_under_the_interpreter(monkeypatch, device):
    """CUDA-like block shapes (128x64 forward, 32x128 / 128x32 backward) on sequences spanning blocks."""
    monkeypatch.setattr(attn, "_fwd_blocks", lambda dtype, block_d, device: (128, 64, 8, 3))
    monkeypatch.setattr(attn, "_bwd_blocks", lambda dtype, block_d: (32, 128, 128, 32, 8, 2))
    q, k, v = _inputs((1, 2, 200, 64), (1, 1, 200, 64), torch.float32, device)
    _compare(q, k, v, causal=True, what="gpu tiles causal")
    q, k, v = _inputs((1, 2, 70, 32), (1, 2, 150, 32), torch.float32, device)
    _compare(q, k, v, causal=True, what="gpu tiles causal 70x150")


def test_softmax_scale_is_honoured(device):
    q, k, v = _inputs((1, 2, 20, 32), (1, 2, 20, 32), torch.float32, device)
    _compare(q, k, v, causal=True, softmax_scale=0.05, what="scale 0.05")


def test_the_reference_agrees_with_torch_sdpa():
    q, k, v = _inputs((2, 4, 19, 16), (2, 2, 19, 16), torch.float32, "cpu")
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    for causal in (True, False):
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=causal)
        assert_close(
            attn.attention_reference(q, k, v, causal=causal), sdpa, what=f"reference causal={causal}"
        )
    # non-square causal: bottom-right alignment is SDPA with an explicit tril(diagonal=seq_k - seq_q) mask
    q2 = q[:, :, :7]
    mask = torch.ones(7, 19, dtype=torch.bool).tril(diagonal=12)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q2, kk, vv, attn_mask=mask)
    assert_close(attn.attention_reference(q2, k, v, causal=True), sdpa, what="reference bottom-right")


def test_dispatch_runs_the_reference_when_torch_is_forced(monkeypatch):
    monkeypatch.setenv("LLMCTL_KERNELS", "torch")
    q, k, v = _inputs((1, 2, 5, 16), (1, 1, 5, 16), torch.float32, "cpu")
    assert torch.equal(attn.flash_attention(q, k, v), attn.attention_reference(q, k, v))


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((1, 3, 4, 16), (1, 2, 4, 16)), "multiple"),
        (((1, 2, 4, 16), (1, 2, 4, 32)), "head_dim"),
        (((2, 4, 16), (2, 4, 16)), "batch, heads"),
        (((1, 2, 4, 160), (1, 2, 4, 160)), "160 > 128"),
    ],
)
def test_bad_shapes_are_refused_with_a_plain_message(shapes, message, device):
    q = torch.zeros(shapes[0], device=device)
    k = torch.zeros(shapes[1], device=device)
    with pytest.raises(ValueError, match=message):
        attn.flash_attention(q, k, k)
