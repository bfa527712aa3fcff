"""Tokenizer checks (--tokenizer-source) and bad input: one error naming the model/tensor, nothing written."""

from __future__ import annotations

import shutil

import pytest
import torch

from llmctl.core.errors import ModelError, UsageError
from llmctl.core.merge import parse_recipe, run_merge
from llmctl.core.merge.loader import LazyModel
from tests.core.merge.fixtures import make_family

EXTRA = ["<|tool|>", "<|think|>"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("merge-family"))


@pytest.fixture(scope="module")
def extended(family, tmp_path_factory):
    """ft2 with two added tokens (and embedding rows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, (_, ft2, _) = family
    out = tmp_path_factory.mktemp("extended") / "ft2-ext"
    tok = AutoTokenizer.from_pretrained(ft2)
    tok.add_tokens(EXTRA)
    model = AutoModelForCausalLM.from_pretrained(ft2, dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[-2:] = torch.tensor([[1.0] * 64, [-1.0] * 64])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _linear(a, b, **extra):
    return parse_recipe(
        {
            "merge_method": "linear",
            "dtype": "float32",
            **extra,
            "models": [
                {"model": str(a), "parameters": {"weight": 0.5}},
                {"model": str(b), "parameters": {"weight": 0.5}},
            ],
        }
    )


def _embed(path):
    return LazyModel(path).get("model.embed_tokens.weight")


def test_different_vocabularies_are_refused_without_a_tokenizer_source(family, extended, tmp_path):
    _, (ft1, _, _) = family
    with pytest.raises(UsageError, match="vocabularies differ.*--tokenizer-source"):
        run_merge(_linear(ft1, extended), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tokenizer_source_base_keeps_the_base_vocabulary(family, extended, tmp_path):
    _, (ft1, _, _) = family
    run_merge(_linear(ft1, extended, tokenizer_source="base"), tmp_path / "out")
    out = _embed(tmp_path / "out")
    assert out.shape[0] == _embed(ft1).shape[0]
    assert torch.allclose(out, 0.5 * _embed(ft1) + 0.5 * _embed(extended)[: out.shape[0]], atol=1e-6)


def test_tokenizer_source_union_adds_tokens_with_their_own_rows(family, extended, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, (ft1, _, _) = family
    run_merge(_linear(ft1, extended, tokenizer_source="union"), tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    out = _embed(tmp_path / "out")
    assert len(tok) == out.shape[0] == _embed(ft1).shape[0] + 2
    ids = tok.convert_tokens_to_ids(EXTRA)
    # ft1 lacks the new tokens, so it contributes the extended model's rows there: no garbling
    assert torch.allclose(out[ids], _embed(extended)[-2:])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == len(tok)


def test_tokenizer_source_model_path_takes_that_models_vocabulary(family, extended, tmp_path):
    _, (ft1, _, _) = family
    run_merge(_linear(ft1, extended, tokenizer_source=str(extended)), tmp_path / "out")
    assert _embed(tmp_path / "out").shape[0] == _embed(extended).shape[0]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (extended / "tokenizer.json").read_text()


def test_mismatched_architectures_name_the_tensor_and_write_nothing(family, tmp_path):
    from llmctl.core.models.init import init_model

    base, (ft1, _, _) = family
    other = tmp_path / "wide"
    init_model("llama-tiny", other, seed=0, overrides={"intermediate_size": 96})
    with pytest.raises(ModelError, match=r"mlp\.\w+_proj\.weight has different shapes"):
        run_merge(_linear(ft1, other), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_missing_tensor_names_the_model(family, tmp_path):
    from safetensors.torch import load_file, save_file

    _, (ft1, ft2, _) = family
    broken = tmp_path / "broken"
    shutil.copytree(ft2, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=f"model.layers.1.mlp.up_proj.weight is missing from {broken}"):
        run_merge(_linear(ft1, broken), tmp_path / "out")


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.0}}, r"density .* \(0, 1\]"),
        ({"merge_method": "ties", "parameters": {"density": 0.5}}, "needs parameter weight"),
        ({"merge_method": "slerp"}, "needs parameter t"),
        ({"merge_method": "frankenmerge"}, "unknown merge method"),
    ],
)
def test_bad_parameters_fail_before_anything_is_written(family, tmp_path, recipe, message):
    base, (ft1, _, _) = family
    recipe = {**recipe, "base_model": str(base), "models": [{"model": str(base)}, {"model": str(ft1)}]}
    with pytest.raises(UsageError, match=message):
        run_merge(parse_recipe(recipe), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_random_methods_are_reproducible_and_seed_dependent(family, tmp_path):
    from llmctl.core.merge import MergeOptions

    base, (ft1, ft2, _) = family
    recipe = parse_recipe(
        {
            "merge_method": "dare_ties",
            "base_model": str(base),
            "parameters": {"weight": 0.5, "density": 0.3},
            "models": [{"model": str(ft1)}, {"model": str(ft2)}],
        }
    )
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_merge(recipe, tmp_path / name, options=MergeOptions(seed=seed))
    a, b, c = ((tmp_path / n / "model.safetensors").read_bytes() for n in "abc")
    assert a == b != c
