"""The shared options, defined once as ``Annotated`` types so every command spells them the same way.

A command lists the ones it takes: ``def main(..., seed: SeedOpt = 0, quiet: QuietOpt = False)``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from llmctl.core.config import config_callback

DEVICE_HELP = "Where to run: auto (CUDA when available, else CPU), cpu, cuda or cuda:N."


class Dtype(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


DeviceOpt = Annotated[str, typer.Option("--device", help=DEVICE_HELP, show_default=True)]
DtypeOpt = Annotated[
    Dtype,
    typer.Option("--dtype", help="Weight dtype: auto is float32 on CPU, the model's own dtype on CUDA."),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same output.")]
DraftVocabOpt = Annotated[
    int,
    typer.Option(
        "--draft-vocab",
        min=0,
        help="The draft scores only the N lowest token ids plus each request's own tokens (0: all).",
    ),
]
DraftConfidenceOpt = Annotated[
    float,
    typer.Option(
        "--draft-confidence",
        min=0.0,
        max=0.99,
        help="Stop a round's drafting after a token the draft gives less than this probability (0: off).",
    ),
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Records processed together.")]
OutputFileOpt = Annotated[
    Path | None, typer.Option("-o", "--output", help="Write here instead of standard output.")
]
OutputDirOpt = Annotated[Path, typer.Option("-o", "--output", help="Output path (refused if it exists).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]
DebugOpt = Annotated[
    bool,
    typer.Option("--debug", envvar="LLMCTL_DEBUG", help="Show tracebacks on errors (also LLMCTL_DEBUG=1)."),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="YAML file of option values; flags on the command line win.",
        is_eager=True,
        callback=config_callback,
    ),
]
TextFieldOpt = Annotated[
    str, typer.Option("--text-field", help="Field holding the text; dotted paths like meta.body work.")
]
SkipBadLinesOpt = Annotated[
    bool,
    typer.Option(
        "--skip-bad-lines", help="Skip (and count) malformed lines instead of stopping with exit code 3."
    ),
]
WholeFileOpt = Annotated[
    bool, typer.Option("--whole-file", help="Read a text input as one document instead of one per line.")
]
InputArg = Annotated[
    str | None,
    typer.Argument(
        help="JSONL/text input file (.gz/.zst too), or - for stdin (the default when stdin is piped).",
        show_default=False,
    ),
]
