import json

from transformers import AutoModelForCausalLM


def test_inspect_json_parameter_count_equals_the_loaded_models(cli, tiny_model):
    result = cli("inspect", tiny_model, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert sum(info["parameters_by_module"].values()) == info["parameters"]
    # llama-tiny: embedding 259x64 (tied), 2 layers of attention (q,o 64x64; k,v 32x64) and mlp (3x 64x128)
    assert info["parameters_by_module"]["embedding"] == 259 * 64
    assert info["parameters_by_module"]["attention"] == 2 * (2 * 64 * 64 + 2 * 32 * 64)
    assert info["parameters_by_module"]["mlp"] == 2 * 3 * 64 * 128
    assert info["parameters_by_module"]["norm"] == 64 * 5
    assert info["layers"] == 2 and info["kv_heads"] == 2 and info["context_length"] == 512
    assert info["tokenizer"]["chat_template"]["style"] == "chatml"
    assert info["tokenizer"]["eos_token"] == "<|im_end|>"


def test_inspect_prints_a_table_without_json(cli, tiny_model):
    result = cli("inspect", tiny_model)
    assert result.exit_code == 0
    assert "LlamaForCausalLM" in result.stdout and "parameters" in result.stdout
