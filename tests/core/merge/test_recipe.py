"""The mergekit recipe schema: parsing, gradients, filters, flag forms, and what is refused."""

from __future__ import annotations

import pytest

from llmctl.core.errors import UsageError
from llmctl.core.merge.config import Conditional, evaluate, load_recipe, parse_recipe, recipe_from_flags


def test_scalars_pass_through():
    assert evaluate(0.3, "model.layers.0.mlp.up_proj.weight", 0.7) == 0.3


@pytest.mark.parametrize(("t", "expected"), [(0.0, 0.0), (0.25, 0.25), (0.5, 0.5), (1.0, 1.0)])
def test_gradients_interpolate_along_the_layers(t, expected):
    assert evaluate([0.0, 0.5, 1.0], "x", t) == pytest.approx(expected)


def test_filtered_lists_take_the_first_matching_filter():
    setting = [
        Conditional(filter="mlp", value=0.3),
        Conditional(filter="self_attn", value=[0.0, 1.0]),
        Conditional(value=0.9),
    ]
    assert evaluate(setting, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.3
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(setting, "model.norm.weight", 0.5) == 0.9
    assert evaluate([Conditional(filter="mlp", value=1)], "model.norm.weight", 0) is None


def test_a_yaml_recipe_parses_with_parameters_of_every_form(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        """
merge_method: ties
base_model: ./base
models:
  - model: ./a
    parameters: {weight: [0.2, 0.8], density: [{filter: mlp, value: 0.3}, {value: 0.6}]}
  - model: ./b
    parameters: {weight: 0.4, density: 0.5}
parameters: {normalize: true}
dtype: float32
tokenizer_source: base
"""
    )
    recipe = load_recipe(path)
    assert recipe.merge_method == "ties"
    assert recipe.model_paths() == ["./base", "./a", "./b"]
    assert isinstance(recipe.models[0].parameters["density"][0], Conditional)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"merge_method": "ties"}, "exactly one of 'models' and 'slices'"),
        ({"merge_method": "ties", "models": [{"model": "a"}], "colour": 1}, "colour"),
        ({"models": [{"model": "a"}]}, "merge_method"),
        ([1, 2], "mapping"),
    ],
)
def test_invalid_recipes_are_usage_errors_naming_the_problem(data, message):
    with pytest.raises(UsageError, match=message):
        parse_recipe(data, "merge.yaml")


def test_flag_form_builds_the_same_recipe_as_yaml():
    recipe = recipe_from_flags(
        "ties", ["a", "b"], base="base", weights=[0.6, 0.4], per_model={"density": [0.5]}
    )
    assert recipe.models[0].parameters == {"weight": 0.6, "density": 0.5}
    assert recipe.models[1].parameters == {"weight": 0.4, "density": 0.5}
    with pytest.raises(UsageError, match="3 values for 2 models"):
        recipe_from_flags("ties", ["a", "b"], base="base", weights=[1, 2, 3])
