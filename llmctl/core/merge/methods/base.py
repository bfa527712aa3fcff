"""What a merge method is: a name, a paper, the parameters it takes, and one function over tensors.

A method sees one output tensor at a time: the same-named tensor of every input model (already on the
compute device, in the working dtype) plus its parameters, resolved for that tensor (scalars, per-layer
gradients and name filters are evaluated before the method is called; see ``llmctl.core.merge.params``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch

from llmctl.core.errors import UsageError


class Scope(StrEnum):
    SHARED = "shared"  # one value for the tensor (t, normalize, lambda, ...)
    INPUT = "input"  # one value per input model, the base included (linear's weight)
    NON_BASE = "non_base"  # one value per input model except the base (weight and density of task vectors)


MISSING = object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float, bool or int
    scope: Scope
    default: Any = MISSING
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def validate(self, value: Any, where: str) -> Any:
        """Coerce a YAML/flag value to ``kind``; a wrong type is a usage error naming the tensor."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise UsageError(f"parameter {self.name} for {where} must be true or false, not {value!r}")
        try:
            out = self.kind(value)
        except (TypeError, ValueError):
            raise UsageError(f"parameter {self.name} for {where} must be a number, not {value!r}") from None
        if self.name == "density" and not 0 < out <= 1:
            raise UsageError(f"density for {where} must be in (0, 1], not {out}")
        return out


@dataclass(frozen=True)
class Inputs:
    """One output tensor's inputs: ``tensors[i]`` is model i's tensor; ``base`` indexes the base model."""

    tensors: list[torch.Tensor]
    base: int | None
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]  # per_input[i]: model i's INPUT and NON_BASE parameters
    generator: torch.Generator | None = None  # for random methods (DARE), seeded per tensor
    name: str = ""

    @property
    def non_base(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    pretty_name: str
    reference_url: str
    params: tuple[Param, ...]
    base: str = "ignored"  # "required" or "ignored"
    min_models: int = 1
    max_models: int | None = None
    random: bool = False  # uses the seed
    extra: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def check_models(self, count: int, has_base: bool) -> None:
        """``count`` input models (base included): enough for this method, and a base when it needs one."""
        if self.base == "required" and not has_base:
            raise UsageError(f"merge method {self.name} needs a base model (--base or base_model:)")
        if count < self.min_models:
            raise UsageError(
                f"merge method {self.name} needs at least {self.min_models} models (base included), "
                f"got {count}"
            )
        if self.max_models is not None and count > self.max_models:
            raise UsageError(
                f"merge method {self.name} takes at most {self.max_models} models (base included), "
                f"got {count}"
            )

    def merge(self, inputs: Inputs) -> torch.Tensor:  # pragma: no cover - every method overrides
        raise NotImplementedError


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Methods compute in float32 (float64 stays float64), whatever the storage dtype."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
