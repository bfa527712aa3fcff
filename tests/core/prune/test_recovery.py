"""Recovery fine-tuning between layer removals (TrimLLM-style): lower in-domain loss, the old behaviour at
zero steps, and outputs that stay plain transformers models."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from llmctl.core.prune import depth
from llmctl.core.prune.run import PruneOptions, prune_loaded, token_windows
from llmctl.core.quantize.calib import CalibrationSpec
from tests.core.prune.conftest import load

DOMAIN = "Q: Tom has 3 apples and buys 4 more. How many? A: 3 + 4 = 7. The answer is 7.\n" * 30


@pytest.fixture
def domain(tmp_path):
    path = tmp_path / "domain.txt"
    path.write_text(DOMAIN)
    return path


def _opts(domain, **kw):
    calib = CalibrationSpec(None, "text", 4, 48)
    return PruneOptions(method="progressive-layers", domain=domain, drop=2, calib=calib, batch_size=4, **kw)


def _tokenizer(tiny4):
    from llmctl.core.models.hf import load_tokenizer

    return load_tokenizer(tiny4)


def test_recovery_lowers_the_in_domain_loss_of_the_pruned_model(tiny4, domain):
    tok = _tokenizer(tiny4)
    ids = token_windows(tok, CalibrationSpec(domain, "text", 4, 48))
    losses, reports = {}, {}
    for steps in (0, 6):
        model = load(tiny4)
        reports[steps] = prune_loaded(model, tok, _opts(domain, recover_steps=steps, recover_lr=5e-3))
        losses[steps] = depth.mean_loss(model, ids)
        assert model.config.num_hidden_layers == 2
    assert losses[6] < losses[0] - 0.1
    history = reports[6]["history"]
    assert len(history) == 2 and all(r["recovery_steps"] == 6 for r in history)
    assert all(r["recovered_loss"] < r["loss"] for r in history)
    assert reports[6]["final_domain_loss"] == pytest.approx(losses[6], rel=1e-4)
    assert "recovered_loss" not in reports[0]["history"][0]


def test_zero_recovery_steps_is_the_plain_greedy_drop(tiny4, domain):
    tok = _tokenizer(tiny4)
    a, b = load(tiny4), load(tiny4)
    ra = prune_loaded(a, tok, _opts(domain))
    rb = prune_loaded(b, tok, _opts(domain, recover_steps=0))
    assert ra == rb
    sb = b.state_dict()
    assert all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_one_shot_layers_with_recovery_reports_the_loss_before_and_after(tiny4):
    tok = _tokenizer(tiny4)
    model = load(tiny4)
    opts = replace(_opts(None, recover_steps=4, recover_lr=5e-3), method="layers", domain=None, drop=1)
    report = prune_loaded(model, tok, opts)
    rec = report["recovery"]
    assert rec["steps"] == 4 and rec["loss_after"] < rec["loss_before"]
    assert model.config.num_hidden_layers == 3


def test_recovered_output_loads_in_transformers_and_has_no_adapter_weights(cli, tiny4, domain, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "trim"
    result = cli(
        "prune", tiny4, "--method", "progressive-layers", "--domain", domain, "--drop", "1",
        "--recover-steps", "2", "--calib-samples", "2", "--calib-seq-len", "32", "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["num_layers_after"] == 3 and summary["history"][0]["recovery_steps"] == 2
    assert not any("lora" in k for k in load_file(str(out / "model.safetensors")))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 3
    assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_recover_steps_on_other_methods_or_negative_exit_2(cli, tiny4, tmp_path):
    bad = cli(
        "prune", tiny4, "--method", "wanda", "--sparsity", "0.5", "--recover-steps", "2", "-o", tmp_path / "a"
    )
    assert bad.exit_code == 2 and "--recover-steps" in bad.stderr
    neg = cli(
        "prune", tiny4, "--method", "layers", "--drop", "1", "--recover-steps", "-1", "-o", tmp_path / "b"
    )
    assert neg.exit_code == 2 and not (tmp_path / "b").exists()
