"""The merge recipe: mergekit's YAML schema, validated with pydantic at the boundary.

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 0.6, density: 0.5}
      - model: ./code
        parameters:
          weight: [0.2, 0.8]                      # a gradient over the layers
          density: [{filter: mlp, value: 0.3}, {value: 0.6}]   # by tensor name
    parameters: {normalize: true}
    dtype: float32
    tokenizer_source: base

or ``slices:`` of ``sources: [{model, layer_range: [a, b]}]``. The flag forms of ``llmctl merge`` build
the same object (:func:`recipe_from_flags`), so both paths run the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from llmctl.core.errors import UsageError

Scalar = Union[bool, int, float, str]  # noqa: UP007 - pydantic tries the members in order
ScalarOrGradient = Union[Scalar, list[Scalar]]  # noqa: UP007


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: ScalarOrGradient
    filter: str | None = None


Setting = Union[Conditional, list[Conditional], ScalarOrGradient]  # noqa: UP007
Parameters = dict[str, Setting]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelInput(_Strict):
    model: str
    parameters: Parameters | None = None


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


class OutputSlice(_Strict):
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: Parameters | None = None


class MergeRecipe(_Strict):
    merge_method: str
    models: list[ModelInput] | None = None
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # "base", "union" or a model path
    chat_template: str | None = None  # a template string, or the name of a model's to copy

    @model_validator(mode="after")
    def _one_of_models_or_slices(self):
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' and 'slices'")
        return self

    def model_paths(self) -> list[str]:
        """Every model the recipe reads, base first, each once, in order of appearance."""
        paths = [self.base_model] if self.base_model else []
        for s in self.slices or []:
            if s.base_model:
                paths.append(s.base_model)
            paths.extend(src.model for src in s.sources)
        paths.extend(m.model for m in self.models or [])
        return list(dict.fromkeys(paths))


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def parse_recipe(data: Any, source: str = "recipe") -> MergeRecipe:
    if not isinstance(data, dict):
        raise UsageError(f"{source}: a merge recipe is a mapping with merge_method and models or slices")
    try:
        return MergeRecipe.model_validate(data)
    except ValidationError as e:
        raise UsageError(f"{source}: invalid merge recipe: {_first_error(e)}") from None


def load_recipe(path: str | Path) -> MergeRecipe:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot read merge recipe {path}: {first}") from None
    return parse_recipe(data, str(path))


def is_recipe(data: Any) -> bool:
    """A YAML mapping is a mergekit recipe (not a file of option defaults) when it names a merge_method."""
    return isinstance(data, dict) and "merge_method" in data


def recipe_from_flags(
    method: str,
    models: list[str],
    *,
    base: str | None = None,
    weights: list[float] | None = None,
    parameters: dict[str, Any] | None = None,
    per_model: dict[str, list[float]] | None = None,
    dtype: str | None = None,
    tokenizer_source: str | None = None,
) -> MergeRecipe:
    """The recipe that ``llmctl merge [--base B] A B --METHOD --weights ...`` means."""
    per_model = dict(per_model or {})
    if weights is not None:
        per_model["weight"] = weights
    inputs = []
    for i, path in enumerate(models):
        params = {}
        for name, values in per_model.items():
            if len(values) not in (1, len(models)):
                raise UsageError(f"--{name}s has {len(values)} values for {len(models)} models")
            params[name] = values[i] if len(values) > 1 else values[0]
        inputs.append({"model": path, "parameters": params or None})
    return parse_recipe(
        {
            "merge_method": method,
            "base_model": base,
            "models": inputs,
            "parameters": parameters or None,
            "dtype": dtype,
            "tokenizer_source": tokenizer_source,
        },
        "command line",
    )


def evaluate(setting: Setting, tensor_name: str, t: float) -> Any:
    """A parameter's value for one tensor: scalars as they are, gradients interpolated at ``t`` (the
    layer's position, 0 for the first layer and 1 for the last), filtered lists by the first entry whose
    filter is a substring of the tensor name (or has no filter). None when no entry matches."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, bool | int | float | str):
        return setting
    if not setting:
        return None
    if all(isinstance(v, bool | int | float | str) for v in setting):
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if not isinstance(cond, Conditional):
            raise UsageError(f"a parameter list mixes values and filters: {setting!r}")
        if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
            return evaluate(cond.value, tensor_name, t)
    return None
