"""llmctl quantize: RTN, GPTQ, AWQ or FP8 weight quantization into GPTQ, AWQ or compressed-tensors, and
bitsandbytes NF4/int8 export."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from llmctl.core.command import cli_command
from llmctl.core.console import ui
from llmctl.core.options import (
    BatchSizeOpt,
    ConfigOpt,
    DebugOpt,
    ForceOpt,
    JsonOpt,
    OutputDirOpt,
    QuietOpt,
    SeedOpt,
    TextFieldOpt,
)

HELP = """Quantize a model's decoder linear layers and write a checkpoint other tools load.

Methods: rtn (round to nearest), gptq (Hessian-based error compensation, layer by layer on calibration
text), awq (activation-aware scales folded into the preceding norm or linear, then asymmetric
quantization), fp8 (e4m3, one scale per output channel), bnb-nf4 / bnb-int8 (bitsandbytes NF4 with double
quant, or LLM.int8() weights, written as transformers saves a BitsAndBytesConfig model; needs the
bitsandbytes package). Formats: gptq (GPTQ v1, as AutoGPTQ/GPTQModel
write it), awq (AutoAWQ GEMM), compressed-tensors (pack-quantized / float-quantized, as llm-compressor and
vLLM use). The group size must divide every quantized layer's input dimension. Calibration text comes
from --calib (JSONL with a text field, or .txt), else a small built-in paragraph."""

EPILOG = """Examples:

  llmctl quantize ./tiny --method gptq --group-size 32 --calib-samples 8 --calib-seq-len 64 -o ./tiny-gptq

  llmctl quantize ./tiny --method awq --calib data.jsonl --group-size 32 -o ./tiny-awq --json"""


class MethodName(StrEnum):
    rtn = "rtn"
    gptq = "gptq"
    awq = "awq"
    fp8 = "fp8"
    bnb_nf4 = "bnb-nf4"
    bnb_int8 = "bnb-int8"


class FormatName(StrEnum):
    gptq = "gptq"
    awq = "awq"
    compressed_tensors = "compressed-tensors"
    bitsandbytes = "bitsandbytes"


@cli_command("quantize")
def main(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model directory (Hugging Face) or .gguf.")],
    output: OutputDirOpt,
    method: Annotated[MethodName, typer.Option("--method", help="Quantization method.")] = MethodName.gptq,
    bits: Annotated[int, typer.Option("--bits", help="Bits per weight: 2, 3, 4 or 8.")] = 4,
    group_size: Annotated[
        int,
        typer.Option("--group-size", help="Input columns sharing a scale and zero point; -1 for per row."),
    ] = 128,
    sym: Annotated[
        bool | None,
        typer.Option(
            "--sym/--asym",
            help="Symmetric grid (default for rtn/gptq) or with zero points (awq).",
            show_default=False,
        ),
    ] = None,  # fmt: skip
    act_order: Annotated[
        bool,
        typer.Option("--act-order", help="GPTQ: quantize columns by descending Hessian diagonal (g_idx)."),
    ] = False,
    static_groups: Annotated[
        bool, typer.Option("--static-groups", help="GPTQ: fix every group's grid before any update.")
    ] = False,
    true_sequential: Annotated[
        bool,
        typer.Option(
            "--true-sequential/--no-true-sequential",
            help="GPTQ: quantize q/k/v, o, gate/up, down in turn, each calibrated on the outputs of the "
            "already-quantized ones (the reference's order); --no-true-sequential calibrates a whole layer "
            "in one pass (as llm-compressor does: fewer layer forwards, faster).",
        ),
    ] = True,
    damp: Annotated[
        float, typer.Option("--damp", help="GPTQ dampening, a fraction of the mean Hessian diagonal.")
    ] = 0.01,
    calib: Annotated[
        Path | None, typer.Option("--calib", help="Calibration text: JSONL (see --text-field) or .txt.")
    ] = None,
    text_field: TextFieldOpt = "text",
    calib_samples: Annotated[
        int, typer.Option("--calib-samples", min=1, help="Calibration sequences.")
    ] = 128,
    calib_seq_len: Annotated[
        int, typer.Option("--calib-seq-len", min=2, help="Tokens per calibration sequence.")
    ] = 2048,
    fmt: Annotated[
        FormatName | None,
        typer.Option("--format", help="Output format (default: the method's own).", show_default=False),
    ] = None,
    skip: Annotated[
        str,
        typer.Option("--skip", help="Comma-separated linear names left in full precision (lm_head always)."),
    ] = "lm_head",
    batch_size: BatchSizeOpt = 8,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    config: ConfigOpt = None,
) -> None:
    # torch is imported only when the command runs, so that `llmctl --help` stays instant.
    from llmctl.core.quantize.calib import CalibrationSpec
    from llmctl.core.quantize.run import QuantizeOptions, quantize_model

    opts = QuantizeOptions(
        method=method.value, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
        static_groups=static_groups, damp=damp, true_sequential=true_sequential,
        fmt=fmt.value if fmt else None,
        skip=[s.strip() for s in skip.split(",") if s.strip()],
        calib=CalibrationSpec(calib, text_field, calib_samples, calib_seq_len), batch_size=batch_size,
    )  # fmt: skip
    with ui.progress("quantize") as bar:
        summary = quantize_model(
            model, output, opts, force=force, warn=ui.warn, progress=bar.advance, seed=seed
        )
    if as_json:
        ui.print_json(summary)
    else:
        s = summary
        ui.info(
            f"wrote {output}: {s['method']} {s['bits']}-bit g{s['group_size']} ({s['format']}), "
            f"{s['layers_quantized']} layers in {s['quantize_seconds']:.1f}s"
        )
