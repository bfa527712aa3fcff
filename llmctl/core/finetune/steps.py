"""A few training steps on a model already in memory, for other commands (prune's recovery fine-tuning).

``train_steps(model, data, steps=N, lr=...)`` runs the same pieces as ``llmctl finetune`` — a method of
:data:`~llmctl.core.finetune.methods.METHODS` (LoRA by default), the ``sft`` objective and the
:class:`~llmctl.core.finetune.trainer.Trainer` with its optimizer and schedule — on ``data``, then merges an
adapter back into the weights, so ``model`` stays a plain model of the same class with updated weights (in
place). ``data`` is either token ids (a ``[n, seq]`` LongTensor or a list of id lists: every token is
trained) or records (dicts, or :class:`~llmctl.core.io.Record` objects, in any format ``finetune`` reads;
these need ``tokenizer``).

from llmctl.core.finetune.steps import train_steps
stats = train_steps(model, windows, steps=20, lr=1e-4)   # LoRA r=8 on all linears, merged at the end
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from llmctl.core.errors import InputDataError, UsageError
from llmctl.core.finetune.batching import as_unit
from llmctl.core.finetune.config import FinetuneConfig
from llmctl.core.finetune.data import Example, PreferenceExample, Tokenize
from llmctl.core.finetune.methods import get_method
from llmctl.core.finetune.objectives import get_objective
from llmctl.core.finetune.trainer import Trainer


def _units(data, tokenizer, max_length: int | None) -> list:
    """Training units (one document each) from token ids or records."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise UsageError("token-id data must be a [sequences, tokens] tensor")
        data = data.tolist()
    items = list(data)
    if not items:
        raise InputDataError("no training data for the recovery steps")
    if all(isinstance(x, list | tuple) and all(isinstance(t, int) for t in x) for x in items):
        return [as_unit(Example(list(x), list(x), f"sequence {i}")) for i, x in enumerate(items)]
    if tokenizer is None:
        raise UsageError("training on records needs the tokenizer")
    from llmctl.core.io import Record

    records = [
        x if isinstance(x, Record) else Record(x, "<memory>", i + 1, None) for i, x in enumerate(items)
    ]
    examples = Tokenize(tokenizer, max_length=max_length).all(records)
    if isinstance(examples[0], PreferenceExample):
        raise InputDataError("recovery steps train on text (sft), not preference pairs")
    return [as_unit(e) for e in examples]


def train_steps(
    model,
    data: torch.Tensor | Iterable,
    *,
    steps: int,
    lr: float = 1e-4,
    method: str = "lora",
    r: int = 8,
    alpha: float = 16.0,
    target_modules: str = "all-linear",
    batch_size: int = 4,
    scheduler: str = "constant",
    max_grad_norm: float = 1.0,
    tokenizer=None,
    pad_id: int | None = None,
    max_length: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Train ``model`` in place for ``steps`` optimizer steps of ``batch_size`` sequences; returns
    ``{"steps", "method", "trainable_parameters", "first_loss", "last_loss", "history"}``. Adapter methods
    are merged into the weights at the end; gradients flags and train/eval mode are restored."""
    if steps < 0:
        raise UsageError(f"steps must be 0 or more, got {steps}")
    m = get_method(method)
    if m.name == "qlora":
        raise UsageError("train_steps works on the model in memory; qlora needs a 4-bit load (use lora)")
    if steps == 0:
        return {"steps": 0, "method": m.name, "trainable_parameters": 0, "first_loss": None,
                "last_loss": None, "history": []}  # fmt: skip
    units = _units(data, tokenizer, max_length)
    if pad_id is None:
        pad_id = 0
        if tokenizer is not None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = FinetuneConfig(
        method=m.name, r=r, alpha=alpha, dropout=0.0, target_modules=target_modules, lr=lr, max_steps=steps,
        batch_size=batch_size, scheduler=scheduler, warmup_ratio=0.0, max_grad_norm=max_grad_norm, seed=seed,
        log_every=max(1, steps // 4),
    )  # fmt: skip
    device = next(model.parameters()).device
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = False  # no KV cache while training (and none sized for a model mid-pruning)
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices, inside peft
            torch.manual_seed(seed)
            trained = m.prepare(model, cfg)
            trainer = Trainer(
                trained, get_objective("sft"), units, [], cfg, pad_id=pad_id, device=device, log=log
            )
            params = sum(p.numel() for p in trainer.params)
            state = trainer.fit()
        if m.adapter:
            with torch.no_grad():
                merged = trained.merge_and_unload()
            if merged is not model:  # pragma: no cover - peft's unload returns the wrapped model itself
                raise AssertionError("merging the adapter did not give back the model trained in place")
            for attr in ("peft_config", "_hf_peft_config_loaded"):
                if attr in model.__dict__:
                    delattr(model, attr)
    finally:
        if config is not None and use_cache is not None:
            config.use_cache = use_cache
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])
        model.train(was_training)
    history = state.history
    return {
        "steps": state.step,
        "method": m.name,
        "trainable_parameters": params,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "history": [{"step": h["step"], "loss": h["loss"]} for h in history],
    }
