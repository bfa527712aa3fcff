"""Device, dtype and seed: resolved the same way by every command."""

from __future__ import annotations

import random

from llmctl.core.errors import LlmctlError, UsageError


def resolve_device(device: str = "auto"):
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error, not a silent fallback."""
    import torch

    device = (device or "auto").strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"invalid --device {device!r}: expected auto, cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"invalid --device {device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LlmctlError(
                f"--device {device} was asked for but no CUDA GPU is available; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LlmctlError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


def resolve_dtype(dtype: str = "auto", device=None, model_dtype=None):
    """``auto`` → float32 on CPU (fast and exact there), the model's own dtype (or bfloat16) on CUDA."""
    import torch

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = str(getattr(dtype, "value", dtype) or "auto").strip().lower()
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise UsageError(f"invalid --dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    if device is None or torch.device(device).type == "cpu":
        return torch.float32
    if isinstance(model_dtype, str):
        model_dtype = names.get(model_dtype)
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    import torch

    torch.manual_seed(seed)
