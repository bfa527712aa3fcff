"""Every setting of a fine-tuning run, in one dataclass (what ``--config`` YAML and the flags fill in)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class FinetuneConfig:
    base: str = ""
    train: str = ""
    output: str = ""
    val: str | None = None
    val_split: float = 0.0  # fraction of the training records held out when no --val is given
    # data
    format: str = "auto"
    text_field: str = "text"
    train_on_prompt: bool = False
    max_length: int | None = None
    pack: bool = False
    skip_bad_lines: bool = False
    # method
    method: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str = "all-linear"
    rslora: bool = False
    # objective
    objective: str = "sft"
    beta: float | None = None  # None: the objective's default
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0
    # schedule and optimizer
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | bf16 | fp16
    neftune_alpha: float = 0.0  # 0 disables NEFTune
    shuffle: bool = True
    # evaluation, checkpoints
    eval_every: int = 0  # steps; 0: at the end of every epoch
    patience: int = 0  # evaluations without improvement before stopping; 0: never stop early
    save_every: int = 0  # steps; 0: no intermediate checkpoints
    checkpoint_dir: str | None = None
    resume: str | None = None
    log_every: int = 10
    # processes: ddp replicates the model, fsdp shards it (FSDP2); with one process both train unsharded
    strategy: str = "ddp"
    # output
    merge: bool = False
    kernels: bool = False
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Settings a checkpoint can only be resumed with unchanged (anything else, like --max-steps, may change).
    # --strategy is not one: checkpoints hold whole tensors under ddp and fsdp alike.
    RESUME_KEYS = (
        "method", "r", "alpha", "target_modules", "rslora", "objective", "format", "train_on_prompt",
        "max_length", "pack", "batch_size", "grad_accum", "optimizer", "seed", "shuffle",
    )  # fmt: skip

    def resume_fingerprint(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.RESUME_KEYS}
