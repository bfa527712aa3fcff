"""Kernel tests: every Triton kernel against its torch reference, on CUDA when there is one, else on the
CPU under ``TRITON_INTERPRET=1`` (set by the top-level conftest before Triton is imported).

Outputs are poisoned (``LLMCTL_KERNELS_POISON=1``) so unwritten elements fail, and the relative error
‖out − ref‖/‖ref‖ of every comparison is printed (``pytest -s`` or ``-rA`` shows it).
"""

from __future__ import annotations

import pytest
import torch

ON_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv("LLMCTL_KERNELS_POISON", "1")
    monkeypatch.setenv("LLMCTL_KERNELS", "triton")


@pytest.fixture
def device() -> str:
    return "cuda" if ON_CUDA else "cpu"
