"""What every kernel file shares: the optional Triton import, output allocation, launch checks.

Kernel modules import ``triton``/``tl`` from here, so that ``import llmctl.kernels`` works on a machine
without Triton (the torch references still run; the registry then has no Triton paths)::

    from llmctl.kernels._common import HAS_TRITON, tl, triton

    if HAS_TRITON:
        @triton.jit
        def _my_kernel(...): ...

Outputs are allocated with :func:`empty`. Under ``LLMCTL_KERNELS_POISON=1`` (the kernel tests set it) the
buffer is filled with NaN (integers: their minimum) first, so an element a kernel forgets to write fails
the comparison with the reference instead of passing by luck of a zeroed page.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CUDA builds of torch bring it, CPU machines may not have it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

POISON_ENV = "LLMCTL_KERNELS_POISON"


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``), as in CI."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def poisoning() -> bool:
    return os.environ.get(POISON_ENV, "0").strip() not in ("", "0")


def empty(*shape, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled (or int-min-filled) when poisoning is on."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if poisoning():
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        else:
            out.fill_(torch.iinfo(dtype).min)
    return out


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(*t.shape, dtype=dtype or t.dtype, device=t.device)


def check_launchable(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter: say so plainly."""
    from llmctl.core.errors import LlmctlError

    for t in tensors:
        if t.device.type == "cpu" and not interpreting():
            raise LlmctlError(
                "a Triton kernel was asked to run on CPU tensors; set TRITON_INTERPRET=1 (slow, for tests) "
                "or LLMCTL_KERNELS=torch"
            )


def interpreter_compat() -> None:
    """Let Triton 3.6's CPU interpreter take tensor loop bounds under NumPy >= 2.4 (idempotent).

    The interpreter turns a scalar tensor used as a ``range`` bound into an int with ``int(array)``, but
    its scalars are arrays of shape (1,), which NumPy 2.4 no longer converts. Kernels that loop up to runtime
    bounds (causal block skipping, varlen segments), exactly as they do on the GPU, call this first; it
    makes ``__index__`` take the single element instead. Only ever applied under ``TRITON_INTERPRET=1``.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_llmctl_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._llmctl_index_fix = True
    interpreter._patch_lang_tensor = patched


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
