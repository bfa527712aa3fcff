"""Preference losses on fixed log-probs against hand-computed values (TRL's definitions), and SFT sums."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.core.errors import UsageError
from llmctl.core.finetune.data import IGNORE
from llmctl.core.finetune.objectives import (
    dpo_loss,
    get_objective,
    orpo_loss,
    sft_sum,
    simpo_loss,
    token_logps,
)

t = torch.tensor


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_is_minus_log_sigmoid_of_beta_times_the_log_ratio_difference():
    # policy: chosen -10, rejected -12; reference: both -11  ->  logits = (−10+12) − (−11+11) = 2
    losses, reward_c, reward_r = dpo_loss(t([-10.0]), t([-12.0]), t([-11.0]), t([-11.0]), beta=0.1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)  # 0.598138...
    assert losses.item() == pytest.approx(0.5981388693, abs=1e-6)
    assert reward_c.item() == pytest.approx(0.1) and reward_r.item() == pytest.approx(-0.1)


def test_dpo_with_policy_equal_to_reference_is_log_2():
    losses, _, _ = dpo_loss(t([-3.0, -7.0]), t([-5.0, -1.0]), t([-3.0, -7.0]), t([-5.0, -1.0]), beta=0.5)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2.0)))


def test_dpo_label_smoothing_is_the_conservative_mix():
    eps, beta, logits = 0.1, 0.2, 3.0
    losses, _, _ = dpo_loss(t([0.0]), t([-3.0]), t([0.0]), t([0.0]), beta=beta, label_smoothing=eps)
    expected = -(1 - eps) * log_sigmoid(beta * logits) - eps * log_sigmoid(-beta * logits)
    assert losses.item() == pytest.approx(expected, abs=1e-6)


def test_orpo_loss_is_nll_minus_lambda_log_sigmoid_of_the_log_odds_ratio():
    avg_c, avg_r, nll, lam = -0.5, -1.0, 0.5, 0.1
    odds_c = avg_c - math.log(1 - math.exp(avg_c))
    odds_r = avg_r - math.log(1 - math.exp(avg_r))
    expected = nll - lam * log_sigmoid(odds_c - odds_r)
    losses, _, _ = orpo_loss(t([avg_c]), t([avg_r]), t([nll]), beta=lam)
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert losses.item() == pytest.approx(0.5320299785, abs=1e-6)  # log-odds ratio 0.97408, log σ = −0.32030


def test_simpo_loss_subtracts_the_margin_gamma():
    losses, reward_c, _ = simpo_loss(t([-0.5]), t([-1.0]), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(-log_sigmoid(2.0 * 0.5 - 0.5), abs=1e-6)  # −log σ(0.5) = 0.474077
    assert losses.item() == pytest.approx(0.4740769841, abs=1e-6)
    assert reward_c.item() == pytest.approx(-1.0)


def test_token_logps_sums_only_trained_tokens():
    logits = torch.log(t([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    sums, counts = token_logps(logits, t([[0, IGNORE, 2]]))
    assert counts.tolist() == [2]
    assert sums.item() == pytest.approx(math.log(0.5) + math.log(0.6), abs=1e-6)


def test_sft_sum_is_summed_cross_entropy_with_optional_label_smoothing():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = t([[1, 2, IGNORE, 4, 5], [IGNORE, IGNORE, 7, 8, 9]])
    loss, n = sft_sum(logits, targets)
    keep = targets != IGNORE
    manual = -torch.log_softmax(logits, -1)[keep].gather(-1, targets[keep].unsqueeze(-1)).sum()
    assert n == 7
    torch.testing.assert_close(loss, manual)
    smoothed, _ = sft_sum(logits, targets, label_smoothing=0.1)
    logp = torch.log_softmax(logits, -1)[keep]
    manual_smooth = (
        0.9 * -logp.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1) - 0.1 * logp.mean(-1)
    ).sum()
    torch.testing.assert_close(smoothed, manual_smooth)
    assert not torch.allclose(smoothed, loss)


def test_unknown_objective_lists_the_known_ones():
    with pytest.raises(UsageError, match="sft, dpo, orpo, simpo"):
        get_objective("kto")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_fused_linear_cross_entropy_path_gives_the_same_loss_and_gradients(tiny_model, smoothing):
    """``--kernels``: the SFT loss through llmctl's fused LM head + cross-entropy equals the plain one."""
    from llmctl.core.finetune.batching import as_unit, collate
    from llmctl.core.finetune.data import Example
    from llmctl.core.finetune.objectives import OBJECTIVES, batch_loss
    from llmctl.core.models.hf import load_model, resolve_model

    model = load_model(resolve_model(tiny_model), device="cpu")
    model.train()
    docs = [Example([5, 9, 14, 30, 2], [IGNORE, IGNORE, 14, 30, 2]), Example([7, 8, 99], [7, 8, 99])]
    batch = collate([as_unit(d) for d in docs], pad_id=0, packed=False)
    results = []
    for fused in (True, False):
        model.zero_grad()
        loss, n, _ = batch_loss(
            OBJECTIVES["sft"], model, batch, beta=0.0, gamma=0.0, label_smoothing=smoothing, fused_ce=fused
        )
        loss.backward()
        results.append((loss.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (fused_loss, n_fused, g_fused), (plain_loss, n_plain, g_plain) = results
    assert n_fused == n_plain == 5
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for name, grad in g_plain.items():
        torch.testing.assert_close(g_fused[name], grad, rtol=1e-4, atol=1e-6, msg=name)
