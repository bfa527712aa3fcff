"""RTN and GPTQ on single linear layers: hand-checked cases, the error GPTQ exists to reduce, act-order."""

import pytest
import torch

from llmctl.core.errors import UsageError
from llmctl.core.quantize.formats import natural_g_idx
from llmctl.core.quantize.gptq import HessianAccumulator, gptq_quantize
from llmctl.core.quantize.rtn import rtn_quantize


def test_rtn_matches_a_hand_computed_symmetric_and_asymmetric_row():
    w = torch.tensor([[-0.6, 0.0, 0.27, 0.75]])
    sym = rtn_quantize(w, bits=4, group_size=-1, sym=True)
    # scale = 2*max|w|/15 = 0.1, zero = 8; w/scale = -6, 0, 2.7, 7.5 -> q = 2, 8, 11, 15 (16 clamps)
    assert sym.scales.item() == pytest.approx(0.1)
    assert sym.zeros.item() == 8
    assert sym.qweight.tolist() == [[2, 8, 11, 15]]
    asym = rtn_quantize(w, bits=4, group_size=-1, sym=False)
    # range [-0.6, 0.75]: scale 0.09, zero round(6.67) = 7; w/scale = -6.67, 0, 3, 8.33
    assert asym.scales.item() == pytest.approx(0.09)
    assert asym.zeros.item() == 7 and asym.qweight.tolist() == [[0, 7, 10, 15]]
    pos = rtn_quantize(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), bits=2, group_size=-1, sym=False)
    assert pos.scales.item() == pytest.approx(1.0) and pos.zeros.item() == 0
    assert pos.qweight.tolist() == [[0, 1, 2, 3]] and torch.equal(
        pos.dequantize(), torch.tensor([[0.0, 1, 2, 3]])
    )


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_within_half_a_step_per_group(bits, sym):
    w = torch.randn(32, 64)
    qw = rtn_quantize(w, bits=bits, group_size=16, sym=sym)
    step = qw.scales[:, natural_g_idx(64, 16).long()]
    err = (qw.dequantize() - w).abs()
    if sym:  # the symmetric grid is one step short on the positive side
        err = torch.where(w > 0, (err - step).clamp(min=0), err)
    assert (err <= step / 2 + 1e-6).all()


def test_group_size_that_does_not_divide_the_input_is_an_error():
    with pytest.raises(UsageError, match="does not divide"):
        rtn_quantize(torch.randn(4, 96), bits=4, group_size=64, sym=True)


def test_hessian_accumulates_two_x_xt_over_n_across_batches():
    x = torch.randn(3, 10, 8)
    acc = HessianAccumulator(8)
    for b in x:
        acc.add(b)
    flat = x.reshape(-1, 8)
    assert acc.n == 30
    assert torch.allclose(acc.H, 2 * flat.T @ flat / 30, atol=1e-5)


@pytest.mark.parametrize("group_size", [16, 96, -1])  # groups inside, across and spanning 128-blocks
def test_gptq_with_an_identity_hessian_is_rtn(group_size):
    # H = I: the inverse Hessian is diagonal, so no error is propagated and GPTQ rounds like RTN
    w = torch.randn(16, 288)
    g = gptq_quantize(w, torch.eye(288), bits=4, group_size=group_size, sym=False)
    r = rtn_quantize(w, bits=4, group_size=group_size, sym=False)
    assert torch.equal(g.qweight, r.qweight) and torch.allclose(g.scales, r.scales)


def test_gptq_two_columns_by_hand():
    # one row, two inputs, per-row grid; H = [[2, 1], [1, 2]], no damping worth speaking of
    w = torch.tensor([[0.30, -0.20]])
    H = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    qw = gptq_quantize(w, H, bits=2, group_size=-1, sym=False, damp=1e-9)
    # grid from the row: min -0.2, max 0.3 -> scale 0.5/3, zero round(1.2) = 1
    scale, zero = 0.5 / 3, 1
    q0 = min(max(round(0.30 / scale) + zero, 0), 3)  # 3 (0.333)
    Hinv = torch.linalg.inv(H)
    U = torch.linalg.cholesky(Hinv, upper=True)
    err = (0.30 - scale * (q0 - zero)) / U[0, 0].item()
    w1 = -0.20 - err * U[0, 1].item()  # the second input absorbs the first one's rounding error
    q1 = min(max(round(w1 / scale) + zero, 0), 3)
    assert qw.qweight.tolist() == [[q0, q1]]
    assert (q0, q1) == (3, 0)  # RTN would give q1 = round(-1.2) + 1 = 0 too, but from -0.2 + 0.0167
    assert w1 == pytest.approx(-0.20 + (0.30 - 1 / 3) * 0.5, abs=1e-6)


def _layer_error(w, w_hat, x):
    return float((x @ w.T - x @ w_hat.T).norm())


@pytest.mark.parametrize(("bits", "group_size", "act_order"), [(4, 32, False), (3, 32, False), (4, -1, True)])
def test_gptq_reconstructs_the_layer_output_better_than_rtn(bits, group_size, act_order):
    gen = torch.Generator().manual_seed(0)
    k, n = 128, 48
    x = torch.randn(512, k, generator=gen) @ torch.randn(k, k, generator=gen)  # correlated input channels
    w = torch.randn(n, k, generator=gen)
    acc = HessianAccumulator(k)
    acc.add(x)
    g = gptq_quantize(w, acc.H, bits=bits, group_size=group_size, sym=True, act_order=act_order)
    r = rtn_quantize(w, bits=bits, group_size=group_size, sym=True)
    assert _layer_error(w, g.dequantize(), x) < 0.8 * _layer_error(w, r.dequantize(), x)


def test_act_order_g_idx_follows_the_quantization_order():
    gen = torch.Generator().manual_seed(1)
    k = 64
    x = torch.randn(256, k, generator=gen) * torch.rand(k, generator=gen) * 4
    acc = HessianAccumulator(k)
    acc.add(x)
    w = torch.randn(8, k, generator=gen)
    qw = gptq_quantize(w, acc.H, bits=4, group_size=16, sym=False, act_order=True)
    order = torch.argsort(torch.diag(acc.H), descending=True, stable=True)
    # the i-th column quantized (descending diag H) belongs to group i // 16
    assert torch.equal(qw.g_idx[order].long(), torch.arange(k) // 16)
    assert torch.bincount(qw.g_idx.long()).tolist() == [16] * 4
    assert not torch.equal(qw.g_idx, natural_g_idx(k, 16))
    # every column dequantizes with its own group's scale and zero
    for col in (0, 17, 63):
        g = int(qw.g_idx[col])
        expected = qw.scales[:, g] * (qw.qweight[:, col].float() - qw.zeros[:, g])
        assert torch.allclose(qw.dequantize()[:, col], expected)
    static = gptq_quantize(w, acc.H, bits=4, group_size=16, sym=False, act_order=True, static_groups=True)
    assert torch.equal(static.g_idx, natural_g_idx(k, 16))


def test_dead_inputs_get_zero_weight():
    x = torch.randn(64, 32)
    x[:, 5] = 0
    acc = HessianAccumulator(32)
    acc.add(x)
    qw = gptq_quantize(torch.randn(4, 32), acc.H, bits=4, group_size=-1, sym=True)
    assert torch.equal(qw.dequantize()[:, 5], torch.zeros(4))


def test_cholesky_failure_raises_the_damp_with_a_warning():
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # indefinite: eigenvalues 3 and -1
    warnings = []
    qw = gptq_quantize(
        torch.randn(2, 2), H, bits=4, group_size=-1, sym=True, warn=warnings.append, name="lin"
    )
    assert qw.qweight.shape == (2, 2)
    assert len(warnings) == 1 and "lin" in warnings[0] and "damp" in warnings[0]


def test_modules_fed_the_same_tensor_share_one_hessian_accumulation():
    from llmctl.core.quantize.run import _shared_hessians

    acc = {n: HessianAccumulator(8) for n in ("q", "k", "v", "o")}
    add, alias = _shared_hessians(acc)
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for name, t in (("q", x), ("k", x), ("v", x), ("o", y)):
        add(name, t)
    assert alias == {"k": "q", "v": "q"} and acc["k"].n == 0 and acc["o"].n == 10
    assert torch.allclose(acc["q"].H, 2 * x.reshape(-1, 8).T @ x.reshape(-1, 8) / 10, atol=1e-5)


def test_hessian_from_a_cholesky_solve_equals_the_cholesky_inverse():
    from llmctl.core.quantize.gptq import _damped_cholesky_inverse

    x = torch.randn(200, 24, dtype=torch.float64)
    H = (x.T @ x).float()
    U = _damped_cholesky_inverse(H, 0.01, None, "l")
    damped = H + 0.01 * torch.diag(H).mean() * torch.eye(24)
    assert torch.allclose(U.T @ U, torch.linalg.inv(damped), rtol=1e-3, atol=1e-6)
