"""Errors that map onto llmctl's exit codes.

Every command raises one of these for a failure the user can act on; the CLI layer turns it into one line
on stderr (``llmctl <command>: error: <message>``) and the exit code below. Anything else is a bug and
exits 1 with a hint to rerun with ``--debug``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # runtime failure: a model that will not load, a disk that is full, ...
EXIT_USAGE = 2  # bad flags or arguments
EXIT_INPUT = 3  # invalid input data: malformed JSONL, a missing field, undecodable bytes
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class LlmctlError(Exception):
    """Base class: a failure with a message meant for the user and an exit code."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class UsageError(LlmctlError):
    """The command line asks for something impossible (exit 2)."""

    exit_code = EXIT_USAGE


class InputDataError(LlmctlError):
    """The input data is invalid (exit 3). Name the file and line in the message."""

    exit_code = EXIT_INPUT


class ModelError(LlmctlError):
    """A model (or tokenizer) could not be read, understood or written (exit 1)."""

    exit_code = EXIT_FAILURE


class OutputExistsError(UsageError):
    """The output path exists and ``--force`` was not given (exit 2)."""
