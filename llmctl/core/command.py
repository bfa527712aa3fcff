"""How every command runs: one line per error, the documented exit codes, clean exits on closed pipes.

``@cli_command("convert")`` wraps a command function. It reads ``quiet`` and ``debug`` from the
function's own (shared) options, starts ``ui`` for the command, and maps what escapes the function:

- :class:`LlmctlError` → ``llmctl convert: error: <message>`` and its exit code (1, 2 or 3);
- ``KeyboardInterrupt`` → exit 130;
- ``BrokenPipeError`` (the reader of stdout went away, as with ``| head``) → exit 0, nothing printed;
- anything else → a one-line error with the exception type, exit 1; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from typer import TyperException

from llmctl.core.console import ui
from llmctl.core.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, LlmctlError

F = TypeVar("F", bound=Callable[..., Any])


def silence_stdout() -> None:
    """After EPIPE: point fd 1 at /dev/null so that the interpreter's final flush cannot fail again."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test runner's buffer)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def cli_command(name: str) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ui.begin(name, quiet=bool(kwargs.get("quiet", False)), debug=bool(kwargs.get("debug", False)))
            try:
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort, TyperException):
                raise
            except LlmctlError as e:
                _fail(e.message, e.exit_code, show_traceback=ui.debug)
            except KeyboardInterrupt:
                _fail("interrupted", EXIT_INTERRUPTED, show_traceback=ui.debug)
            except BrokenPipeError:
                silence_stdout()
                raise typer.Exit(EXIT_OK) from None
            except Exception as e:  # a bug or an unexpected library failure
                hint = "" if ui.debug else " (rerun with --debug for the traceback)"
                _fail(f"{type(e).__name__}: {e}{hint}", EXIT_FAILURE, show_traceback=ui.debug)

        return wrapper  # type: ignore[return-value]

    return decorate


def _fail(message: str, code: int, *, show_traceback: bool) -> None:
    if show_traceback:
        traceback.print_exc(file=sys.stderr)
    ui.error(message)
    raise typer.Exit(code)
