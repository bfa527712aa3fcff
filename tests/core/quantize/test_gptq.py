"""RTN and GPTQ on single linear layers: hand-checked cases, the error GPTQ exists to reduce, act-order."""

import pytest
import torch

from llmctl.core.errors import UsageError
from llmctl.core.quantize.formats import natural_g_idx
from llmctl.core.quantize.gptq import HessianAccumulator, gptq_quantize
from llmctl.core.quantize.rtn import grid_params, quantize_int, rtn_quantize


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


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    from llmctl.core.quantize.gptq import _damped_cholesky_inverse

    x = torch.randn(200, 24, dtype=torch.float64) * torch.rand(24, dtype=torch.float64)
    H = (x.T @ x).float()
    U = _damped_cholesky_inverse(H, 0.01, None, "l")
    damped = H.double() + 0.01 * torch.diag(H.double()).mean() * torch.eye(24, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)  # the reference's U, in float64
    assert torch.equal(U, torch.triu(U)) and (torch.diag(U) > 0).all()
    assert torch.allclose(U.double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def _reference_gptq(w, H, *, bits, group_size, sym, damp=0.01, block=128):
    """The column loop as the GPTQ reference writes it (natural order): a strided working copy of each
    block, out-of-place rank-1 updates, H⁻¹ from cholesky_inverse and a second Cholesky factorisation."""
    W, H = w.clone(), H.clone()
    k = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(k)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    size = k if group_size == -1 else group_size
    Q = torch.zeros_like(W)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % size == 0:
                scale, zero = grid_params(
                    torch.cat([W1[:, i : i + size], W[:, i2 : col + size]], 1), bits, sym
                )
            q = quantize_int(W1[:, i], scale, zero, bits)
            Q[:, col] = q
            err = (W1[:, i] - scale * (q - zero)) / U[col, col]
            W1[:, i:] -= err[:, None] * U[col, col:i2][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q


@pytest.mark.parametrize("group_size", [16, 96, -1])
def test_fast_column_loop_matches_the_reference_loop(group_size):
    # the fast loop works on the transposed weight with in-place updates and one Cholesky factorisation:
    # the same arithmetic up to float32 rounding, so all but a rare tie-breaking integer agree
    gen = torch.Generator().manual_seed(2)
    k, n = 288, 40
    x = torch.randn(1024, k, generator=gen) @ torch.randn(k, k, generator=gen) / 8
    acc = HessianAccumulator(k)
    acc.add(x)
    w = torch.randn(n, k, generator=gen)
    fast = gptq_quantize(w, acc.H, bits=4, group_size=group_size, sym=False).qweight.float()
    ref = _reference_gptq(w, acc.H, bits=4, group_size=group_size, sym=False)
    assert (fast == ref).float().mean() > 0.995
    assert (fast - ref).abs().max() <= 1


def test_a_shared_hessian_factor_quantizes_like_the_hessian_itself():
    from llmctl.core.quantize.gptq import hessian_factor

    x = torch.randn(256, 64) * torch.rand(64) * 3
    acc = HessianAccumulator(64)
    acc.add(x)
    factor = hessian_factor(acc.H, act_order=True, damp=0.01)
    for seed in (0, 1):  # two linears fed the same input (q and k, say)
        w = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))
        own = gptq_quantize(w, acc.H, bits=4, group_size=16, sym=True, act_order=True)
        shared = gptq_quantize(w, None, bits=4, group_size=16, sym=True, act_order=True, factor=factor)
        assert torch.equal(own.qweight, shared.qweight) and torch.equal(own.g_idx, shared.g_idx)


def _quantize_tiny(tiny_model, **kw):
    from llmctl.core.models.hf import load_model, load_tokenizer, resolve_model
    from llmctl.core.quantize import CalibrationSpec, QuantizeOptions
    from llmctl.core.quantize.calib import decoder_layers
    from llmctl.core.quantize.run import quantize_loaded

    ref = resolve_model(tiny_model)
    model, tok = load_model(ref, device="cpu", dtype="float32"), load_tokenizer(ref)
    calls = []  # forwards of the last layer (the first one's also include capturing its inputs)
    decoder_layers(model)[-1].register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    opts = QuantizeOptions(
        method="gptq", group_size=32, calib=CalibrationSpec(None, samples=4, seq_len=32), **kw
    )
    return quantize_loaded(model, tok, opts), len(calls)


def test_true_sequential_gptq_takes_one_forward_per_layer_and_equals_the_per_set_schedule(
    tiny_model, monkeypatch
):
    from llmctl.core.quantize import run

    fast, fast_forwards = _quantize_tiny(tiny_model, batch_size=2)
    # too big for one batch: the reference schedule, here in one batch of 4 too (its result depends on the
    # batching at float32 rounding level, which a random tiny model amplifies into many flipped integers)
    monkeypatch.setattr(run, "ONE_BATCH_BYTES", 0)
    ref, ref_forwards = _quantize_tiny(tiny_model, batch_size=4)
    # the whole calibration set in one batch, each linear quantized just before it runs
    assert fast_forwards == 1
    assert ref_forwards == 4 + 1  # a forward per sequential set, and one for the outputs
    assert fast.keys() == ref.keys()
    for n in fast:
        assert torch.equal(fast[n].qweight, ref[n].qweight) and torch.equal(fast[n].scales, ref[n].scales)
    _, batched_forwards = _quantize_tiny(tiny_model, batch_size=2)
    assert batched_forwards == (4 + 1) * 2


def test_a_set_member_fed_another_input_is_requantized_from_its_own(tiny_model, monkeypatch):
    from llmctl.core.quantize import run

    plain, _ = _quantize_tiny(tiny_model)
    # o_proj put in q/k/v's set: it is quantized with them on q's input first, then, when it is called on
    # the attention output instead, restored and quantized from that
    sets = [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        *run.SEQUENTIAL[2:],
    ]
    monkeypatch.setattr(run, "SEQUENTIAL", sets)
    guessed, _ = _quantize_tiny(tiny_model)
    for n in plain:
        same = (plain[n].qweight == guessed[n].qweight).float().mean()
        assert same > 0.999, n
