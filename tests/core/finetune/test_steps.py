"""train_steps: a few LoRA (or full) steps on a model in memory, merged back into a plain model."""

import pytest
import torch
from torch import nn

from llmctl.core.errors import UsageError
from llmctl.core.finetune.steps import train_steps


@pytest.fixture
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one intra-op thread beats two fighting a busy machine
    yield AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    torch.set_num_threads(before)


def _loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 259, (4, 16), generator=g)


def test_lora_steps_lower_the_loss_and_leave_a_plain_model(model):
    ids = _ids()
    cls, before = type(model), _loss(model, ids)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = train_steps(model, ids, steps=8, lr=1e-2, batch_size=4)
    assert stats["steps"] == 8 and stats["method"] == "lora" and len(stats["history"]) == 8
    assert 0 < stats["trainable_parameters"] < sum(p.numel() for p in model.parameters())
    assert _loss(model, ids) < before - 0.05
    assert type(model) is cls and not model.training
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_records_with_a_tokenizer_and_full_fine_tuning(model, tiny_model):
    from llmctl.core.models.hf import load_tokenizer

    tok = load_tokenizer(tiny_model)
    records = [{"text": "the cat sat on the mat"}, {"prompt": "2+2=", "completion": "4"}][:1] * 3
    before = _loss(model, torch.tensor([tok("the cat sat on the mat")["input_ids"]]))
    stats = train_steps(model, records, steps=4, lr=1e-3, method="full", tokenizer=tok, batch_size=3)
    assert stats["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert _loss(model, torch.tensor([tok("the cat sat on the mat")["input_ids"]])) < before


def test_zero_steps_change_nothing_and_bad_settings_are_usage_errors(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert train_steps(model, _ids(), steps=0)["steps"] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UsageError):
        train_steps(model, _ids(), steps=-1)
    with pytest.raises(UsageError):
        train_steps(model, _ids(), steps=1, method="qlora")
    with pytest.raises(UsageError):
        train_steps(model, [{"text": "no tokenizer"}], steps=1)
