"""Where llmctl talks to people: stderr for messages and progress, stdout for data.

One process-wide ``ui`` object, reset at the start of every command, decides what is shown:
- messages, warnings and progress bars go to stderr only; ``--quiet`` silences all but errors;
- colour follows ``NO_COLOR`` / ``FORCE_COLOR`` and whether stderr is a terminal (rich implements these);
- progress bars are drawn only when stderr is a terminal (or ``FORCE_COLOR`` is set), never into a log file;
- data (JSONL records, ``--json`` summaries, tables that are a command's main output) go to stdout.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


class UI:
    def __init__(self) -> None:
        self.command = ""
        self.quiet = False
        self.debug = False
        self._err: Console | None = None

    def begin(self, command: str, *, quiet: bool = False, debug: bool = False) -> None:
        """Start a command: remember its name for error lines and rebuild the consoles from the env."""
        self.command = command
        self.quiet = quiet
        self.debug = debug or os.environ.get("LLMCTL_DEBUG", "") not in ("", "0")
        self._err = None
        quiet_third_party_libraries()

    @property
    def err(self) -> Console:
        if self._err is None:
            # highlight=False: do not colour numbers and paths in plain messages.
            self._err = Console(file=sys.stderr, stderr=True, highlight=False, soft_wrap=True)
        return self._err

    def out(self) -> Console:
        """A console on the current stdout (tables that are a command's main output)."""
        return Console(file=sys.stdout, highlight=False, soft_wrap=True)

    @property
    def prefix(self) -> str:
        return f"llmctl {self.command}" if self.command else "llmctl"

    # -- messages (stderr) ---------------------------------------------------------------------------------
    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message, markup=False)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.err.print(f"{self.prefix}: warning: {message}", style="yellow", markup=False)

    def error(self, message: str) -> None:
        # One line, always shown, even with --quiet.
        line = " ".join(message.split("\n"))
        self.err.print(f"{self.prefix}: error: {line}", style="bold red", markup=False)

    # -- data (stdout) -------------------------------------------------------------------------------------
    @staticmethod
    def print_json(obj: Any) -> None:
        sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")
        sys.stdout.flush()

    # -- progress (stderr, terminals only) -----------------------------------------------------------------
    @property
    def show_progress(self) -> bool:
        if self.quiet:
            return False
        if os.environ.get("FORCE_COLOR"):
            return True
        return self.err.is_terminal

    @contextmanager
    def progress(self, description: str, total: float | None = None) -> Iterator[_Bar]:
        """``with ui.progress("converting", total=n) as bar: bar.advance()``; a no-op when hidden."""
        if not self.show_progress:
            yield _Bar(None, None)
            return
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=self.err, transient=True) as progress:
            yield _Bar(progress, progress.add_task(description, total=total))

    def track(self, items: Iterable[T], description: str, total: float | None = None) -> Iterator[T]:
        with self.progress(description, total=total) as bar:
            for item in items:
                yield item
                bar.advance()


class _Bar:
    def __init__(self, progress: Progress | None, task: Any) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, completed: float, total: float | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, total=total)


def quiet_third_party_libraries() -> None:
    """transformers prints its own warnings and advice; llmctl owns stderr (see ``llmctl/core/__init__``)."""
    if "transformers" in sys.modules:
        _silence_transformers()


def _silence_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


ui = UI()
