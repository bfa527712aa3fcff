"""FastDropout against nn.Dropout: drop rate, scaling, gradient, eval mode, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.core.finetune.dropout import FastDropout, keep_mask, use_fast_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_the_drop_rate_is_p_within_binomial_noise(p):
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of the 4 fields per random word
    dropped = int((~keep_mask((n,), round(p * 65536), torch.device("cpu"))).sum())
    sd = math.sqrt(n * p * (1 - p))
    assert abs(dropped - n * p) < 5 * sd


def test_every_16_bit_field_of_the_random_words_is_used_uniformly():
    torch.manual_seed(1)
    mask = keep_mask((400_000, 4), round(0.25 * 65536), torch.device("cpu"))
    rates = 1 - mask.float().mean(0)  # one column per field position inside a 64-bit word
    sd = math.sqrt(0.25 * 0.75 / 400_000)
    assert torch.all((rates - 0.25).abs() < 5 * sd), rates


def test_survivors_are_scaled_so_the_expectation_is_the_input():
    torch.manual_seed(0)
    d = FastDropout(0.05).train()
    x = torch.ones(2000, 500)
    y = d(x)
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], d.scale))
    assert d.scale == pytest.approx(1 / (1 - d.effective_p))
    assert abs(d.effective_p - 0.05) < 1 / 65536
    assert float(y.mean()) == pytest.approx(1.0, abs=5 * math.sqrt(0.05 / 0.95 / x.numel()))


def test_the_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(0)
    d = FastDropout(0.3).train()
    x = torch.randn(64, 33, requires_grad=True)
    y = d(x)
    g = torch.randn_like(y)
    y.backward(g)
    factor = torch.where(y != 0, d.scale, 0.0)
    torch.testing.assert_close(y, x.detach() * factor)
    torch.testing.assert_close(x.grad, g * factor)


def test_eval_mode_and_p_zero_are_the_identity_like_nn_dropout():
    x = torch.randn(10, 7)
    assert FastDropout(0.5).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x
    assert torch.nn.Dropout(0.5).eval()(x) is x


def test_the_same_seed_gives_the_same_mask():
    d = FastDropout(0.1).train()
    x = torch.randn(37, 41)
    torch.manual_seed(5)
    a = d(x)
    torch.manual_seed(5)
    assert torch.equal(a, d(x))
    assert not torch.equal(a, d(x))  # and the generator advances


def test_a_probability_outside_0_1_is_refused():
    with pytest.raises(ValueError):
        FastDropout(1.0)


def test_lora_layers_get_fast_dropout_and_keep_their_p(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=2, lora_dropout=0.1, target_modules="all-linear")
    )
    assert use_fast_dropout(model) == 7
    drops = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert len(drops) == 7 and all(d.p == 0.1 for d in drops)
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules())
    assert use_fast_dropout(model) == 0  # idempotent
