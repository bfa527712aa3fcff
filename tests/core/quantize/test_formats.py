"""Packing and on-disk layouts: round trips for every format and bit width, byte-identity with the
anchors' packers (compressed-tensors' own functions where installed, otherwise their documented loops
reproduced here), and configs that transformers recognises."""

import pytest
import torch

from llmctl.core.quantize import formats as F
from llmctl.core.quantize.rtn import rtn_quantize


def _random_qw(n=64, k=128, bits=4, group_size=32, sym=False, act_order=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = k // group_size
    maxq = 2**bits - 1
    g_idx = F.natural_g_idx(k, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    zeros = torch.randint(0, maxq + 1, (n, g), generator=gen, dtype=torch.int32)
    if sym:
        zeros = torch.full((n, g), (maxq + 1) // 2, dtype=torch.int32)
    return F.QuantizedWeight(
        qweight=torch.randint(0, maxq + 1, (n, k), generator=gen).to(torch.uint8),
        scales=(torch.rand(n, g, generator=gen) + 0.01).half().float(),  # fp16-exact, as files hold
        zeros=zeros, g_idx=g_idx, bits=bits, group_size=group_size, sym=sym,
    )  # fmt: skip


def _same(a: F.QuantizedWeight, b: F.QuantizedWeight):
    assert torch.equal(a.qweight.to(torch.int32), b.qweight.to(torch.int32))
    assert torch.equal(a.zeros.to(torch.int32), b.zeros.to(torch.int32))
    assert torch.equal(a.g_idx, b.g_idx)
    assert torch.allclose(a.scales, b.scales)
    assert torch.allclose(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_rows_round_trips_every_bit_width(bits):
    values = torch.randint(0, 2**bits, (96, 5), generator=torch.Generator().manual_seed(bits))
    packed = F.pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 5)
    assert torch.equal(F.unpack_rows(packed, bits, 96), values.to(torch.int32))


def test_pack_rows_puts_value_i_at_bit_i_times_bits():
    # 4-bit: eight values 1..8 in one word -> 0x87654321; the top nibble 8 makes it negative as int32
    column = torch.arange(1, 9)[:, None]
    assert F.pack_rows(column, 4).item() == 0x87654321 - 2**32
    # 3-bit: value 10 straddles words 0 and 1 (AutoGPTQ's 10 + 2/1 + 10 + 1/2 + 10 layout)
    values = torch.zeros(32, 1, dtype=torch.int64)
    values[10] = 0b101
    words = F.pack_rows(values, 3)[:, 0].tolist()
    assert words[0] == 0b01 << 30 and words[1] == 0b1 and words[2] == 0


def _autogptq_pack_reference(intweight_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's documented qweight packing loop (``QuantLinear.pack``), written out for the test."""
    import numpy as np

    iw = intweight_kn.numpy().astype(np.uint32)
    out = np.zeros((iw.shape[0] // 32 * bits, iw.shape[1]), dtype=np.uint32)
    i = row = 0
    if bits in (2, 4, 8):
        while row < out.shape[0]:
            for j in range(i, i + 32 // bits):
                out[row] |= iw[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
    else:  # 3 bits: 10 values, one split 2/1, 10 values, one split 1/2, 10 values
        while row < out.shape[0]:
            for j in range(i, i + 10):
                out[row] |= iw[j] << (3 * (j - i))
            i += 10
            out[row] |= iw[i] << 30
            row += 1
            out[row] |= (iw[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                out[row] |= iw[j] << (3 * (j - i) + 1)
            i += 10
            out[row] |= iw[i] << 31
            row += 1
            out[row] |= (iw[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                out[row] |= iw[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return torch.from_numpy(out.astype(np.int64)).apply_(lambda v: v - 2**32 if v >= 2**31 else v).int()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_qweight_is_byte_identical_to_autogptqs_packing_loop(bits):
    qw = _random_qw(bits=bits, k=192, group_size=64, sym=True)
    expected = _autogptq_pack_reference(qw.qweight.T.to(torch.int64).contiguous(), bits)
    assert torch.equal(F.to_gptq(qw)["qweight"], expected)


def test_gptq_qzeros_store_zero_minus_one_and_read_back_exactly():
    qw = _random_qw(bits=4, sym=False)
    qw.zeros[0, 0] = 0  # v1 stores -1: all ones in the field
    t = F.to_gptq(qw)
    assert t["qzeros"].shape == (qw.scales.shape[1], qw.shape[0] * 4 // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (qw.scales.shape[1], qw.shape[0])
    fields = F.unpack_rows(t["qzeros"].T.contiguous(), 4, qw.shape[0])  # [N, G]
    assert torch.equal(fields, (qw.zeros - 1) & 0xF)
    _same(F.from_gptq(t, bits=4, group_size=32, sym=False), qw)


def test_zero_points_of_zero_move_to_one_for_gptq_v1():
    w = torch.tensor([[0.0, 0.1, 0.2, 0.3, -0.3, 0.0, 0.1, 0.2]])
    qw = rtn_quantize(w, bits=4, group_size=4, sym=False)
    assert qw.zeros.tolist() == [[0, 9]]  # the first group has no negative weight
    before = qw.dequantize()
    assert F.v1_representable(qw) == 1
    assert qw.zeros.tolist() == [[1, 9]] and qw.qweight[0, :4].tolist() == [1, 6, 11, 15]
    assert torch.allclose(qw.dequantize(), before, atol=0.3 / 15 + 1e-6)  # the top value is clipped a step
    assert int((qw.zeros - 1).min()) >= 0  # every stored zero - 1 fits the unsigned field


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_format_round_trips(bits, act_order):
    qw = _random_qw(bits=bits, act_order=act_order, sym=bits == 3)
    t = F.to_gptq(qw)
    assert t["g_idx"].dtype == torch.int32 and torch.equal(t["g_idx"], qw.g_idx)
    _same(F.from_gptq(t, bits=bits, group_size=32, sym=qw.sym), qw)


def test_awq_qweight_matches_autoawqs_order_map_loop():
    qw = _random_qw(bits=4, sym=False)
    t = F.to_awq(qw)
    intweight = qw.qweight.T.to(torch.int64)  # [K, N]
    n = qw.shape[0]
    expected = torch.zeros(qw.shape[1], n // 8, dtype=torch.int64)
    for col in range(n // 8):  # AutoAWQ WQLinear_GEMM.from_linear, written out
        for i, order in enumerate(F.AWQ_ORDER):
            expected[:, col] |= intweight[:, col * 8 + order] << (i * 4)
    expected = torch.where(expected >= 2**31, expected - 2**32, expected).to(torch.int32)
    assert torch.equal(t["qweight"], expected)
    _same(F.from_awq(t, group_size=32), qw)


def test_awq_tensors_unpack_with_compressed_tensors_autoawq_converter():
    converters = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.autoawq")
    conv = converters.AutoAWQConverter
    qw = _random_qw(bits=4, sym=False)
    t = F.to_awq(qw)
    iw, iz = conv.reverse_awq_order(*conv.unpack_awq(t["qweight"], t["qzeros"], 4), 4)
    assert torch.equal(iw.to(torch.int32) & 0xF, qw.qweight.T.to(torch.int32))
    assert torch.equal(iz.to(torch.int32) & 0xF, qw.zeros.T)


def test_awq_format_refuses_act_order_and_other_bit_widths():
    from llmctl.core.errors import UsageError

    with pytest.raises(UsageError, match="act-order"):
        F.to_awq(_random_qw(act_order=True))
    with pytest.raises(UsageError, match="4-bit"):
        F.to_awq(_random_qw(bits=8))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_packing_is_byte_identical_to_pack_to_int32(bits, sym):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    qw = _random_qw(bits=bits, sym=sym)
    t = F.to_compressed_tensors(qw)
    offset = 2 ** (bits - 1)
    signed = (qw.qweight.to(torch.int32) - offset).to(torch.int8)
    assert torch.equal(t["weight_packed"], helpers.pack_to_int32(signed, bits))
    assert torch.equal(t["weight_shape"], torch.tensor(qw.shape))
    if not sym:
        zp = (qw.zeros - offset).to(torch.int8)
        assert torch.equal(t["weight_zero_point"], helpers.pack_to_int32(zp, bits, packed_dim=0))
    else:
        assert "weight_zero_point" not in t
    back = F.from_compressed_tensors(t, bits=bits, group_size=32)
    _same(back, qw)


def test_fp8_weights_round_trip_through_compressed_tensors():
    from llmctl.core.quantize.rtn import fp8_quantize

    w = torch.randn(16, 32)
    qw = fp8_quantize(w)
    assert qw.qweight.dtype == torch.float8_e4m3fn and qw.scales.shape == (16, 1)
    assert (qw.qweight.float().abs().amax(dim=1) == 448).all()  # every row's largest weight maps to 448
    back = F.from_compressed_tensors(F.to_compressed_tensors(qw), bits=8, group_size=-1)
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert torch.allclose(qw.dequantize(), w, rtol=0.07, atol=1e-3)  # e4m3 has 3 mantissa bits


def test_configs_are_recognised_by_transformers():
    from transformers.utils.quantization_config import AwqConfig, GPTQConfig

    gptq = F.quantization_config("gptq", bits=4, group_size=64, sym=True, act_order=True)
    parsed = GPTQConfig.from_dict(gptq)
    assert (parsed.bits, parsed.group_size, parsed.desc_act, parsed.sym) == (4, 64, True, True)
    assert parsed.format == "gptq"
    awq = AwqConfig.from_dict(F.quantization_config("awq", bits=4, group_size=128, sym=False))
    assert (awq.bits, awq.group_size, awq.zero_point) == (4, 128, True)


def test_rtn_tensors_survive_every_writer_and_reader():
    w = torch.randn(64, 128)
    for fmt, sym in (("gptq", True), ("gptq", False), ("awq", False), ("compressed-tensors", True)):
        qw = rtn_quantize(w, bits=4, group_size=32, sym=sym)
        qw.scales = qw.scales.half().float()  # the files hold fp16 scales
        qc = F.quantization_config(fmt, bits=4, group_size=32, sym=sym)
        back = F.read_layer(fmt, qc, F.WRITERS[fmt](qw))
        _same(back, qw)
