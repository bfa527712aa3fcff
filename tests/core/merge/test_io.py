"""Streaming safetensors out (shards and index) and lazy tensors in."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmctl.core.errors import ModelError, UsageError
from llmctl.core.merge.loader import LazyModel
from llmctl.core.merge.writer import ShardedWriter, parse_size


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(16, 8, generator=g),
        "b.weight": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(3, 5, generator=g).to(torch.float16),
        "d.weight": torch.randn(33, generator=g),
    }


@pytest.mark.parametrize(("max_bytes", "shards"), [(10**9, 1), (600, 2), (1, 4)])
def test_streamed_shards_read_back_identically_with_an_index_when_sharded(tmp_path, max_bytes, shards):
    tensors = _tensors()
    specs = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with ShardedWriter(tmp_path, specs, max_bytes) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
        writer.finish()
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == shards
    if shards == 1:
        assert files == ["model.safetensors"]
        back = load_file(tmp_path / "model.safetensors")
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        back = {}
        for f in files:
            back.update(load_file(tmp_path / f))
    for name, t in tensors.items():
        assert torch.equal(back[name], t)
    (tmp_path / "config.json").write_text("{}")
    lazy = LazyModel(tmp_path)
    assert lazy.info("a.weight").shape == (16, 8) and lazy.info("b.weight").dtype == "BF16"
    assert torch.equal(lazy.get("d.weight"), tensors["d.weight"])


def test_writer_refuses_tensors_out_of_plan(tmp_path):
    with ShardedWriter(tmp_path, [("a", (2,), torch.float32)], 100) as writer:
        with pytest.raises(RuntimeError, match="expected a"):
            writer.write("b", torch.zeros(2))


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    with pytest.raises(UsageError):
        parse_size("lots")


def test_a_directory_without_weights_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        LazyModel(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="model.safetensors"):
        LazyModel(tmp_path)


def test_an_index_naming_a_missing_tensor_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00001.safetensors")
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelError, match="lists b"):
        LazyModel(tmp_path)
