"""W4A16 dequantize-matmul: packing layouts against the anchors' documented packers, the Triton GEMV/GEMM
paths against the torch reference and a float matmul of the dequantized weight, and W4A16Linear.

The anchor packers (AutoGPTQ's ``QuantLinear.pack``, AutoAWQ's ``WQLinear_GEMM.from_linear``,
compressed-tensors' ``pack_to_int32``) do not install on this machine, so their documented loops are
reproduced below as slow per-element packers and the vectorised helpers must match them bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from llmctl.kernels import w4a16 as wq
from tests.kernels._check import assert_close

ON_CUDA = torch.cuda.is_available()


# --- slow packers written from the anchors' documented loops ---------------------------------------------


def _u32(t):
    return t.to(torch.int64) & 0xFFFFFFFF


def _loop_pack_rows(values, bits):
    """AutoGPTQ: qweight[row] |= intweight[j] << bits*(j - i) over 32/bits rows; 3-bit as a 96-bit stream."""
    k, n = values.shape
    v = _u32(values)
    if bits == 3:
        out = torch.zeros(k // 32 * 3, n, dtype=torch.int64)
        for j in range(k):
            pos = (j % 32) * 3
            word = j // 32 * 3 + pos // 32
            off = pos % 32
            out[word] |= (v[j] << off) & 0xFFFFFFFF
            if off + 3 > 32:
                out[word + 1] |= v[j] >> (32 - off)
    else:
        per = 32 // bits
        out = torch.zeros(k // per, n, dtype=torch.int64)
        for j in range(k):
            out[j // per] |= v[j] << (bits * (j % per))
    return out


def _loop_pack_awq(values):
    """AutoAWQ: qweight[:, col] |= intweight[:, col*8 + order_map[i]] << 4*i."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    v = _u32(values)
    out = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for col in range(v.shape[1] // 8):
        for i in range(8):
            out[:, col] |= v[:, col * 8 + order_map[i]] << (i * 4)
    return out


def _loop_pack_ct(signed, bits, packed_dim):
    """compressed-tensors pack_to_int32: value + 2**(bits-1), then packed |= value[i::f] << bits*i."""
    v = _u32(signed.to(torch.int64) + (1 << (bits - 1)))
    f = 32 // bits
    if packed_dim == 1:
        out = torch.zeros(v.shape[0], v.shape[1] // f, dtype=torch.int64)
        for i in range(f):
            out |= v[:, i::f] << (bits * i)
    else:
        out = torch.zeros(v.shape[0] // f, v.shape[1], dtype=torch.int64)
        for i in range(f):
            out |= v[i::f, :] << (bits * i)
    return out


# --- random logical weights -------------------------------------------------------------------------------


def _logical(k, n, group_size, *, bits=4, act_order=False, sym=False, seed=0, zmin=0):
    gen = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    groups = k // gs
    maxq = 2**bits - 1
    q = torch.randint(0, maxq + 1, (k, n), generator=gen, dtype=torch.int32)
    if sym:
        zeros = torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(zmin, maxq + 1, (groups, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.005).to(torch.float16)
    g_idx = None
    if act_order:  # GPTQ act-order: rows visited in a random order, g_idx = group of each row's position
        perm = torch.randperm(k, generator=gen)
        g_idx = (torch.argsort(perm) // gs).to(torch.int32)
    return q, zeros, scales, g_idx


def _dense(q, zeros, scales, g_idx, group_size):
    """w [K, N] in fp32, written directly from the definition (independent of the module)."""
    k = q.shape[0]
    gs = k if group_size == -1 else group_size
    g = (torch.arange(k) // gs) if g_idx is None else g_idx.long()
    return (q.float() - zeros.float()[g]) * scales.float()[g]


def _pack(layout, q, zeros, scales, g_idx, group_size):
    """(qweight, scales, qzeros, g_idx) as ``w4a16_matmul`` takes them for ``layout``."""
    if layout in ("gptq", "gptq_v2"):
        qw, qz, sc, gi = wq.pack_gptq(q, zeros, scales, g_idx, group_size=group_size, v1=layout == "gptq")
        return qw, sc, qz, g_idx if g_idx is None else gi
    if layout == "awq":
        qw, qz, sc = wq.pack_awq(q, zeros, scales)
        return qw, sc, qz, g_idx
    t = wq.pack_compressed_tensors(q, scales, zeros, g_idx)
    return t["weight_packed"], t["weight_scale"], t["weight_zero_point"], t.get("weight_g_idx")


# --- packing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_packing_matches_autogptq_loops_and_round_trips(bits):
    k, n, gs = 64, 96, 32
    q, zeros, scales, g_idx = _logical(k, n, gs, bits=bits, act_order=True, zmin=1)
    qweight, qzeros, sc, gi = wq.pack_gptq(q, zeros, scales, g_idx, bits=bits, group_size=gs)
    assert qweight.dtype == qzeros.dtype == torch.int32 and sc.dtype == torch.float16
    assert torch.equal(_u32(qweight), _loop_pack_rows(q, bits))
    assert torch.equal(_u32(qzeros), _loop_pack_rows((zeros - 1).t(), bits).t())  # v1 stores zero - 1
    q2, z2, s2, g2 = wq.unpack_gptq(qweight, qzeros, sc, gi, bits=bits, group_size=gs)
    assert (
        torch.equal(q2, q) and torch.equal(z2, zeros) and torch.equal(s2, scales) and torch.equal(g2, g_idx)
    )
    # v2 keeps zeros as they are, 0 included
    qw2, qz2, _, _ = wq.pack_gptq(q, zeros - 1, scales, bits=bits, group_size=gs, v1=False)
    assert torch.equal(qw2, qweight) and torch.equal(qz2, qzeros)


def test_gptq_bit_positions_are_as_documented():
    q = torch.zeros(8, 8, dtype=torch.int32)
    q[5, 2] = 0xA  # row k lives in bits 4*(k % 8) of qweight[k // 8]
    zeros = torch.ones(1, 8, dtype=torch.int32)
    zeros[0, 3] = 7  # zeros packed along N, stored minus one
    qweight, qzeros, _, _ = wq.pack_gptq(q, zeros, torch.ones(1, 8), group_size=8)
    assert int(qweight[0, 2]) == 0xA << 20 and int(qweight[0, 0]) == 0
    assert int(qzeros[0, 0]) == 6 << 12


def test_gptq_v1_cannot_store_a_zero_point_of_zero():
    q, zeros, scales, _ = _logical(32, 8, 32)
    zeros[0, 0] = 0
    with pytest.raises(ValueError, match="zero point of 0"):
        wq.pack_gptq(q, zeros, scales, group_size=32)


def test_awq_packing_matches_autoawq_order_map_and_round_trips():
    q, zeros, scales, _ = _logical(64, 48, 32)
    qweight, qzeros, sc = wq.pack_awq(q, zeros, scales)
    assert qweight.shape == (64, 6) and qzeros.shape == (2, 6)
    assert torch.equal(_u32(qweight), _loop_pack_awq(q))
    assert torch.equal(_u32(qzeros), _loop_pack_awq(zeros))
    q2, z2, s2 = wq.unpack_awq(qweight, qzeros, sc)
    assert torch.equal(q2, q) and torch.equal(z2, zeros) and torch.equal(s2, scales)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_packing_matches_pack_to_int32_and_round_trips(bits, sym):
    k, n, gs = 64, 32, 16
    q, zeros, scales, g_idx = _logical(k, n, gs, bits=bits, sym=sym, act_order=True)
    t = wq.pack_compressed_tensors(q, scales, None if sym else zeros, g_idx, bits=bits)
    signed = q.t() - 2 ** (bits - 1)  # the format's int8 values, [out, in]
    assert t["weight_packed"].shape == (n, k * bits // 32)
    assert torch.equal(_u32(t["weight_packed"]), _loop_pack_ct(signed, bits, packed_dim=1))
    assert t["weight_scale"].shape == (n, k // gs)
    assert t["weight_shape"].tolist() == [n, k]
    if sym:
        assert "weight_zero_point" not in t
    else:
        expected = _loop_pack_ct(zeros.t() - 2 ** (bits - 1), bits, packed_dim=0)
        assert torch.equal(_u32(t["weight_zero_point"]), expected)
    q2, z2, s2, g2 = wq.unpack_compressed_tensors(t, bits=bits)
    assert torch.equal(q2, q) and torch.equal(s2, scales) and torch.equal(g2, g_idx)
    assert z2 is None if sym else torch.equal(z2, zeros)


# --- the kernels ------------------------------------------------------------------------------------------

# (layout, M, K, N, group_size, act_order, dtype, sym): K and N multiples of 8 and of the group size but
# not of the tiles; every layout at M = 1 (GEMV) and M > 1 (GEMM, split-K), per-channel, act-order.
F16, BF16 = torch.float16, torch.bfloat16
CASES = [
    ("gptq", 1, 384, 72, 128, False, F16, False),
    ("gptq", 3, 384, 72, 128, False, BF16, False),
    ("gptq", 16, 160, 88, 32, False, F16, True),
    ("gptq", 33, 160, 88, 32, False, BF16, False),
    ("gptq", 1, 200, 40, -1, False, BF16, False),
    ("gptq", 33, 200, 40, -1, False, F16, False),
    ("gptq", 1, 192, 72, 32, True, F16, False),
    ("gptq", 16, 192, 72, 32, True, BF16, False),
    ("gptq", 3, 192, 56, 64, True, F16, True),
    ("gptq_v2", 3, 256, 64, 128, False, F16, False),
    ("awq", 1, 256, 72, 128, False, F16, False),
    ("awq", 33, 160, 72, 32, False, BF16, False),
    ("compressed-tensors", 1, 160, 72, 32, False, BF16, False),
    ("compressed-tensors", 16, 256, 72, 128, False, F16, True),
    ("compressed-tensors", 3, 192, 40, 32, True, F16, False),
]
if ON_CUDA:
    CASES += [
        ("gptq", m, k, n, gs, act, dt, False)
        for m in (1, 7, 64, 256)
        for (k, n, gs, act) in ((4096, 4104, 128, False), (2048, 1032, 32, True), (1000, 1024, -1, False))
        for dt in (F16, BF16)
    ]


def _case_id(c):
    layout, m, k, n, gs, act, dt, sym = c
    return f"{layout}-M{m}-K{k}-N{n}-g{gs}{'-act' if act else ''}-{str(dt)[6:]}{'-sym' if sym else ''}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_triton_matches_reference_and_dense_matmul(case, device):
    layout, m, k, n, gs, act, dtype, sym = case
    q, zeros, scales, g_idx = _logical(k, n, gs, act_order=act, sym=sym, zmin=1 if layout == "gptq" else 0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = (torch.randn(n, generator=gen) * 0.1).to(dtype) if m % 2 else None
    w = _dense(q, zeros, scales, g_idx, gs)
    dense = x.float() @ w + (0 if bias is None else bias.float())
    packed = [t if t is None else t.to(device) for t in _pack(layout, q, zeros, scales, g_idx, gs)]
    x, bias = x.to(device), None if bias is None else bias.to(device)

    out = wq.w4a16_matmul(x, *packed, bias=bias, layout=layout, group_size=gs)  # Triton (conftest forces it)
    qw, sc, qz, gi, offset = wq.to_kernel_layout(layout, *packed)
    ref = wq.w4a16_reference(x, qw, sc, qz, gi, bias, gs, 4, offset)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close(out.float(), ref.float(), dtype, what=f"{_case_id(case)} vs reference")
    assert_close(out.float().cpu(), dense, dtype, what=f"{_case_id(case)} vs dense matmul")


def test_leading_dims_and_fp32_activations(device):
    q, zeros, scales, _ = _logical(128, 48, 64, zmin=1)
    qw, qz, sc, _ = wq.pack_gptq(q, zeros, scales, group_size=64)
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(2))
    out = wq.w4a16_matmul(x.to(device), qw.to(device), sc.to(device), qz.to(device), group_size=64)
    expected = x @ _dense(q, zeros, scales, None, 64)
    assert out.shape == (2, 3, 48)
    assert_close(out.cpu(), expected, torch.float32, tol=1e-5, what="fp32 [2, 3, K]")


@pytest.mark.parametrize("m", [1, 5])
def test_gradient_to_activations_matches_reference(m, device):
    q, zeros, scales, g_idx = _logical(160, 40, 32, act_order=True, zmin=1)
    packed = [t.to(device) for t in wq.pack_gptq(q, zeros, scales, g_idx, group_size=32)]
    qw, qz, sc, gi = packed
    bias = torch.randn(40, device=device, requires_grad=True)
    x = torch.randn(m, 160, device=device, requires_grad=True)
    out = wq.w4a16_matmul(x, qw, sc, qz, gi, bias=bias, group_size=32)
    grad_y = torch.randn_like(out)
    out.backward(grad_y)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = bias.detach().clone().requires_grad_(True)
    ref = wq.w4a16_reference(x_ref, qw, sc, qz, gi, b_ref, 32, 4, 1)
    ref.backward(grad_y)
    assert_close(out, ref, torch.float32, tol=1e-5, what="forward")
    assert_close(x.grad, x_ref.grad, torch.float32, tol=1e-5, what="grad x")
    assert_close(bias.grad, b_ref.grad, torch.float32, tol=1e-5, what="grad bias")


@pytest.mark.parametrize("bits", [3, 8])
def test_other_bit_widths_run_the_reference_under_triton(bits, device):
    q, zeros, scales, _ = _logical(64, 32, 32, bits=bits, zmin=1)
    qw, qz, sc, _ = wq.pack_gptq(q, zeros, scales, bits=bits, group_size=32)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3)).half()
    out = wq.w4a16_matmul(x.to(device), qw.to(device), sc.to(device), qz.to(device), group_size=32, bits=bits)
    assert_close(out.float().cpu(), x.float() @ _dense(q, zeros, scales, None, 32), torch.float16)


def test_torch_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("LLMCTL_KERNELS", "torch")
    q, zeros, scales, _ = _logical(64, 16, 32, zmin=1)
    qw, qz, sc, _ = wq.pack_gptq(q, zeros, scales, group_size=32)
    x = torch.randn(2, 64).half()
    out = wq.w4a16_matmul(x, qw, sc, qz, group_size=32)
    assert torch.equal(out, wq.w4a16_reference(x, qw, sc, qz, None, None, 32, 4, 1))
    assert "w4a16_matmul" in __import__("llmctl.kernels", fromlist=["x"]).available_kernels()


def test_bad_shapes_fail_with_a_clear_message():
    q, zeros, scales, _ = _logical(64, 16, 32, zmin=1)
    qw, qz, sc, _ = wq.pack_gptq(q, zeros, scales, group_size=32)
    with pytest.raises(ValueError, match="does not match in_features"):
        wq.w4a16_matmul(torch.randn(1, 72).half(), qw, sc, qz, group_size=32)
    with pytest.raises(ValueError, match="groups of 16"):
        wq.w4a16_matmul(torch.randn(1, 64).half(), qw, sc, qz, group_size=16)
    with pytest.raises(ValueError, match="unknown layout"):
        wq.w4a16_matmul(torch.randn(1, 64).half(), qw, sc, qz, layout="exl2")


# --- W4A16Linear ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_linear_from_float_is_a_close_rtn_copy_of_the_layer(sym, group_size, device):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40).to(device)
    layer = W = wq.W4A16Linear.from_float(linear, bits=4, group_size=group_size, sym=sym)
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert W.qweight.shape == (12, 40) and W.scales.dtype == torch.float16
    x = torch.randn(5, 96, device=device).half()
    out = layer(x)
    dense = torch.nn.functional.linear(x.float(), layer.dequantize_weight(), layer.bias.float())
    assert_close(out.float(), dense, torch.float16, what="forward vs dequantized weight")
    quant_err = (layer.dequantize_weight() - linear.weight).norm() / linear.weight.norm()
    assert quant_err < 0.15, f"RTN 4-bit error {quant_err:.3f} is too large"
    fresh = wq.W4A16Linear(96, 40, group_size=group_size).to(device)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), out)


def test_linear_loads_every_layout_to_the_same_function(device):
    q, zeros, scales, _ = _logical(128, 32, 64, zmin=1)
    bias = torch.randn(32).half()
    qw, qz, sc, gi = wq.pack_gptq(q, zeros, scales, group_size=64)
    from_gptq = wq.W4A16Linear.from_gptq(qw, qz, sc, gi, bias, group_size=64)
    awq = wq.pack_awq(q, zeros, scales)
    from_awq = wq.W4A16Linear.from_awq(*awq, bias, group_size=64)
    ct = wq.pack_compressed_tensors(q, scales, zeros)
    from_ct = wq.W4A16Linear.from_compressed_tensors(ct, bias, group_size=64)
    x = torch.randn(3, 128).half().to(device)
    outs = [m.to(device)(x) for m in (from_gptq, from_awq, from_ct)]
    for other in outs[1:]:
        assert_close(other.float(), outs[0].float(), torch.float16, tol=1e-3, what="same weights, layouts")
    for m in (from_gptq, from_awq, from_ct):
        assert torch.equal(m.dequantize_weight().cpu(), _dense(q, zeros, scales, None, 64).t())


def test_linear_with_act_order_g_idx_uses_it(device):
    q, zeros, scales, g_idx = _logical(128, 24, 32, act_order=True, zmin=1)
    qw, qz, sc, gi = wq.pack_gptq(q, zeros, scales, g_idx, group_size=32)
    layer = wq.W4A16Linear.from_gptq(qw, qz, sc, gi, group_size=32).to(device)
    x = torch.randn(1, 128).half()
    out = layer(x.to(device))
    assert_close(out.float().cpu(), x.float() @ _dense(q, zeros, scales, g_idx, 32), torch.float16)


def test_linear_from_integers_keeps_a_zero_point_of_zero(device):
    q, zeros, scales, g_idx = _logical(64, 16, 32, bits=4, act_order=True)
    zeros[0, :4] = 0  # representable in GPTQ v2 (zero_offset 0), not in v1
    layer = wq.W4A16Linear.from_integers(q, zeros, scales, g_idx, group_size=32).to(device)
    assert layer.zero_offset == 0
    x = torch.randn(3, 64).half()
    out = layer(x.to(device))
    assert_close(out.float().cpu(), x.float() @ _dense(q, zeros, scales, g_idx, 32), torch.float16)
