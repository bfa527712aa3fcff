"""Masks, and the three unstructured methods on a single weight matrix."""

import pytest
import torch

from llmctl.core.errors import UsageError
from llmctl.core.prune.magnitude import magnitude_prune
from llmctl.core.prune.masks import Pattern, check_sparsity, matrix_mask, nm_mask, parse_pattern, row_mask
from llmctl.core.prune.sparsegpt import sparsegpt_prune
from llmctl.core.prune.wanda import InputNorms, wanda_prune
from llmctl.core.quantize.gptq import HessianAccumulator


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.7, 0.9])
def test_row_mask_prunes_exactly_int_of_in_times_sparsity_in_every_row(sparsity):
    score = torch.randn(7, 40)
    mask = row_mask(score, sparsity)
    assert (mask.sum(1) == int(40 * sparsity)).all()
    # the pruned entries of a row are its lowest scores
    kept_min = score.masked_fill(mask, float("inf")).min(1).values
    pruned_max = score.masked_fill(~mask, float("-inf")).max(1).values
    assert (pruned_max <= kept_min).all()


def test_row_mask_breaks_ties_by_position_instead_of_pruning_extra():
    mask = row_mask(torch.ones(3, 8), 0.5)
    assert mask.sum() == 12
    assert mask[:, :4].all()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_matrix_mask_prunes_exactly_one_global_count_per_matrix(sparsity):
    score = torch.randn(9, 33)
    mask = matrix_mask(score, sparsity)
    assert int(mask.sum()) == int(score.numel() * sparsity)
    assert score[mask].max() <= score[~mask].min()


@pytest.mark.parametrize("text", ["2:4", "1:4", "4:8", "3:8"])
def test_nm_mask_keeps_at_most_n_in_every_group_of_m(text):
    p = parse_pattern(text)
    score = torch.randn(6, 32)
    kept = ~nm_mask(score, p)
    per_group = kept.reshape(6, 32 // p.m, p.m).sum(-1)
    assert (per_group == p.n).all()
    assert p.sparsity == pytest.approx(1 - p.n / p.m)


def test_nm_mask_refuses_an_input_dimension_m_does_not_divide():
    with pytest.raises(UsageError, match="does not divide"):
        nm_mask(torch.randn(2, 10), Pattern(2, 4))


@pytest.mark.parametrize("bad", ["2", "a:b", "4:4", "0:4", "5:4", "2:4:8"])
def test_bad_patterns_are_usage_errors(bad):
    with pytest.raises(UsageError):
        parse_pattern(bad)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1.5])
def test_sparsity_outside_the_open_unit_interval_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        check_sparsity(bad)


def test_wanda_mask_equals_a_hand_computed_one_and_differs_from_magnitude():
    W = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.5, -1.0, 0.8]])
    # two calibration batches; per-feature ||X_j||_2 = [1, 1, 1, 3]
    norms = InputNorms(4)
    norms.add(torch.tensor([[[1.0, 0.0, 0.0, 3.0]]]))
    norms.add(torch.tensor([[[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]]))
    assert torch.allclose(norms.norms, torch.tensor([1.0, 1.0, 1.0, 3.0]))
    # scores |W| * norm: row 0 [1, 2, 3, 1.5] -> prune 0, 3; row 1 [4, 1.5, 1, 2.4] -> prune 2, 1
    expected = torch.tensor([[0.0, -2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.8]])
    assert torch.equal(wanda_prune(W, norms, sparsity=0.5, pattern=None), expected)
    assert torch.equal(wanda_prune(W, norms, sparsity=None, pattern=Pattern(2, 4)), expected)
    # magnitude (one threshold for the matrix) keeps the large-|W| weight of the small-norm feature instead
    assert torch.equal(
        magnitude_prune(W, sparsity=0.5, pattern=None),
        torch.tensor([[0.0, -2.0, 3.0, 0.0], [4.0, 1.5, 0.0, 0.0]]),
    )


def _layer_case(seed=0, n=48, k=64, tokens=2048):
    """A weight and correlated inputs with a few large-norm features (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k**0.5 + 0.5 * torch.eye(k)
    X = torch.randn(tokens, k, generator=g) @ mix
    X[:, :4] *= 8  # outlier features
    return W, X


def _stats(X):
    h, norms = HessianAccumulator(X.shape[1]), InputNorms(X.shape[1])
    for chunk in X.split(500):  # batch by batch, like the layer-wise runner
        h.add(chunk[None])
        norms.add(chunk[None])
    return h, norms


@pytest.mark.parametrize("sparsity, pattern", [(0.5, None), (0.7, None), (None, Pattern(2, 4))])
def test_sparsegpt_reconstructs_the_layer_output_better_than_wanda_and_magnitude(sparsity, pattern):
    W, X = _layer_case()
    h, norms = _stats(X)

    def error(W_hat):
        return float(torch.linalg.norm(X @ W.T - X @ W_hat.T))

    mag = magnitude_prune(W, sparsity=sparsity, pattern=pattern)
    wan = wanda_prune(W, norms, sparsity=sparsity, pattern=pattern)
    sgpt = sparsegpt_prune(W, h, sparsity=sparsity, pattern=pattern)
    assert error(sgpt) < error(wan) < error(mag)
    if sparsity != 0.7:  # at 70% the outlier features dominate every method's error
        assert error(sgpt) < 0.92 * error(wan)
    target = pattern.sparsity if pattern else sparsity
    for pruned in (mag, wan, sgpt):
        assert float((pruned == 0).float().mean()) == pytest.approx(target, abs=1 / 64)  # int() per row
    if pattern:
        assert ((sgpt != 0).reshape(48, 16, 4).sum(-1) <= 2).all()


def test_sparsegpt_prunes_an_exact_count_in_every_block_of_128_columns():
    W, X = _layer_case(n=16, k=320, tokens=1024)
    h, _ = _stats(X)
    out = sparsegpt_prune(W, h, sparsity=0.5, pattern=None)
    for start, width in ((0, 128), (128, 128), (256, 64)):
        block = out[:, start : start + width]
        assert int((block == 0).sum()) == int(block.numel() * 0.5)


def test_sparsegpt_zeroes_dead_inputs_and_accepts_a_plain_hessian():
    W, X = _layer_case(n=8, k=16, tokens=256)
    X[:, 3] = 0
    h, _ = _stats(X)
    out = sparsegpt_prune(W, h.H, sparsity=0.25, pattern=None)
    assert (out[:, 3] == 0).all()


def test_sparsegpt_with_uncorrelated_inputs_makes_no_updates_and_prunes_by_obs_saliency():
    """A diagonal Hessian has nothing to compensate with: kept weights stay, and the pruned ones are the
    lowest w^2 (H_jj + damp) of the block, as OBS's saliency w^2 / [H^-1]_jj says."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 16, generator=g)
    diag = torch.rand(16, generator=g) + 0.5
    H = torch.diag(diag)
    out = sparsegpt_prune(W, H, sparsity=0.5, pattern=None, damp=0.01)
    kept = out != 0
    assert torch.allclose(out[kept], W[kept], atol=1e-5)
    saliency = W.pow(2) * (diag + 0.01 * diag.mean())[None, :]
    assert torch.equal(~kept, matrix_mask(saliency, 0.5))


def _textbook_sparsegpt(W, H, sparsity, pattern, block=128, damp=0.01):
    """The reference's algorithm written plainly, column by column on W itself, with H⁻¹'s upper Cholesky
    factor from torch's own routines (two factorisations and an inverse, as the reference does)."""
    W = W.clone()
    k = W.shape[1]
    H = H.clone() + damp * torch.diag(H).mean() * torch.eye(k)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, U1, Err1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2], torch.zeros(W.shape[0], i2 - i1)
        d = torch.diag(U1)
        mask = torch.zeros_like(W1, dtype=torch.bool)
        if pattern is None:
            mask = matrix_mask(W1.pow(2) / d.pow(2)[None, :], sparsity)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern.m == 0:
                g = slice(i, i + pattern.m)
                mask[:, g] = nm_mask(W1[:, g].pow(2) / d[g].pow(2)[None, :], pattern)
            q = W1[:, i].masked_fill(mask[:, i], 0)
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W


@pytest.mark.parametrize("sparsity, pattern", [(0.5, None), (None, Pattern(2, 4))])
def test_sparsegpt_matches_the_textbook_column_loop(sparsity, pattern):
    W, X = _layer_case(n=24, k=320, tokens=1024)
    h, _ = _stats(X)
    fast = sparsegpt_prune(W, h, sparsity=sparsity, pattern=pattern)
    slow = _textbook_sparsegpt(W, h.H, sparsity, pattern)
    assert torch.equal(fast == 0, slow == 0)
    assert torch.allclose(fast, slow, atol=1e-4)
