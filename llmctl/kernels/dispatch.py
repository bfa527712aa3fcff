"""The kernel registry and dispatcher (see the package docstring for the rules)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

from llmctl.core.errors import LlmctlError, UsageError

BACKENDS = ("auto", "torch", "triton")
ENV = "LLMCTL_KERNELS"


@dataclass(frozen=True)
class KernelSpec:
    name: str
    torch: Callable  # the reference: readable, runs on any device
    triton: Callable | None  # the fast path; None until written
    reference: str = ""  # paper or source the formula comes from


_REGISTRY: dict[str, KernelSpec] = {}


def register_kernel(
    name: str, *, torch: Callable, triton: Callable | None = None, reference: str = ""
) -> None:
    if name in _REGISTRY:
        raise ValueError(f"kernel {name!r} is registered twice")
    _REGISTRY[name] = KernelSpec(name, torch, triton, reference)


def available_kernels() -> list[str]:
    return sorted(_REGISTRY)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_backend(on_cuda: bool) -> str:
    """``torch`` or ``triton``, from ``LLMCTL_KERNELS`` and where the inputs are."""
    forced = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if forced not in BACKENDS:
        raise UsageError(f"{ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
    if forced == "triton":
        if not triton_available():
            raise LlmctlError(f"{ENV}=triton but the triton package is not installed")
        return "triton"
    if forced == "torch":
        return "torch"
    return "triton" if on_cuda and triton_available() else "torch"


def get_kernel(name: str, *, on_cuda: bool) -> Callable:
    try:
        spec = _REGISTRY[name]
    except KeyError:
        known = ", ".join(available_kernels()) or "none yet"
        raise LlmctlError(f"unknown kernel {name!r}; registered: {known}") from None
    backend = kernel_backend(on_cuda)
    if backend == "triton":
        if spec.triton is None:
            if os.environ.get(ENV, "").strip().lower() == "triton":
                raise LlmctlError(f"kernel {name!r} has no Triton implementation yet ({ENV}=triton)")
            return spec.torch
        return spec.triton
    return spec.torch
