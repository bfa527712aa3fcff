"""Optimizers and learning-rate schedules, each a registry.

Optimizers: ``adamw`` (torch's fused kernel where the device supports it, else foreach), ``lion``
(Chen et al. 2023, https://arxiv.org/abs/2302.06675; written here), ``adafactor`` (Shazeer & Stern 2018,
torch.optim.Adafactor), ``adamw-8bit`` (bitsandbytes, CUDA or CPU) and ``paged-adamw`` (bitsandbytes,
CUDA only).
Schedules: linear warmup, then ``cosine`` (to 0), ``linear`` (to 0) or ``constant``.
"""

from __future__ import annotations

import math

import torch

from llmctl.core.errors import LlmctlError, UsageError

OPTIMIZERS = ("adamw", "lion", "adafactor", "adamw-8bit", "paged-adamw")
SCHEDULERS = ("cosine", "linear", "constant")


class Lion(torch.optim.Optimizer):
    """Lion: ``update = sign(β1·m + (1−β1)·g)``; ``m ← β2·m + (1−β2)·g``; decoupled weight decay."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def _fused_ok(device: torch.device) -> bool:
    """torch's fused AdamW runs on CUDA and (since torch 2.4) on the CPU."""
    try:
        probe = torch.nn.Parameter(torch.zeros(1, device=device))
        torch.optim.AdamW([probe], fused=True)
        return True
    except (RuntimeError, TypeError):
        return False


def make_optimizer(name: str, params, *, lr: float, weight_decay: float, device: torch.device):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise LlmctlError("no trainable parameters: check --method and --target-modules")
    if name == "adamw":
        if _fused_ok(device):
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if name == "lion":
        return Lion(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    if name in ("adamw-8bit", "paged-adamw"):
        if name == "paged-adamw" and device.type != "cuda":
            raise LlmctlError(
                "--optimizer paged-adamw pages optimizer state between GPU and CPU memory and needs CUDA; "
                "on the CPU use adamw or adamw-8bit"
            )
        from llmctl.core.finetune.methods import require_bitsandbytes

        require_bitsandbytes(f"--optimizer {name}")
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw-8bit" else bnb.optim.PagedAdamW
        return cls(params, lr=lr, weight_decay=weight_decay)
    raise UsageError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, *, total: int, warmup: int, kind: str) -> float:
    """The multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise UsageError(f"unknown --scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")


def make_scheduler(optimizer, *, total: int, warmup: int, kind: str):
    lr_factor(0, total=total, warmup=warmup, kind=kind)  # validates kind
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=total, warmup=warmup, kind=kind)
    )
