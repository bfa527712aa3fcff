"""llmctl prune: unstructured (magnitude, Wanda, SparseGPT, N:M) and layer-dropping pruning."""

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

# The defaults of llmctl.core.prune.run.DEFAULT_CALIB (not imported here: starting the CLI imports no torch).
CALIB_SAMPLES, CALIB_SEQ_LEN = 32, 512

HELP = """Prune a model and write a Hugging Face directory that transformers loads.

Unstructured (same architecture, zeros in the decoder linears; embeddings and lm_head stay dense):
magnitude (smallest |W| per matrix), wanda (|W| times the input feature's L2 norm, compared within each
output row), sparsegpt (OBS weight updates on the GPTQ Hessian machinery, adaptive mask per block of 128
columns), at --sparsity S or --pattern N:M (N weights kept in every M consecutive inputs; 2:4 is 50%).
Wanda and SparseGPT calibrate layer by layer, each layer on the outputs of the already-pruned ones.

Depth (a physically shallower model; num_hidden_layers and layer_types rewritten): --method layers
drops --drop K layers (or keeps --keep-ratio R of them) by --score block-influence (ShortGPT: 1 - cos of
a layer's input and output), angular (Gromov et al.: the most redundant block of K adjacent layers) or
ppl (the layers whose lone removal raises calibration loss least). --method progressive-layers removes,
one at a time, the layer whose removal raises the loss on --domain text least, until --drop/--keep-ratio
is reached or the next removal would raise it by more than --max-loss-increase nats per token; with
--recover-steps N, N steps of LoRA fine-tuning on the --domain text follow each removal (TrimLLM's recovery;
the LoRA is merged, the output stays a plain model). --method layers --recover-steps N trains once after
the drop, on the calibration text.

Width (a physically smaller model): --method channels keeps --keep-ratio R of each layer's MLP channels,
--method heads keeps that share of the attention head groups (a key/value head with its query heads, so
GQA holds), by activation-weighted importance on the calibration text. Configs hold one width for all
layers, so every layer keeps the same count (which units are kept is chosen per layer).

Low rank: --method lowrank factors each decoder linear W by a truncated SVD into two thinner linears
(B after A), at --rank-ratio R (rank = R x min(in, out)) or --energy E (the smallest rank holding E of the
squared singular values); --activation-weighted truncates W·diag(s), s the calibration input norms
(ASVD-style), so the output error rather than the weight error is minimised. A linear whose factors would
not be smaller stays dense (reported). The output stores NAME.lowrank_a.weight and NAME.lowrank_b.weight
with the ranks in config.json ("llmctl_lowrank"): llmctl eval, generate and serve load it; other tools do
not, so --materialize writes the equivalent dense model (B·A multiplied back) instead.

Calibration text comes from --calib (JSONL with a text field, or .txt), else a small built-in paragraph.
A per-layer report goes to stderr (or --json on stdout); --eval FILE adds perplexity before and after."""

EPILOG = """Examples:

  llmctl prune ./tiny --method wanda --sparsity 0.5 --calib-samples 4 --calib-seq-len 64 -o ./tiny-wanda

  llmctl prune ./tiny --method layers --score block-influence --drop 1 -o ./tiny-shallow --json"""


class MethodName(StrEnum):
    magnitude = "magnitude"
    wanda = "wanda"
    sparsegpt = "sparsegpt"
    layers = "layers"
    progressive_layers = "progressive-layers"
    heads = "heads"
    channels = "channels"
    lowrank = "lowrank"


class ScoreName(StrEnum):
    block_influence = "block-influence"
    angular = "angular"
    ppl = "ppl"


@cli_command("prune")
def main(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model directory (Hugging Face) or .gguf.")],
    output: OutputDirOpt,
    method: Annotated[MethodName, typer.Option("--method", help="Pruning method.")] = MethodName.wanda,
    sparsity: Annotated[
        float | None,
        typer.Option(
            "--sparsity", help="Unstructured: fraction of each layer's weights set to zero, in (0, 1)."
        ),
    ] = None,
    pattern: Annotated[
        str | None, typer.Option("--pattern", help="Unstructured N:M instead of --sparsity, e.g. 2:4.")
    ] = None,
    score: Annotated[
        ScoreName, typer.Option("--score", help="--method layers: how layers are scored.")
    ] = ScoreName.block_influence,
    drop: Annotated[int | None, typer.Option("--drop", help="Layer methods: layers to remove.")] = None,
    keep_ratio: Annotated[
        float | None, typer.Option("--keep-ratio", help="Layer/width methods: fraction kept, in (0, 1].")
    ] = None,
    domain: Annotated[
        Path | None, typer.Option("--domain", help="progressive-layers: in-domain text (JSONL or .txt).")
    ] = None,
    max_loss_increase: Annotated[
        float | None,
        typer.Option(
            "--max-loss-increase", help="progressive-layers: stop before the loss rises more (nats)."
        ),
    ] = None,
    calib: Annotated[
        Path | None, typer.Option("--calib", help="Calibration text: JSONL (see --text-field) or .txt.")
    ] = None,
    text_field: TextFieldOpt = "text",
    calib_samples: Annotated[
        int, typer.Option("--calib-samples", min=1, help="Calibration (or --domain) sequences.")
    ] = CALIB_SAMPLES,
    calib_seq_len: Annotated[
        int, typer.Option("--calib-seq-len", min=2, help="Tokens per calibration sequence.")
    ] = CALIB_SEQ_LEN,
    eval_path: Annotated[
        Path | None,
        typer.Option("--eval", help="Text (JSONL or .txt) to measure perplexity before and after."),
    ] = None,
    damp: Annotated[
        float, typer.Option("--damp", help="SparseGPT dampening, a fraction of the mean Hessian diagonal.")
    ] = 0.01,
    skip: Annotated[
        str, typer.Option("--skip", help="Comma-separated linear names left dense, e.g. down_proj.")
    ] = "",
    rank_ratio: Annotated[
        float | None,
        typer.Option("--rank-ratio", help="lowrank: rank as a fraction of min(in, out), (0, 1]."),
    ] = None,
    energy: Annotated[
        float | None,
        typer.Option("--energy", help="lowrank: keep this share of the squared singular values, (0, 1]."),
    ] = None,
    activation_weighted: Annotated[
        bool,
        typer.Option("--activation-weighted", help="lowrank: SVD of W·diag(input norms) on --calib text."),
    ] = False,
    materialize: Annotated[
        bool, typer.Option("--materialize", help="lowrank: write the dense product (loads anywhere).")
    ] = False,
    recover_steps: Annotated[
        int,
        typer.Option("--recover-steps", help="layers/progressive-layers: LoRA recovery steps per removal."),
    ] = 0,
    recover_lr: Annotated[float, typer.Option("--recover-lr", help="Recovery learning rate.")] = 2e-4,
    batch_size: BatchSizeOpt = 8,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    config: ConfigOpt = None,
) -> None:
    from llmctl.core.prune.run import PruneOptions, prune_model, table_lines
    from llmctl.core.quantize.calib import CalibrationSpec

    opts = PruneOptions(
        method=method.value, sparsity=sparsity, pattern=pattern, score=score.value, drop=drop,
        keep_ratio=keep_ratio, domain=domain, max_loss_increase=max_loss_increase,
        calib=CalibrationSpec(calib, text_field, calib_samples, calib_seq_len), eval_path=eval_path,
        damp=damp, skip=tuple(s.strip() for s in skip.split(",") if s.strip()), batch_size=batch_size,
        rank_ratio=rank_ratio, energy=energy, activation_weighted=activation_weighted,
        materialize=materialize, recover_steps=recover_steps, recover_lr=recover_lr,
    )  # fmt: skip
    with ui.progress("prune") as bar:
        summary = prune_model(model, output, opts, force=force, warn=ui.warn, progress=bar.advance, seed=seed)
    if as_json:
        ui.print_json(summary)
    else:
        for line in table_lines(summary):
            ui.info(line)
        ui.info(f"wrote {output}: {summary['method']} in {summary['prune_seconds']:.1f}s")
