"""llmctl inspect: what a model is (architecture, parameters, dtype, size, tokenizer, chat template)."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.core.command import cli_command
from llmctl.core.console import ui
from llmctl.core.models.inspect import inspect_model, render_table
from llmctl.core.options import ConfigOpt, DebugOpt, JsonOpt, QuietOpt

HELP = """Describe a model directory or GGUF file without loading its weights: architecture, parameter
count by module type, dtypes, size on disk, context length, quantization, tokenizer and chat template."""

EPILOG = """Examples:

  llmctl inspect ~/.cache/llmctl/models/smollm2-135m-instruct

  llmctl inspect model.gguf --json | jq .parameters"""


@cli_command("inspect")
def main(
    model: Annotated[str, typer.Argument(help="A Hugging Face model directory or a .gguf file.")],
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    config: ConfigOpt = None,
) -> None:
    info = inspect_model(model)
    if as_json:
        ui.print_json(info)
    else:
        ui.out().print(render_table(info))
