"""llmctl's merges equal mergekit's on the same fine-tunes and recipe (float32, 1e-6)."""

from __future__ import annotations

import pytest
import torch
import yaml

from llmctl.core.merge import parse_recipe, run_merge
from llmctl.core.merge.loader import LazyModel
from tests.core.merge.fixtures import make_family

mergekit = pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("merge-family"))


def _recipes(base, ft1, ft2, ft3) -> dict[str, str]:
    return {
        "linear": f"""
merge_method: linear
models:
  - {{model: {ft1}, parameters: {{weight: 0.7}}}}
  - {{model: {ft2}, parameters: {{weight: 0.3}}}}
""",
        "linear_gradient_unnormalized": f"""
merge_method: linear
models:
  - {{model: {ft1}, parameters: {{weight: [0.2, 0.8]}}}}
  - {{model: {ft2}, parameters: {{weight: [1.0, 0.1]}}}}
  - {{model: {ft3}, parameters: {{weight: 0.5}}}}
parameters: {{normalize: false}}
""",
        "task_arithmetic": f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {ft1}, parameters: {{weight: 0.5}}}}
  - {{model: {ft2}, parameters: {{weight: 0.5}}}}
parameters: {{lambda: 0.8}}
""",
        "ties": f"""
merge_method: ties
base_model: {base}
models:
  - {{model: {ft1}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.5}}}}
  - {{model: {ft3}, parameters: {{weight: 0.3, density: 0.2}}}}
""",
        "ties_filtered_density": f"""
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: 0.6
      density: [{{filter: mlp, value: 0.3}}, {{filter: self_attn, value: [0.2, 0.9]}}, {{value: 0.7}}]
  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.5}}}}
parameters: {{normalize: false}}
""",
        "breadcrumbs": f"""
merge_method: breadcrumbs
base_model: {base}
models:
  - {{model: {ft1}, parameters: {{weight: 0.5, density: 0.8, gamma: 0.05}}}}
  - {{model: {ft2}, parameters: {{weight: 0.5, density: 0.9}}}}
""",
        "breadcrumbs_ties": f"""
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - {{model: {ft1}, parameters: {{weight: 0.5, density: 0.8, gamma: 0.05}}}}
  - {{model: {ft2}, parameters: {{weight: 0.5, density: 0.9}}}}
""",
        "dare_ties_density_1": f"""
merge_method: dare_ties
base_model: {base}
models:
  - {{model: {ft1}, parameters: {{weight: 0.6, density: 1.0}}}}
  - {{model: {ft2}, parameters: {{weight: 0.4, density: 1.0}}}}
""",
        "slerp_gradients_and_filters": f"""
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {ft1}}}]
parameters:
  t:
    - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}
    - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}
    - {{value: 0.5}}
""",
        "slerp_fine_tunes": f"""
merge_method: slerp
base_model: {ft1}
models: [{{model: {ft1}}}, {{model: {ft2}}}]
parameters: {{t: 0.35}}
""",
        "model_stock": f"""
merge_method: model_stock
base_model: {base}
models: [{{model: {ft1}}}, {{model: {ft2}}}, {{model: {ft3}}}]
""",
        "model_stock_filter_wise": f"""
merge_method: model_stock
base_model: {base}
models: [{{model: {ft1}}}, {{model: {ft2}}}]
parameters: {{filter_wise: true}}
""",
        "slices_two_output_slices": f"""
merge_method: linear
slices:
  - sources:
      - {{model: {ft1}, layer_range: [0, 1], parameters: {{weight: 0.9}}}}
      - {{model: {ft2}, layer_range: [1, 2], parameters: {{weight: 0.1}}}}
  - sources:
      - {{model: {ft1}, layer_range: [1, 2], parameters: {{weight: 0.2}}}}
      - {{model: {ft3}, layer_range: [0, 1], parameters: {{weight: 0.8}}}}
""",
    }


CASES = list(_recipes("b", "1", "2", "3"))


def _tensors(path) -> dict[str, torch.Tensor]:
    model = LazyModel(path)
    return {name: model.get(name) for name in model.names()}


def _mergekit(recipe: dict, out) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mk_run
    from mergekit.options import MergeOptions

    mk_run(MergeConfiguration.model_validate(recipe), str(out), MergeOptions(quiet=True, allow_crimes=True))


@pytest.mark.parametrize("case", CASES)
def test_merged_tensors_equal_mergekits(family, tmp_path, case):
    base, (ft1, ft2, ft3) = family
    recipe = yaml.safe_load(_recipes(base, ft1, ft2, ft3)[case])
    recipe["dtype"] = "float32"
    run_merge(parse_recipe(recipe), tmp_path / "ours")
    _mergekit(recipe, tmp_path / "theirs")
    ours, theirs = _tensors(tmp_path / "ours"), _tensors(tmp_path / "theirs")
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-6, msg=name)
    # the merge did something: not every tensor equals the first input's
    first = _tensors(ft1)
    assert any(not torch.equal(ours[n], first[n]) for n in ours)
