"""Loading and saving Hugging Face directories: offline, on the asked dtype, sharded when large."""

import json

import pytest
import torch

from llmctl.core.errors import ModelError, UsageError
from llmctl.core.models.hf import load_model, load_tokenizer, resolve_model, save_model


def test_load_model_honours_dtype_and_runs_offline(tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = resolve_model(tiny_model)
    model = load_model(ref, device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training
    assert next(load_model(ref, device="cpu").parameters()).dtype == torch.float32  # auto on CPU


def test_save_model_shards_with_an_index_above_the_threshold(tiny_model, tmp_path):
    ref = resolve_model(tiny_model)
    model, tokenizer = load_model(ref, device="cpu"), load_tokenizer(ref)
    save_model(model, tokenizer, tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = load_model(resolve_model(tmp_path / "sharded"), device="cpu")
    ids = torch.tensor([[1, 50, 60, 70]])
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_cuda_without_a_gpu_is_a_clear_error(tiny_model):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(Exception, match="no CUDA GPU is available"):
        load_model(resolve_model(tiny_model), device="cuda")


def test_bad_device_is_a_usage_error(tiny_model):
    with pytest.raises(UsageError, match="invalid --device"):
        load_model(resolve_model(tiny_model), device="tpu")


def test_a_broken_weights_file_is_a_model_error(tiny_model, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot load the model"):
        load_model(resolve_model(broken), device="cpu")
