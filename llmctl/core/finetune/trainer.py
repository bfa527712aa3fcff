"""The training loop: a few hundred lines one can read, not a framework.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` units (examples, packed rows or
preference pairs). The step's loss is the sum of every micro-batch's summed losses divided by the step's
item count (trained tokens for SFT, pairs for preference objectives), counted *before* the forward passes,
so accumulating N micro-batches gives the same loss and gradients as one batch N times larger.

The data order is a function of (seed, epoch) only, so a checkpoint needs just the step number to find its
place again; with the trainable weights, optimizer, scheduler and RNG states restored, a resumed run
continues the loss curve bit for bit on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmctl.core.errors import UsageError
from llmctl.core.finetune import distributed
from llmctl.core.finetune.batching import collate_units
from llmctl.core.finetune.config import FinetuneConfig
from llmctl.core.finetune.data import IGNORE
from llmctl.core.finetune.objectives import (
    Objective,
    batch_loss,
    reference_logps,
    selected_logps,
    trained_logits,
)
from llmctl.core.finetune.optim import make_optimizer, make_scheduler
from llmctl.core.io import atomic_output

STATE_FILE = "trainer_state.json"


def world_info() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torch.distributed is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_value(value, world: int, device, op: str = "sum"):
    """``value`` summed (or its maximum, ``op="max"``) over every process (itself with one process)."""
    if world == 1:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return type(value)(t.item()) if isinstance(value, int) else t.item()


@dataclass
class TrainState:
    step: int = 0
    best_val: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def neftune_hook(alpha: float):
    """NEFTune (Jain et al. 2023, https://arxiv.org/abs/2310.05914): in training, add uniform noise of
    magnitude ``alpha / sqrt(seq_len · hidden)`` to the input embeddings."""

    def hook(module, args, output):
        if module.training:
            scale = alpha / math.sqrt(output.shape[1] * output.shape[2])
            output = output + torch.zeros_like(output).uniform_(-scale, scale)
        return output

    return hook


class Trainer:
    def __init__(
        self,
        model,
        objective: Objective,
        train_units: list,
        val_units: list,
        cfg: FinetuneConfig,
        *,
        pad_id: int,
        device: torch.device,
        ref_model=None,
        log: Callable[[str], None] = lambda m: None,
        on_step: Callable[[int], None] = lambda s: None,
        padding_free: bool = False,
    ) -> None:
        self.model, self.objective, self.cfg = model, objective, cfg
        self.train_units, self.val_units = train_units, val_units
        self.pad_id, self.device, self.ref_model = pad_id, device, ref_model
        self.log, self.on_step = log, on_step
        # one row per micro-batch (batching.flatten_units) for a model running varlen attention
        self.padding_free = padding_free and not objective.preference
        self.rank, self.world = world_info()
        # --strategy fsdp: FSDP reduces the gradients itself, and gathers the embeddings and LM head only in
        # the model's own forward, so the loss takes the full-logits path of objectives.trained_logits
        self.sharded = distributed.is_sharded(model)
        self.per_step = cfg.batch_size * cfg.grad_accum  # units per process per step
        self.global_per_step = self.per_step * self.world
        self.steps_per_epoch = math.ceil(len(train_units) / self.global_per_step)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(
            cfg.optimizer, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, device=device
        )
        warmup = round(cfg.warmup_ratio * self.total_steps)
        self.scheduler = make_scheduler(
            self.optimizer, total=self.total_steps, warmup=warmup, kind=cfg.scheduler
        )
        self.beta = cfg.beta if cfg.beta is not None else (objective.default_beta or 0.0)
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" else None
        if cfg.neftune_alpha > 0:
            model.get_input_embeddings().register_forward_hook(neftune_hook(cfg.neftune_alpha))

    # -- data order -----------------------------------------------------------------------------------------
    def order(self, epoch: int) -> list[int]:
        n = len(self.train_units)
        if not self.cfg.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def micro_batches(self, step: int) -> list[dict]:
        epoch, index = divmod(step, self.steps_per_epoch)
        ids = self.order(epoch)[index * self.global_per_step : (index + 1) * self.global_per_step]
        ids = ids[self.rank * self.per_step : (self.rank + 1) * self.per_step]  # this process's share
        units = [self.train_units[i] for i in ids]
        size = self.cfg.batch_size
        return [
            collate_units(units[i : i + size], self.pad_id, pack=self.cfg.pack, flatten=self.padding_free)
            for i in range(0, len(units), size)
        ]

    # -- one step -------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.mixed_precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.cfg.mixed_precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _to(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _items(self, batch: dict) -> int:
        if self.objective.preference:
            return batch["input_ids"].shape[0] // 2
        return int((batch["targets"] != IGNORE).sum())

    def _ref(self, batch: dict):
        if not self.objective.needs_ref_model:
            return None
        if self.ref_model is not None:
            return reference_logps(self.ref_model, batch)
        with self.model.disable_adapter():  # LoRA/DoRA: the base model is the reference
            if not self.sharded:
                return reference_logps(self.model, batch)
            return self._sharded_reference_logps(batch)

    @torch.no_grad()
    def _sharded_reference_logps(self, batch: dict):
        """objectives.reference_logps through the full-logits path, which FSDP needs (see ``sharded``)."""
        n = batch["input_ids"].shape[0]
        sums, _ = selected_logps(*trained_logits(self.model, batch, reference=True), n)
        return sums[: n // 2], sums[n // 2 :]

    def accumulate(self, batches: list[dict]) -> tuple[float, int, dict]:
        """Forward and backward over one step's micro-batches; gradients are left in ``.grad``."""
        total = all_reduce_value(sum(self._items(b) for b in batches), self.world, self.device)
        weights = [1.0] * len(batches)
        if self.sharded:
            # FSDP's collectives pair up across processes, so each runs as many forward and backward passes:
            # a process with fewer micro-batches this step (the end of an epoch) adds ones weighted 0
            missing = all_reduce_value(len(batches), self.world, self.device, op="max") - len(batches)
            filler = collate_units(
                self.train_units[:1], self.pad_id, pack=self.cfg.pack, flatten=self.padding_free
            )
            batches, weights = batches + [filler] * missing, weights + [0.0] * missing
        loss_value, extra_sum = 0.0, {}
        for batch, weight in zip(batches, weights, strict=True):
            batch = self._to(batch)
            with self._autocast():
                ref = self._ref(batch)
                loss_sum, _, extra = batch_loss(
                    self.objective, self.model, batch, beta=self.beta, gamma=self.cfg.simpo_gamma,
                    label_smoothing=self.cfg.label_smoothing, ref_logps=ref, reference=self.sharded,
                    fused_ce=self.cfg.kernels,
                )  # fmt: skip
            loss = loss_sum / total if weight else loss_sum * 0.0
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            if not weight:
                continue
            loss_value += float(loss.detach())
            for k, v in extra.items():
                extra_sum[k] = extra_sum.get(k, 0.0) + v
        if self.world > 1:
            # data parallel: every process's loss is already divided by the global item count, so the sum of
            # the processes' gradients is the gradient of the whole step (FSDP sums them in its backward)
            if not self.sharded:
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad)
            loss_value = all_reduce_value(loss_value, self.world, self.device)
            extra_sum = {k: all_reduce_value(v, self.world, self.device) for k, v in extra_sum.items()}
        return loss_value, total, extra_sum

    def train_step(self, step: int) -> dict[str, Any]:
        start = time.perf_counter()
        batches = self.micro_batches(step)
        tokens = int(all_reduce_value(sum(int(b["tokens"]) for b in batches), self.world, self.device))
        loss, items, extra = self.accumulate(batches)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        # FSDP: the gradients are sharded DTensors; the norm is the global one, made whole here
        grad_norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(self.params, max_norm)))
        lr = self.scheduler.get_last_lr()[0]
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {
            "step": step + 1,
            "epoch": round((step + 1) / self.steps_per_epoch, 4),
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
        }
        if self.objective.preference and items:
            row["reward_margin"] = extra["reward_margin_sum"] / items
            row["reward_accuracy"] = extra["reward_accuracy_sum"] / items
        return row

    @torch.no_grad()
    def evaluate(self) -> float:
        was_training = self.model.training
        self.model.eval()
        total_loss, total_items = 0.0, 0
        size = self.cfg.batch_size
        for i in range(0, len(self.val_units), size):
            batch = self._to(
                collate_units(
                    self.val_units[i : i + size], self.pad_id, pack=self.cfg.pack, flatten=self.padding_free
                )
            )
            with self._autocast():
                loss_sum, items, _ = batch_loss(
                    self.objective, self.model, batch, beta=self.beta, gamma=self.cfg.simpo_gamma,
                    label_smoothing=0.0, ref_logps=self._ref(batch), reference=self.sharded,
                )  # fmt: skip
            total_loss += float(loss_sum)
            total_items += items
        distributed.reshard(self.model)
        self.model.train(was_training)
        return total_loss / max(1, total_items)

    # -- the loop -------------------------------------------------------------------------------------------
    def should_eval(self, step: int) -> bool:
        if not self.val_units:
            return False
        every = self.cfg.eval_every or self.steps_per_epoch
        return step % every == 0 or step == self.total_steps

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable weights (this process's shards of them under FSDP)."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """The whole trainable weights on the CPU, on rank 0 (``{}`` elsewhere; every process must call it
        under FSDP, which gathers the shards)."""
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return distributed.full_state(named, rank=self.rank)

    def fit(self) -> TrainState:
        self.model.train()
        while self.state.step < self.total_steps and not self.state.stopped_early:
            row = self.train_step(self.state.step)
            self.state.step += 1
            step = self.state.step
            if self.should_eval(step):
                val = self.evaluate()
                row["val_loss"] = val
                if self.state.best_val is None or val < self.state.best_val:
                    self.state.best_val, self.state.best_step, self.state.bad_evals = val, step, 0
                    self.best_weights = self.trainable_state()
                else:
                    self.state.bad_evals += 1
                    if self.cfg.patience and self.state.bad_evals >= self.cfg.patience:
                        self.state.stopped_early = True
            self.state.history.append(row)
            if step % max(1, self.cfg.log_every) == 0 or step == self.total_steps or "val_loss" in row:
                val_text = f" val_loss {row['val_loss']:.4f}" if "val_loss" in row else ""
                self.log(
                    f"step {step}/{self.total_steps} loss {row['loss']:.4f}{val_text} lr {row['lr']:.2e} "
                    f"grad_norm {row['grad_norm']:.3f} {row['tokens_per_s'] or 0:.0f} tok/s"
                )
            if self.cfg.save_every and step % self.cfg.save_every == 0 and step < self.total_steps:
                self.save_checkpoint(Path(self.cfg.checkpoint_dir or ".") / f"step-{step:06d}")
            self.on_step(step)
        if self.state.stopped_early:
            self.log(
                f"early stop at step {self.state.step}: no improvement in {self.cfg.patience} evaluations"
            )
        if self.best_weights is not None and self.state.best_step != self.state.step:
            self.log(
                f"keeping the best weights, from step {self.state.best_step} "
                f"(val_loss {self.state.best_val:.4f})"
            )
            self.load_trainable(self.best_weights)
        return self.state

    # -- checkpoints ----------------------------------------------------------------------------------------
    def load_trainable(self, weights: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        missing = [n for n in weights if n not in params]
        if missing:
            raise UsageError(
                f"the checkpoint has weights this model lacks (e.g. {missing[0]}): incompatible run"
            )
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(distributed.shaped_like(tensor, params[name]))

    def save_checkpoint(self, directory: Path) -> Path:
        """Trainable weights, optimizer, scheduler, RNG states and the step, written atomically by rank 0.
        Every process calls it: under FSDP the shards are gathered first, so the files are the same as one
        process's."""
        from safetensors.torch import save_file

        if self.rank != 0 and not self.sharded:
            return directory
        weights = self.full_trainable_state()
        best = self.best_weights
        best = distributed.full_state(best, rank=self.rank) if best is not None else None
        optimizer = distributed.optimizer_state(self.model, self.optimizer, rank=self.rank)
        if self.rank != 0:
            return directory
        with atomic_output(directory, force=True) as tmp:
            save_file({n: t.contiguous() for n, t in weights.items()}, str(tmp / "trainable.safetensors"))
            if best is not None:
                save_file({n: t.contiguous() for n, t in best.items()}, str(tmp / "best.safetensors"))
            torch.save(
                {
                    "optimizer": optimizer,
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None,
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "python_rng": random.getstate(),
                },
                tmp / "optimizer.pt",
            )
            state = {
                "step": self.state.step,
                "best_val": self.state.best_val,
                "best_step": self.state.best_step,
                "bad_evals": self.state.bad_evals,
                "history": self.state.history,
                "fingerprint": self.cfg.resume_fingerprint(),
                "total_steps": self.total_steps,
            }
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        self.log(f"checkpoint: {directory}")
        return directory

    def load_checkpoint(self, directory: Path) -> None:
        from safetensors.torch import load_file

        directory = latest_checkpoint(Path(directory))
        state = json.loads((directory / STATE_FILE).read_text())
        mine = self.cfg.resume_fingerprint()
        diff = [
            f"{k}: {state['fingerprint'].get(k)!r} -> {v!r}"
            for k, v in mine.items()
            if state["fingerprint"].get(k) != v
        ]
        if diff:
            raise UsageError(f"cannot --resume {directory} with different settings ({'; '.join(diff)})")
        self.load_trainable(load_file(str(directory / "trainable.safetensors")))
        if (directory / "best.safetensors").is_file():
            self.best_weights = load_file(str(directory / "best.safetensors"))
        blob = torch.load(directory / "optimizer.pt", weights_only=False)
        distributed.load_optimizer_state(self.model, self.optimizer, blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        if self.scaler and blob.get("scaler"):
            self.scaler.load_state_dict(blob["scaler"])
        torch.set_rng_state(blob["torch_rng"])
        if blob.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        random.setstate(blob["python_rng"])
        self.state = TrainState(
            step=state["step"], best_val=state["best_val"], best_step=state["best_step"],
            bad_evals=state["bad_evals"], history=state["history"],
        )  # fmt: skip
        self.log(f"resumed from {directory} at step {self.state.step}")


def latest_checkpoint(directory: Path) -> Path:
    """``directory`` itself if it is a checkpoint, else its newest ``step-*`` checkpoint."""
    if (directory / STATE_FILE).is_file():
        return directory
    steps = (
        sorted(d for d in directory.glob("step-*") if (d / STATE_FILE).is_file())
        if directory.is_dir()
        else []
    )
    if not steps:
        raise UsageError(f"--resume {directory}: not a checkpoint, nor a directory of step-* checkpoints")
    return steps[-1]
