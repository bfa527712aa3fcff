import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmctl.core.models.presets import PRESETS


def _weights(directory):
    return load_file(str(directory / "model.safetensors"))


def test_init_is_reproducible_for_a_seed_and_differs_across_seeds(cli, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        result = cli("init", "--preset", "llama-tiny", "--seed", seed, "-o", tmp_path / name, "--quiet")
        assert result.exit_code == 0, result.stderr
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny", "mistral-tiny"])
def test_tiny_presets_load_in_transformers_and_run_a_forward_pass(cli, tmp_path, preset):
    out = tmp_path / preset
    assert cli("init", "--preset", preset, "-o", out, "--quiet").exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == PRESETS[preset].model_type
    ids = tokenizer("héllo wörld 👋", return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))
    assert tokenizer.decode(ids["input_ids"][0]) == "héllo wörld 👋"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n"
    provenance = json.loads((out / "llmctl.json").read_text())
    assert provenance["command"] == "init" and provenance["seed"] == 0


def test_vocab_from_takes_the_tokenizer_of_another_model(cli, tmp_path, tiny_model):
    # A tokenizer with extra tokens, so the vocab size visibly follows it.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_tokens(["<extra_1>", "<extra_2>"])
    source = tmp_path / "tok"
    tokenizer.save_pretrained(source)
    out = tmp_path / "model"
    result = cli("init", "--preset", "qwen2-tiny", "--vocab-from", source, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["vocab_size"] == len(tokenizer) == 261
    assert AutoTokenizer.from_pretrained(out)("<extra_2>")["input_ids"] == [260]


def test_unknown_preset_is_a_usage_error_and_writes_nothing(cli, tmp_path):
    result = cli("init", "--preset", "gpt-5", "-o", tmp_path / "m")
    assert result.exit_code == 2
    assert "'gpt-5' is not one of" in result.stderr and "llama-tiny" in result.stderr
    assert not (tmp_path / "m").exists()


def test_existing_output_is_refused_without_force(cli, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = cli("init", "-o", out)
    assert result.exit_code == 2
    assert "already exists; pass --force" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    assert cli("init", "-o", out, "--force", "--quiet").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
