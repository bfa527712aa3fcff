"""llmctl convert: GGUF → Hugging Face directory, or Hugging Face directory → GGUF."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from llmctl.core.command import cli_command
from llmctl.core.console import ui
from llmctl.core.errors import UsageError
from llmctl.core.io import atomic_output
from llmctl.core.models.hf import resolve_model
from llmctl.core.options import ConfigOpt, DebugOpt, DtypeOpt, ForceOpt, JsonOpt, OutputDirOpt, QuietOpt
from llmctl.core.provenance import now, write_provenance

HELP = """Convert a model between llama.cpp's GGUF and a Hugging Face directory.

A .gguf input is imported into a Hugging Face directory (weights dequantized to --dtype, tokenizer,
chat template, generation config, llmctl.json). A directory input is exported to GGUF (--outtype
f32, f16 or q8_0) with its tokenizer and chat template, so llama.cpp runs it."""

EPILOG = """Examples:

  llmctl convert SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2

  llmctl convert smollm2 --to gguf --outtype q8_0 -o smollm2-q8_0.gguf"""


class Target(StrEnum):
    auto = "auto"
    hf = "hf"
    gguf = "gguf"


class OutType(StrEnum):
    f32 = "f32"
    f16 = "f16"
    q8_0 = "q8_0"


@cli_command("convert")
def main(
    model: Annotated[str, typer.Argument(help="A .gguf file, or a Hugging Face model directory.")],
    output: OutputDirOpt,
    to: Annotated[
        Target, typer.Option("--to", help="Target format; auto converts to the other one.")
    ] = Target.auto,
    outtype: Annotated[
        OutType, typer.Option("--outtype", help="GGUF tensor type for --to gguf.")
    ] = OutType.f16,
    dtype: DtypeOpt = "auto",
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Shard safetensors above this size (with an index).")
    ] = "2GB",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    config: ConfigOpt = None,
) -> None:
    ref = resolve_model(model)
    target = to.value if to != Target.auto else ("hf" if ref.kind == "gguf" else "gguf")
    if target == ref.kind:
        raise UsageError(f"{model} is already in {target} format")
    started = now()
    if target == "hf":
        from llmctl.core.models.gguf_import import import_gguf

        with atomic_output(output, force=force) as tmp, ui.progress(f"importing {ref.path.name}"):
            summary = import_gguf(ref.path, tmp, dtype=dtype.value, max_shard_size=max_shard_size)
            summary["output"] = str(output)
            write_provenance(
                tmp, command="convert", inputs=[ref.path], started_at=started, extra={"summary": summary}
            )
    else:
        from llmctl.core.models.gguf_export import export_gguf

        with atomic_output(output, force=force, is_dir=False) as tmp, ui.progress("exporting GGUF") as bar:
            summary = export_gguf(
                ref.path, Path(tmp), outtype=outtype.value, progress=lambda d, t: bar.update(d, t)
            )
            summary["path"] = str(output)
    if as_json:
        ui.print_json(summary)
    else:
        params = summary.get("parameters", 0)
        ui.info(f"wrote {output} ({summary.get('architecture')}, {params / 1e6:.1f}M parameters)")
