"""Low-rank factorization: SVD factors, rank choice, activation weighting, module swaps, the checkpoint."""

import pytest
import torch
from torch import nn

from llmctl.core.errors import UsageError
from llmctl.core.prune.lowrank import (
    LowRankLinear,
    apply_lowrank,
    check_lowrank_options,
    factorize,
    input_scale,
    load_hf,
    lowrank_spec,
    materialize,
    prune_lowrank,
    rank_for_energy,
    rank_for_ratio,
    saves_parameters,
)
from tests.core.prune.conftest import calib_ids, load


def _orthogonal(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def test_full_rank_reconstructs_the_weight_plain_and_activation_weighted():
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    a, b, info = factorize(w, rank=16)
    assert info["rank"] == 16 and info["energy_kept"] == pytest.approx(1.0)
    torch.testing.assert_close(b @ a, w, atol=1e-5, rtol=1e-5)
    scale = input_scale(torch.logspace(-2, 1, 16))
    a, b, _ = factorize(w, rank=16, scale=scale)
    torch.testing.assert_close(b @ a, w, atol=1e-3, rtol=1e-3)  # float32 SVD, columns scaled 1000x apart


def test_truncation_is_the_best_rank_r_approximation():
    s = torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    u, v = _orthogonal(6, 1)[:, :4], _orthogonal(4, 2)
    w = (u * s) @ v.T
    a, b, info = factorize(w.float(), rank=2)
    assert a.shape == (2, 4) and b.shape == (6, 2)
    # Eckart–Young: the error's spectral norm is the first dropped singular value
    assert torch.linalg.matrix_norm((w.float() - b @ a), ord=2) == pytest.approx(2.0, abs=1e-4)
    assert info["energy_kept"] == pytest.approx(34 / 39)


@pytest.mark.parametrize(("energy", "rank"), [(0.6, 1), (0.9, 2), (0.95, 3), (0.99, 4), (1.0, 4)])
def test_energy_picks_the_smallest_rank_holding_that_share_of_squared_singular_values(energy, rank):
    # singular values 3, 2, 1, 0.5: squared 9, 4, 1, 0.25 of 14.25 -> cumulative 0.632, 0.912, 0.982, 1
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    w = ((_orthogonal(5, 3)[:, :4] * s) @ _orthogonal(4, 4).T).float()
    assert rank_for_energy(s, energy) == rank
    assert factorize(w, energy=energy)[2]["rank"] == rank


def test_rank_ratio_and_the_parameter_break_even():
    assert rank_for_ratio(128, 64, 0.25) == 16 and rank_for_ratio(64, 64, 0.001) == 1
    assert rank_for_ratio(64, 64, 1.0) == 64
    assert saves_parameters(64, 64, 31) and not saves_parameters(64, 64, 32)  # 32·128 = 64·64


def test_activation_weighting_lowers_the_output_error_on_skewed_activations():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g)
    x = torch.randn(2000, 32, generator=g) * torch.logspace(-2, 1, 32)  # a few features dominate
    norms = x.pow(2).sum(0).sqrt()
    plain_a, plain_b, _ = factorize(w, rank=8)
    weighted_a, weighted_b, _ = factorize(w, rank=8, scale=input_scale(norms))
    ref = x @ w.T
    plain = (x @ (plain_b @ plain_a).T - ref).norm()
    weighted = (x @ (weighted_b @ weighted_a).T - ref).norm()
    assert weighted < 0.5 * plain
    # ...while the plain SVD is the better *weight* approximation, as Eckart–Young says
    assert (w - plain_b @ plain_a).norm() < (w - weighted_b @ weighted_a).norm()


@pytest.mark.parametrize(
    ("ratio", "energy"), [(None, None), (0.5, 0.9), (0.0, None), (1.5, None), (None, 0.0), (None, 1.01)]
)
def test_bad_ranges_are_usage_errors(ratio, energy):
    with pytest.raises(UsageError):
        check_lowrank_options(ratio, energy)


def test_factored_model_matches_its_materialized_twin_and_has_fewer_parameters(tiny4):
    model = load(tiny4)
    before = sum(p.numel() for p in model.parameters())
    rows = prune_lowrank(model, rank_ratio=0.25, energy=None)
    assert len(rows) == 28 and all(r["factored"] for r in rows)
    spec = lowrank_spec(model)
    assert spec["model.layers.0.self_attn.k_proj"] == 8 and spec["model.layers.3.mlp.down_proj"] == 16
    assert sum(p.numel() for p in model.parameters()) < before
    ids = calib_ids(samples=2, seq=12)
    with torch.no_grad():
        factored = model(input_ids=ids).logits
        assert materialize(model) == 28
        dense = model(input_ids=ids).logits
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    torch.testing.assert_close(factored, dense, atol=1e-5, rtol=1e-4)


def test_a_linear_whose_factors_would_be_larger_stays_dense(tiny4):
    model = load(tiny4)
    rows = prune_lowrank(model, rank_ratio=None, energy=1.0, skip=("q_proj", "k_proj", "v_proj", "o_proj"))
    assert {r["name"].rsplit(".", 1)[-1] for r in rows} == {"gate_proj", "up_proj", "down_proj"}
    assert not any(r["factored"] for r in rows) and lowrank_spec(model) == {}


def test_activation_weighted_pruning_beats_plain_on_the_calibration_loss(tiny4):
    from llmctl.core.prune.depth import mean_loss

    ids = calib_ids(samples=6, seq=24)
    plain, weighted = load(tiny4), load(tiny4)
    prune_lowrank(plain, rank_ratio=0.25, energy=None)
    prune_lowrank(weighted, rank_ratio=0.25, energy=None, ids=ids, batch_size=3)
    dense = load(tiny4)
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        err_plain = (plain(input_ids=ids).logits - ref).norm()
        err_weighted = (weighted(input_ids=ids).logits - ref).norm()
    assert err_weighted < err_plain
    assert mean_loss(weighted, ids) == pytest.approx(mean_loss(weighted, ids))  # runs, deterministic


def test_apply_lowrank_swaps_by_name_and_a_saved_factored_model_loads_back(tiny4, tmp_path):
    model = load(tiny4)
    prune_lowrank(model, rank_ratio=0.25, energy=None)
    spec = lowrank_spec(model)
    model.config.llmctl_lowrank = spec
    model.save_pretrained(tmp_path / "f")
    back = load_hf(tmp_path / "f", dtype=torch.float32)
    assert lowrank_spec(back) == spec
    ids = calib_ids(samples=1, seq=8)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)
    fresh = nn.Module()
    fresh.proj = nn.Linear(8, 6, bias=True)
    assert apply_lowrank(fresh, {"proj": 2}) == 1
    assert isinstance(fresh.proj, LowRankLinear) and fresh.proj.lowrank_b.bias is not None
