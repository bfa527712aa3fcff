"""``llmctl.json``: what made a model directory, so any output can be traced back to its inputs."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from llmctl import __version__

PROVENANCE_FILE = "llmctl.json"
HASH_LIMIT = 512 * 1024 * 1024  # inputs up to this size get a sha256; larger ones only their size


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_input(path: str | Path) -> dict[str, Any]:
    """Path, size and sha256 of a file input; for a directory, the same for each file in it."""
    p = Path(path)
    if str(path) == "-":
        return {"path": "-"}
    if p.is_file():
        size = p.stat().st_size
        entry: dict[str, Any] = {"path": str(p.resolve()), "bytes": size}
        if size <= HASH_LIMIT:
            entry["sha256"] = sha256_file(p)
        return entry
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return {"path": str(p.resolve()), "files": [describe_input(f) | {"path": f.name} for f in files]}
    return {"path": str(p)}


def versions() -> dict[str, str]:
    out = {"llmctl": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "safetensors", "gguf"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            out[name] = module.__version__
    return out


def write_provenance(
    directory: Path,
    *,
    command: str,
    inputs: list[str | Path],
    started_at: str,
    seed: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    record = {
        "llmctl_version": __version__,
        "command": command,
        "argv": shlex.join(["llmctl", *sys.argv[1:]]) if sys.argv else "llmctl",
        "inputs": [describe_input(p) for p in inputs],
        "seed": seed,
        "started_at": started_at,
        "finished_at": now(),
        "versions": versions(),
    }
    if extra:
        record.update(extra)
    path = Path(directory) / PROVENANCE_FILE
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
