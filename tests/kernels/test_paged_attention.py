"""Paged-attention decode: the Triton kernel against the gather-then-softmax torch reference."""

from __future__ import annotations

import pytest
import torch

from llmctl.kernels import paged_attention as pa
from tests.kernels._check import assert_close
from tests.kernels.conftest import ON_CUDA

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(
    lens,
    *,
    heads_q=4,
    heads_kv=2,
    head_dim=64,
    block_size=16,
    dtype=torch.float32,
    int8=False,
    device="cpu",
    spare_blocks=5,
    seed=0,
):
    """Random caches in a pool whose block ids are shuffled across sequences (and some left unused)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    max_blocks = max(-(-n // block_size) for n in lens)
    num_blocks = batch * max_blocks + spare_blocks
    block_tables = torch.randperm(num_blocks, generator=gen)[: batch * max_blocks].reshape(batch, max_blocks)
    k = torch.randn(num_blocks, block_size, heads_kv, head_dim, generator=gen)
    v = torch.randn(num_blocks, block_size, heads_kv, head_dim, generator=gen)
    q = torch.randn(batch, heads_q, head_dim, generator=gen)
    scales = {}
    if int8:
        k, k_scales = pa.quantize_kv_block_int8(k)
        v, v_scales = pa.quantize_kv_block_int8(v)
        scales = {"k_scales": k_scales.to(device), "v_scales": v_scales.to(device)}
    else:
        k, v = k.to(dtype), v.to(dtype)
    return (
        q.to(dtype).to(device),
        k.to(device),
        v.to(device),
        block_tables.to(torch.int32).to(device),
        torch.tensor(lens, dtype=torch.int32, device=device),
        scales,
    )


def check(inputs, dtype, what, **kw):
    q, k, v, bt, lens, scales = inputs
    out = pa.paged_decode_triton(q, k, v, bt, lens, **scales, **kw)
    ref = pa.paged_decode_reference(q, k, v, bt, lens, **scales, softmax_scale=kw.get("softmax_scale"))
    assert out.dtype == q.dtype
    assert_close(out, ref, dtype, what=what)


# lengths 1, block_size-1, block_size and several blocks (with a partial last one), in one batch
LENS = [1, 15, 16, 53]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_matches_reference_over_lengths_gqa_head_dims_and_dtypes(device, dtype, group, head_dim):
    inputs = make_inputs(LENS, heads_q=2 * group, heads_kv=2, head_dim=head_dim, dtype=dtype, device=device)
    check(inputs, dtype, f"paged_decode gqa={group} d={head_dim}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 4])
def test_int8_cache_matches_the_dequantized_reference(device, dtype, group):
    inputs = make_inputs(LENS, heads_q=2 * group, heads_kv=2, dtype=dtype, int8=True, device=device)
    check(inputs, dtype, f"paged_decode int8 gqa={group}")


@pytest.mark.parametrize("block_size", [1, 8, 12])
def test_any_block_size_works(device, block_size):
    lens = [1, block_size - 1 or 1, block_size, 3 * block_size + 2]
    inputs = make_inputs(lens, block_size=block_size, device=device)
    check(inputs, torch.float32, f"paged_decode block_size={block_size}")


@pytest.mark.parametrize("int8", [False, True])
def test_split_context_merges_to_the_same_result(device, int8):
    # 3 splits over a 64-token table: the 1-token sequence leaves two splits empty (lse = -inf).
    inputs = make_inputs([1, 40, 64, 17], heads_q=8, heads_kv=2, int8=int8, device=device)
    check(inputs, torch.float32, f"paged_decode split-K int8={int8}", num_splits=3, block_n=16)


def test_custom_softmax_scale(device):
    check(make_inputs([5, 33], device=device), torch.float32, "paged_decode scale=0.3", softmax_scale=0.3)


def test_public_function_dispatches_to_both_backends(device, monkeypatch):
    q, k, v, bt, lens, _ = make_inputs([7, 20], device=device)
    ref = pa.paged_decode_reference(q, k, v, bt, lens)
    assert_close(pa.paged_decode(q, k, v, bt, lens), ref, torch.float32, what="dispatch triton")
    monkeypatch.setenv("LLMCTL_KERNELS", "torch")
    assert torch.equal(pa.paged_decode(q, k, v, bt, lens), ref)


def test_reference_rejects_empty_or_overlong_contexts():
    q, k, v, bt, _, _ = make_inputs([3, 20])
    with pytest.raises(ValueError, match="context_lens\\[0\\] = 0"):
        pa.paged_decode_reference(q, k, v, bt, torch.tensor([0, 20], dtype=torch.int32))
    with pytest.raises(ValueError, match="context_lens\\[1\\] = 33"):
        pa.paged_decode_reference(q, k, v, bt, torch.tensor([3, 33], dtype=torch.int32))


def test_bad_shapes_and_dtypes_fail_with_clear_errors():
    q, k, v, bt, lens, _ = make_inputs([3, 20], heads_q=4, heads_kv=2)
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        pa.paged_decode_reference(q[:, :3], k, v, bt, lens)
    with pytest.raises(ValueError, match="int32"):
        pa.paged_decode_reference(q, k, v, bt.long(), lens)
    with pytest.raises(ValueError, match="need k_scales"):
        pa.paged_decode_reference(q, k.to(torch.int8), v.to(torch.int8), bt, lens)
    with pytest.raises(ValueError, match="cache dtype"):
        pa.paged_decode_reference(q, k.half(), v.half(), bt, lens)


def test_int8_quantization_round_trips_within_half_a_step():
    x = torch.randn(3, 16, 2, 64)
    x[1, :, 0] = 0.0  # an all-zero (block, head) gets scale 0 and dequantizes to zeros
    q8, scales = pa.quantize_kv_block_int8(x)
    assert q8.dtype == torch.int8 and scales.shape == (3, 2) and scales.dtype == torch.float32
    assert scales[1, 0] == 0
    deq = q8.float() * scales[:, None, :, None]
    assert (deq - x).abs().max() <= scales.max() / 2 + 1e-6


@pytest.mark.skipif(not ON_CUDA, reason="large shapes only on CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("int8", [False, True])
def test_long_contexts_on_cuda_with_automatic_splits(dtype, int8):
    # batch 2 x 8 KV heads leaves most SMs idle: the host splits the context automatically.
    inputs = make_inputs(
        [4000, 1234], heads_q=32, heads_kv=8, head_dim=128, dtype=dtype, int8=int8, device="cuda"
    )
    check(inputs, dtype, f"paged_decode long int8={int8}")
    inputs = make_inputs(
        [1, 17, 300, 2048] * 16, heads_q=32, heads_kv=8, head_dim=128, dtype=dtype, int8=int8, device="cuda"
    )
    check(inputs, dtype, f"paged_decode batch 64 int8={int8}")
