"""LoRA adapters merged into the base equal peft's merge_and_unload (and its "cat" combination)."""

from __future__ import annotations

import pytest
import torch

from llmctl.core.errors import ModelError
from llmctl.core.merge.loader import LazyModel
from llmctl.core.merge.lora import merge_lora

peft = pytest.importorskip("peft")


def _adapter(base, out, *, seed: int, r: int, alpha: int, targets: list[str], rslora: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, use_rslora=rslora
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    a = _adapter(tiny_model, root / "a", seed=1, r=4, alpha=8, targets=["q_proj", "v_proj"])
    b = _adapter(tiny_model, root / "b", seed=2, r=2, alpha=4, targets=["v_proj", "down_proj"], rslora=True)
    return a, b


def _peft_merged(base, adapter_paths, weights=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_paths[0], adapter_name="a0")
    for i, path in enumerate(adapter_paths[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    if weights is not None:
        names = [f"a{i}" for i in range(len(adapter_paths))]
        model.add_weighted_adapter(names, weights, "combined", combination_type="cat")
        model.set_adapter("combined")
    return model.merge_and_unload().state_dict()


def test_one_adapter_equals_peft_merge_and_unload(tiny_model, adapters, tmp_path):
    merge_lora(tiny_model, [adapters[0]], tmp_path / "out")
    ours = LazyModel(tmp_path / "out")
    theirs = _peft_merged(tiny_model, [adapters[0]])
    base = LazyModel(tiny_model)
    changed = 0
    for name in ours.names():
        torch.testing.assert_close(ours.get(name), theirs[name], atol=1e-6, rtol=1e-6, msg=name)
        changed += not torch.equal(ours.get(name), base.get(name))
    assert changed == 4  # q_proj and v_proj of 2 layers


def test_weighted_adapters_equal_peft_cat_combination(tiny_model, adapters, tmp_path):
    merge_lora(tiny_model, list(adapters), tmp_path / "out", weights=[0.7, 0.3])
    ours = LazyModel(tmp_path / "out")
    theirs = _peft_merged(tiny_model, list(adapters), weights=[0.7, 0.3])
    for name in ours.names():
        torch.testing.assert_close(ours.get(name), theirs[name], atol=1e-5, rtol=1e-5, msg=name)


def test_lora_flag_writes_a_loadable_model(cli, tiny_model, adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    result = cli(
        "merge",
        tiny_model,
        "--lora",
        adapters[0],
        "--lora",
        adapters[1],
        "--weights",
        "1,0.5",
        "-o",
        tmp_path / "out",
    )
    assert result.exit_code == 0, result.stderr
    assert "2 LoRA adapter(s)" in result.stderr
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 2


def test_an_adapter_for_another_architecture_names_the_tensor(tiny_model, adapters, tmp_path):
    import shutil

    from llmctl.core.models.init import init_model

    other = tmp_path / "other"
    init_model("llama-tiny", other, seed=0, overrides={"num_hidden_layers": 1})
    with pytest.raises(ModelError, match=r"targets model\.layers\.1\.self_attn\.q_proj\.weight"):
        merge_lora(other, [adapters[0]], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    shutil.rmtree(other)
    with pytest.raises(ModelError, match="is not a LoRA adapter"):
        merge_lora(tiny_model, [tiny_model], tmp_path / "out")
