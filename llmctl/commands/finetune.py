"""llmctl finetune: full, LoRA, DoRA and QLoRA fine-tuning with SFT and preference objectives."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from llmctl.core.command import cli_command
from llmctl.core.console import ui
from llmctl.core.finetune.config import FinetuneConfig
from llmctl.core.options import (
    BatchSizeOpt,
    ConfigOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    OutputDirOpt,
    QuietOpt,
    SeedOpt,
    SkipBadLinesOpt,
    TextFieldOpt,
)

HELP = """Fine-tune a model on JSONL records: full, LoRA, DoRA or QLoRA; SFT, DPO, ORPO or SimPO.

The data format is detected from the fields (text; prompt/completion; messages with the chat template;
alpaca instruction/input/output; preference prompt/chosen/rejected) and the loss is taken only on the
completion or assistant tokens unless --train-on-prompt. Writes a PEFT adapter directory (or, with --merge or
--method full, a full model) with metrics.jsonl, loss.png and llmctl.json. --save-every N writes resumable
checkpoints beside the output; --resume continues one exactly. --nproc N trains in N processes (torchrun):
--strategy ddp replicates the model in each, --strategy fsdp shards it (FSDP2)."""

EPILOG = """Examples:

  llmctl finetune ./tiny train.jsonl --method lora --r 8 --max-steps 20 -o tiny-lora

  llmctl finetune ./tiny pairs.jsonl --objective dpo --beta 0.1 --val-split 0.1 -o tiny-dpo --json"""


def _opt(*names: str, help: str, **kw):
    return typer.Option(*names, help=help, **kw)


@cli_command("finetune")
def main(
    base: Annotated[
        str, typer.Argument(metavar="BASE", help="Base model: a Hugging Face directory or a .gguf.")
    ],
    train: Annotated[
        str, typer.Argument(metavar="TRAIN", help="Training JSONL (.gz/.zst too), or - for stdin.")
    ],
    output: OutputDirOpt,
    val: Annotated[str | None, _opt("--val", help="Validation JSONL (same format as TRAIN).")] = None,
    val_split: Annotated[
        float, _opt("--val-split", help="Hold out this fraction of TRAIN for validation.")
    ] = 0.0,
    data_format: Annotated[
        str, _opt("--format", help="auto|text|prompt-completion|messages|alpaca|preference.")
    ] = "auto",
    text_field: TextFieldOpt = "text",
    train_on_prompt: Annotated[
        bool, _opt("--train-on-prompt", help="Take the loss on prompt tokens too.")
    ] = False,
    max_length: Annotated[
        int | None, _opt("--max-length", min=2, help="Cut longer examples (counted and reported).")
    ] = None,
    pack: Annotated[
        bool, _opt("--pack", help="Pack examples into rows of --max-length tokens (no cross-attention).")
    ] = False,
    method: Annotated[str, _opt("--method", help="full|lora|dora|qlora.")] = "lora",
    r: Annotated[int, _opt("--r", min=1, help="LoRA rank.")] = 16,
    alpha: Annotated[
        float, _opt("--alpha", help="LoRA alpha (scale alpha/r, or alpha/sqrt(r) with --rslora).")
    ] = 32.0,
    dropout: Annotated[float, _opt("--dropout", help="LoRA dropout.")] = 0.05,
    target_modules: Annotated[
        str, _opt("--target-modules", help="all-linear, or names like q_proj,v_proj.")
    ] = "all-linear",
    rslora: Annotated[bool, _opt("--rslora", help="Rank-stabilised LoRA scaling.")] = False,
    objective: Annotated[str, _opt("--objective", help="sft|dpo|orpo|simpo.")] = "sft",
    beta: Annotated[
        float | None, _opt("--beta", help="Preference strength (default: dpo 0.1, orpo 0.1, simpo 2.0).")
    ] = None,
    simpo_gamma: Annotated[float, _opt("--simpo-gamma", help="SimPO target reward margin.")] = 0.5,
    label_smoothing: Annotated[
        float, _opt("--label-smoothing", help="Label smoothing (SFT, DPO, SimPO).")
    ] = 0.0,
    epochs: Annotated[int, _opt("--epochs", min=1, help="Passes over the training data.")] = 1,
    max_steps: Annotated[
        int | None, _opt("--max-steps", min=1, help="Optimizer steps (overrides --epochs).")
    ] = None,
    lr: Annotated[float, _opt("--lr", help="Peak learning rate.")] = 2e-4,
    weight_decay: Annotated[float, _opt("--weight-decay", help="Decoupled weight decay.")] = 0.0,
    batch_size: BatchSizeOpt = 4,
    grad_accum: Annotated[int, _opt("--grad-accum", min=1, help="Micro-batches per optimizer step.")] = 1,
    optimizer: Annotated[
        str, _opt("--optimizer", help="adamw|lion|adafactor|adamw-8bit|paged-adamw.")
    ] = "adamw",
    scheduler: Annotated[str, _opt("--scheduler", help="cosine|linear|constant (after warmup).")] = "cosine",
    warmup_ratio: Annotated[float, _opt("--warmup-ratio", help="Fraction of steps of linear warmup.")] = 0.0,
    max_grad_norm: Annotated[
        float, _opt("--max-grad-norm", help="Clip gradients to this norm (0: off).")
    ] = 1.0,
    gradient_checkpointing: Annotated[
        bool, _opt("--gradient-checkpointing", help="Recompute activations in backward to save memory.")
    ] = False,
    mixed_precision: Annotated[
        str, _opt("--mixed-precision", help="no|bf16|fp16 autocast (fp16 with loss scaling).")
    ] = "no",
    neftune_alpha: Annotated[float, _opt("--neftune-alpha", help="NEFTune embedding noise (0: off).")] = 0.0,
    shuffle: Annotated[bool, _opt("--shuffle/--no-shuffle", help="Shuffle each epoch (seeded).")] = True,
    eval_every: Annotated[
        int, _opt("--eval-every", min=0, help="Validate every N steps (0: each epoch).")
    ] = 0,
    patience: Annotated[
        int, _opt("--patience", min=0, help="Stop after N validations without improvement; keep the best.")
    ] = 0,
    save_every: Annotated[
        int, _opt("--save-every", min=0, help="Write a resumable checkpoint every N steps.")
    ] = 0,
    checkpoint_dir: Annotated[
        str | None, _opt("--checkpoint-dir", help="Where checkpoints go (default: OUTPUT-checkpoints).")
    ] = None,
    resume: Annotated[
        str | None,
        _opt("--resume", help="A checkpoint (or the checkpoint directory: its latest) to continue."),
    ] = None,
    log_every: Annotated[int, _opt("--log-every", min=1, help="Log a line every N steps.")] = 10,
    merge: Annotated[bool, _opt("--merge", help="Write a full model with the adapter merged in.")] = False,
    kernels: Annotated[
        bool, _opt("--kernels/--no-kernels", help="Use llmctl's fused kernels (llmctl.kernels.patch_model).")
    ] = False,
    nproc: Annotated[
        int, _opt("--nproc", min=1, help="Data-parallel processes (torchrun; gloo on CPU, nccl on CUDA).")
    ] = 1,
    strategy: Annotated[
        str, _opt("--strategy", help="ddp|fsdp: replicate the model in every process, or shard it (FSDP2).")
    ] = "ddp",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    seed: SeedOpt = 0,
    skip_bad_lines: SkipBadLinesOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    config: ConfigOpt = None,
) -> None:
    cfg = FinetuneConfig(
        base=base, train=train, output=str(output), val=val, val_split=val_split, format=data_format,
        text_field=text_field, train_on_prompt=train_on_prompt, max_length=max_length, pack=pack,
        skip_bad_lines=skip_bad_lines, method=method, r=r, alpha=alpha, dropout=dropout,
        target_modules=target_modules, rslora=rslora, objective=objective, beta=beta, simpo_gamma=simpo_gamma,
        label_smoothing=label_smoothing, epochs=epochs, max_steps=max_steps, lr=lr, weight_decay=weight_decay,
        batch_size=batch_size, grad_accum=grad_accum, optimizer=optimizer, scheduler=scheduler,
        warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, gradient_checkpointing=gradient_checkpointing,
        mixed_precision=mixed_precision, neftune_alpha=neftune_alpha, shuffle=shuffle, eval_every=eval_every,
        patience=patience, save_every=save_every, checkpoint_dir=checkpoint_dir, resume=resume,
        log_every=log_every, strategy=strategy, merge=merge, kernels=kernels, device=device,
        dtype=str(dtype.value), seed=seed,
    )  # fmt: skip
    from llmctl.core.finetune import distributed

    processes = distributed.world_size() if distributed.under_torchrun() else nproc
    distributed.check_strategy(strategy, processes=processes, method=method, mixed_precision=mixed_precision)
    if strategy == "fsdp" and processes == 1:
        ui.warn("--strategy fsdp with one process: nothing to shard, training as a single process")
    if nproc > 1 and not distributed.under_torchrun():
        raise typer.Exit(distributed.launch(nproc, sys.argv[1:]))
    from llmctl.core.finetune.run import finetune  # torch loads here, not when the CLI starts

    if not distributed.is_main_process():  # other ranks train silently; rank 0 reports
        finetune(cfg, force=force)
        return
    with ui.progress("finetune") as bar:
        summary = finetune(cfg, force=force, log=ui.info, progress=lambda s, t: bar.update(s, t))
    if as_json:
        ui.print_json(summary)
    else:
        best = f", best val_loss {summary['best_val_loss']:.4f} at step {summary['best_step']}" if summary[
            "best_val_loss"] is not None else ""  # fmt: skip
        ui.info(
            f"trained {summary['steps']} steps, final loss {summary['final_loss']:.4f}{best}; wrote {output}"
        )
