"""Shared by the benchmark scripts (not a benchmark itself: tests/test_benchmarks.py skips _files)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def bench_model(model: str | None, quick: bool, tmp: Path) -> str:
    """The model a benchmark runs: the one asked for, a fresh llama-tiny with --quick, else SmolLM2."""
    if model:
        return model
    if quick:
        tiny = tmp / "tiny"
        subprocess.run([sys.executable, "-m", "llmctl", "init", "-o", str(tiny), "--quiet"], check=True)
        return str(tiny)
    from llmctl.core.models.smollm2 import fetch_smollm2

    return str(fetch_smollm2())
