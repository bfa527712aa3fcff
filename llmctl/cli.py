"""The llmctl command line: wiring only. Each subcommand lives in ``llmctl/commands/<name>.py``."""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Annotated

import typer
from typer import TyperException

import llmctl.core  # noqa: F401 - environment defaults (offline, quiet third-party libraries)
from llmctl import __version__
from llmctl.core.errors import EXIT_INTERRUPTED, EXIT_USAGE


def _new_app() -> typer.Typer:
    app = typer.Typer(
        name="llmctl",
        help="One command-line toolkit for the life of a language model, over JSONL.",
        epilog="Run 'llmctl COMMAND --help' for a command's options and examples.",
        invoke_without_command=True,
        add_completion=False,  # static scripts live in completions/ (see `make completions`)
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(root)
    return app


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


def root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """One command-line toolkit for the life of a language model, over JSONL."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


# Subcommand name -> module in llmctl/commands. Each module defines HELP, EPILOG and main().
COMMANDS = {
    "convert": "llmctl.commands.convert",
    "init": "llmctl.commands.init",
    "inspect": "llmctl.commands.inspect",
    "tokenize": "llmctl.commands.tokenize",
    "prune": "llmctl.commands.prune",
    "quantize": "llmctl.commands.quantize",
    "serve": "llmctl.commands.serve",
    "finetune": "llmctl.commands.finetune",
    "tokenize-train": "llmctl.commands.tokenize_train",
    "dedup": "llmctl.commands.dedup",
    "filter": "llmctl.commands.filter",
    "generate": "llmctl.commands.generate",
    "eval": "llmctl.commands.eval",
    "merge": "llmctl.commands.merge",
}


def _keep_lines(epilog: str) -> str:
    """Mark indented example paragraphs with click's no-rewrap marker, so that examples stay on one line
    (and can be pasted) whatever the terminal width."""
    return "\n\n".join("\b\n" + p if p.startswith(" ") else p for p in epilog.split("\n\n"))


def build_app(names: list[str] | None = None) -> typer.Typer:
    """The Typer app with the given subcommands (all by default). Each command module is imported only
    here, so a run of one command imports that command's module alone (faster start in pipelines)."""
    app = _new_app()
    for name in names or COMMANDS:
        module = importlib.import_module(COMMANDS[name])
        app.command(name, help=module.HELP, epilog=_keep_lines(module.EPILOG))(module.main)
    return app


def __getattr__(name: str):
    if name == "app":  # the full app, built on first use (tests, completions)
        app = globals()["app"] = build_app()
        return app
    raise AttributeError(name)


def _invoked(argv: list[str]) -> list[str] | None:
    """``[command]`` when the first word of ``argv`` names a subcommand, else None (root help, --version,
    or a usage error that should list every command)."""
    return [argv[0]] if argv and argv[0] in COMMANDS else None


def _on_sigterm(signum, frame):  # noqa: ARG001
    # SystemExit unwinds through the atomic-output context managers, so temporaries are removed.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: like ``app()``, but usage errors are one line, as every other error is."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    args = sys.argv[1:] if argv is None else list(argv)
    command = typer.main.get_command(build_app(_invoked(args)))
    try:
        code = command.main(args=args, prog_name="llmctl", standalone_mode=False)
    except TyperException as e:  # usage errors: unknown option, missing argument, bad value (exit 2)
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "llmctl"
        message = " ".join(e.format_message().split())
        hint = f" (see '{where} --help')" if e.exit_code == EXIT_USAGE else ""
        typer.echo(f"{where}: error: {message}{hint}", err=True)
        code = e.exit_code
    except typer.Abort:
        typer.echo("llmctl: error: interrupted", err=True)
        code = EXIT_INTERRUPTED
    except typer.Exit as e:
        code = e.exit_code
    sys.exit(code if isinstance(code, int) else 0)
