"""The merge methods, by name. Adding one is adding a file and a line here."""

from __future__ import annotations

from llmctl.core.errors import UsageError
from llmctl.core.merge.methods.base import Inputs, MergeMethod, Param, Scope
from llmctl.core.merge.methods.linear import LINEAR
from llmctl.core.merge.methods.model_stock import MODEL_STOCK
from llmctl.core.merge.methods.slerp import SLERP
from llmctl.core.merge.methods.task_arithmetic import METHODS as TASK_VECTOR_METHODS

REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> None:
    if method.name in REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    REGISTRY[method.name] = method


for _m in (LINEAR, SLERP, MODEL_STOCK, *TASK_VECTOR_METHODS):
    register(_m)


def get_method(name: str) -> MergeMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown merge method {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["REGISTRY", "Inputs", "MergeMethod", "Param", "Scope", "get_method", "register"]
