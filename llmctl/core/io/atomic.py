"""Atomic outputs: write to a hidden temporary sibling, rename into place only on success.

An interrupted or failed run never leaves a file or directory at the output path that looks complete;
at worst a hidden ``.NAME.llmctl-tmp-*`` sibling remains after a SIGKILL (nothing can clean up after
that), which no tool mistakes for the output. An existing output is refused unless ``force``.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmctl.core.errors import OutputExistsError

TMP_MARK = ".llmctl-tmp-"


def check_output(path: str | Path, *, force: bool) -> Path:
    """Fail early (before any work) when ``path`` exists and ``force`` is not set."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"output {path} already exists; pass --force to overwrite it")
    return path


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}{tag}{os.getpid()}-{secrets.token_hex(4)}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | Path, *, force: bool = False, is_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path to fill; on success it replaces ``path``, on any failure it is removed."""
    path = check_output(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_MARK)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:  # KeyboardInterrupt and SystemExit (SIGTERM) included
        _remove(tmp)
        raise
    try:
        check_output(path, force=force)  # someone may have created it meanwhile
        if os.path.lexists(path) and (path.is_dir() or tmp.is_dir()):
            # os.replace cannot put a directory over a file or over a non-empty directory: move it aside.
            old = _sibling(path, ".llmctl-old-")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
