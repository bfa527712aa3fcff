"""llmctl init: a small randomly initialised model with a working tokenizer."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from llmctl.core.command import cli_command
from llmctl.core.console import ui
from llmctl.core.io import atomic_output
from llmctl.core.models.init import init_model
from llmctl.core.models.presets import PRESETS, get_preset
from llmctl.core.options import (
    ConfigOpt,
    DebugOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    OutputDirOpt,
    QuietOpt,
    SeedOpt,
)
from llmctl.core.provenance import now, write_provenance

PresetName = StrEnum("PresetName", {name: name for name in PRESETS})  # choices for --preset

HELP = f"""Create a small, randomly initialised model directory for tests and pipeline dry runs.

Presets: {", ".join(PRESETS)}. The tokenizer is a byte-level one with ChatML special tokens and chat
template, unless --vocab-from names a tokenizer (or model) directory or .gguf to take it from. The same
--preset and --seed give bit-identical weights."""

EPILOG = """Examples:

  llmctl init --preset llama-tiny --seed 0 -o tiny

  llmctl init --preset qwen2-tiny --vocab-from ./my-tokenizer -o tiny-qwen"""


@cli_command("init")
def main(
    output: OutputDirOpt,
    preset: Annotated[
        PresetName, typer.Option("--preset", help="Architecture and size; see the list above.")
    ] = PresetName("llama-tiny"),
    vocab_from: Annotated[
        str | None, typer.Option("--vocab-from", help="Take the tokenizer (and vocab size) from here.")
    ] = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "auto",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    config: ConfigOpt = None,
) -> None:
    preset = get_preset(preset.value).name
    started = now()
    inputs = [vocab_from] if vocab_from else []
    with atomic_output(output, force=force) as tmp:
        summary = init_model(preset, tmp, seed=seed, vocab_from=vocab_from, dtype=dtype)
        summary["output"] = str(output)
        write_provenance(
            tmp, command="init", inputs=inputs, started_at=started, seed=seed, extra={"summary": summary}
        )
    if as_json:
        ui.print_json(summary)
    else:
        ui.info(f"wrote {output} ({preset}, {summary['parameters']:,} parameters, seed {seed})")
