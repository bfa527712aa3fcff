"""bitsandbytes NF4/int8 export: the tensors and config transformers writes for a BitsAndBytesConfig model,
loaded back by transformers on the CPU with the logits of transformers quantizing the model itself."""

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

CASES = {"bnb-nf4": "nf4", "bnb-int8": "int8"}


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """name -> (llmctl's output directory, transformers' own save of the same model quantized on load)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmctl.core.quantize import QuantizeOptions, quantize_model

    root = tmp_path_factory.mktemp("bnb")
    configs = {
        "bnb-nf4": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True,
        ),  # fmt: skip
        "bnb-int8": BitsAndBytesConfig(load_in_8bit=True),
    }
    out = {}
    for method, config in configs.items():
        quantize_model(str(tiny_model), root / method, QuantizeOptions(method=method))
        theirs = AutoModelForCausalLM.from_pretrained(
            str(tiny_model), quantization_config=config, dtype=torch.float32, device_map="cpu"
        )
        theirs.save_pretrained(root / f"{method}-hf")
        out[method] = (root / method, root / f"{method}-hf", theirs)
    return out


@pytest.mark.parametrize("method", list(CASES))
def test_bnb_tensors_and_config_equal_what_transformers_saves(exported, method):
    from safetensors.torch import load_file

    ours_dir, theirs_dir, _ = exported[method]
    ours, theirs = (
        load_file(str(ours_dir / "model.safetensors")),
        load_file(str(theirs_dir / "model.safetensors")),
    )
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    config = json.loads((ours_dir / "config.json").read_text())["quantization_config"]
    assert config == json.loads((theirs_dir / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("method", list(CASES))
def test_transformers_loads_the_bnb_export_with_its_own_quantized_logits(exported, method):
    from transformers import AutoModelForCausalLM

    ours_dir, _, theirs = exported[method]
    loaded = AutoModelForCausalLM.from_pretrained(str(ours_dir), dtype=torch.float32, device_map="cpu")
    assert loaded.config.quantization_config.quant_method == "bitsandbytes"
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, theirs(ids).logits, atol=1e-5)


def test_llmctl_eval_runs_a_bnb_nf4_export(cli, exported, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    result = cli("eval", exported["bnb-nf4"][0], "--task", "perplexity", "--data", text, "--max-length", "64",
                 "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["results"]["perplexity"]["byte_perplexity,none"] > 1


def test_bnb_methods_write_only_their_own_format(tiny_model, tmp_path):
    from llmctl.core.errors import UsageError
    from llmctl.core.quantize import QuantizeOptions

    with pytest.raises(UsageError, match="writes --format bitsandbytes only"):
        QuantizeOptions(method="bnb-nf4", fmt="gptq").resolved()
    assert QuantizeOptions(method="bnb-int8").resolved().bits == 8


def test_llmctl_generate_refuses_a_bnb_checkpoint_in_one_line(cli, exported, tmp_path):
    result = cli("generate", exported["bnb-int8"][0], "--prompt", "hi", "--max-tokens", "2")
    assert result.exit_code == 1 and "bitsandbytes checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
