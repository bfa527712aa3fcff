"""From a recipe to a list of tensor jobs: which input tensors make each output tensor, with what parameters.

Everything is checked here, before any tensor is read or any byte written: the method exists, every model
is a safetensors model, shapes agree, every required parameter resolves for every tensor and densities are
in (0, 1]. Layer positions follow mergekit: within an output slice of n layers the i-th has
``t = i / (n - 1)`` (``t = 1`` when n = 1), and tensors outside the layers (embeddings, final norm,
lm_head) have ``t = 0``; embeddings come from the first slice's models, the rest from the last slice's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from llmctl.core.errors import ModelError, UsageError
from llmctl.core.merge.config import MergeRecipe, Parameters, evaluate
from llmctl.core.merge.loader import LazyModel
from llmctl.core.merge.methods import MergeMethod, Scope, get_method

LAYER = re.compile(r"^(?P<prefix>.*?\blayers\.)(?P<index>\d+)(?P<suffix>\..+)$")


@dataclass
class TensorJob:
    name: str  # output tensor name
    sources: list[tuple[str, str]]  # (model path, input tensor name), in input order
    base: int | None  # index in sources of the base model, if the method uses one
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]
    shape: tuple[int, ...] = ()


@dataclass
class _Slice:
    sources: list[tuple[str, int, int, Parameters | None]]  # (model, first layer, end layer, parameters)
    base: str | None
    parameters: Parameters | None


@dataclass
class MergePlan:
    method: MergeMethod
    recipe: MergeRecipe
    models: dict[str, LazyModel]
    template: str  # the model whose config and non-layer tensor names the output follows
    jobs: list[TensorJob] = field(default_factory=list)
    num_layers: int = 0
    warnings: list[str] = field(default_factory=list)


def _num_layers(model: LazyModel) -> int:
    config = model.config()
    n = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
    if n is None:
        indices = {int(m.group("index")) for name in model.names() if (m := LAYER.match(name))}
        n = max(indices) + 1 if indices else 0
    return int(n)


def _slices(recipe: MergeRecipe, models: dict[str, LazyModel]) -> list[_Slice]:
    if recipe.slices:
        return [
            _Slice(
                [(s.model, *s.layer_range, s.parameters) for s in out.sources],
                out.base_model or recipe.base_model,
                out.parameters,
            )
            for out in recipe.slices
        ]
    sources = [(m.model, 0, _num_layers(models[m.model]), m.parameters) for m in recipe.models or []]
    if recipe.base_model and recipe.base_model not in [s[0] for s in sources]:
        sources.append((recipe.base_model, 0, _num_layers(models[recipe.base_model]), None))
    return [_Slice(sources, recipe.base_model, None)]


def _resolve(
    method: MergeMethod,
    recipe: MergeRecipe,
    sl: _Slice,
    out_name: str,
    inputs: list[tuple[str, str]],
    base: int | None,
    t: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Parameters for one output tensor, in mergekit's precedence: the model's own, the slice's, the
    recipe's, the method's default."""
    shared: dict[str, Any] = {}
    scopes = [sl.parameters, recipe.parameters]
    for p in method.params:
        if p.scope != Scope.SHARED:
            continue
        shared[p.name] = _value(p, scopes, out_name, t, f"tensor {out_name}")
    per_input = []
    for i, (model, in_name) in enumerate(inputs):
        own = next((s[3] for s in sl.sources if s[0] == model), None)
        values = {}
        for p in method.params:
            if p.scope == Scope.INPUT or (p.scope == Scope.NON_BASE and i != base):
                values[p.name] = _value(p, [own, *scopes], in_name, t, f"model {model}, tensor {in_name}")
        per_input.append(values)
    return shared, per_input


def _value(param, scopes: list[Parameters | None], tensor_name: str, t: float, where: str) -> Any:
    for scope in scopes:
        if scope and param.name in scope:
            value = evaluate(scope[param.name], tensor_name, t)
            if value is not None:
                return param.validate(value, where)
    if param.required:
        raise UsageError(
            f"merge method needs parameter {param.name} for {where} (e.g. --{param.name} or "
            f"parameters: {{{param.name}: ...}})"
        )
    return param.default


def build_plan(recipe: MergeRecipe, models: dict[str, LazyModel]) -> MergePlan:
    method = get_method(recipe.merge_method)
    slices = _slices(recipe, models)
    template = recipe.base_model or slices[0].sources[0][0]
    plan = MergePlan(method, recipe, models, template)
    known = {p.name for p in method.params}
    for scope in [
        recipe.parameters,
        *(s.parameters for s in slices),
        *(src[3] for s in slices for src in s.sources),
    ]:
        for name in scope or {}:
            if name not in known:
                plan.warnings.append(f"parameter {name} is not used by merge method {method.name}; ignored")
    for sl in slices:
        names = [s[0] for s in sl.sources]
        has_base = method.base == "required" and sl.base is not None
        if method.base == "required" and sl.base is not None and sl.base not in names:
            raise UsageError(f"base model {sl.base} is not among the slice's sources")
        method.check_models(len(names), has_base)
        lengths = {end - start for _, start, end, _ in sl.sources}
        if len(lengths) != 1:
            raise UsageError("all sources of a slice must have the same number of layers")
        for model, start, end, _ in sl.sources:
            n = _num_layers(models[model])
            if not 0 <= start <= end <= n:
                raise UsageError(f"layer_range [{start}, {end}] is outside {model}'s {n} layers")

    def base_index(sl: _Slice) -> int | None:
        if method.base != "required" or sl.base is None:
            return None
        return [s[0] for s in sl.sources].index(sl.base)

    def add(out_name: str, sl: _Slice, in_names: list[str], t: float) -> None:
        inputs = list(zip([s[0] for s in sl.sources], in_names, strict=True))
        shapes = set()
        for model, in_name in inputs:
            if in_name not in models[model]:
                raise ModelError(f"tensor {in_name} is missing from {model}")
            shapes.add(models[model].info(in_name).shape)
        if len(shapes) > 1 and not _is_vocab(out_name):
            detail = ", ".join(f"{m}: {list(models[m].info(n).shape)}" for m, n in inputs)
            raise ModelError(f"tensor {out_name} has different shapes ({detail}): the architectures differ")
        b = base_index(sl)
        shared, per_input = _resolve(method, recipe, sl, out_name, inputs, b, t)
        plan.jobs.append(TensorJob(out_name, inputs, b, shared, per_input, next(iter(shapes))))

    template_model = models[template]
    outside = [n for n in template_model.names() if not LAYER.match(n)]
    pre = [n for n in outside if "embed" in n]
    post = [n for n in outside if "embed" not in n]
    for name in pre:
        add(name, slices[0], [name] * len(slices[0].sources), 0.0)
    out_layer = 0
    for sl in slices:
        first_model, first_start = sl.sources[0][0], sl.sources[0][1]
        length = sl.sources[0][2] - first_start
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            suffixes = _layer_suffixes(models[first_model], first_start + offset)
            for prefix, suffix in suffixes:
                in_names = [f"{prefix}{start + offset}{suffix}" for _, start, _, _ in sl.sources]
                add(f"{prefix}{out_layer}{suffix}", sl, in_names, t)
            out_layer += 1
    for name in post:
        add(name, slices[-1], [name] * len(slices[-1].sources), 0.0)
    plan.num_layers = out_layer
    return plan


def _layer_suffixes(model: LazyModel, index: int) -> list[tuple[str, str]]:
    out = []
    for name in model.names():
        m = LAYER.match(name)
        if m and int(m.group("index")) == index:
            out.append((m.group("prefix"), m.group("suffix")))
    return out


def _is_vocab(name: str) -> bool:
    return "embed_tokens" in name or "lm_head" in name or name.endswith("wte.weight")
