"""One fine-tuning run, end to end: data → model + method → trainer → output directory.

The output appears only when training succeeded (written to a temporary sibling, renamed at the end):

- adapter methods (lora, dora, qlora): a PEFT adapter directory (``adapter_config.json``,
  ``adapter_model.safetensors``) plus the tokenizer; with ``--merge``, a full Hugging Face model instead,
  the adapter kept in ``adapter/``. QLoRA merges into the base re-read in full precision, never into the
  4-bit weights.
- ``full``: a full Hugging Face model directory.
- always: ``metrics.jsonl`` (one row per step), ``loss.png`` and ``llmctl.json`` (provenance, settings,
  summary).

Under ``--strategy fsdp`` the trained weights are gathered onto rank 0 and loaded into an unsharded copy of
the model (the base re-read on the CPU, the method applied again), which is saved exactly as one process's.
"""

from __future__ import annotations

import copy
import json
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.core.errors import InputDataError, ModelError, UsageError
from llmctl.core.finetune import distributed
from llmctl.core.finetune.batching import units_of
from llmctl.core.finetune.config import FinetuneConfig
from llmctl.core.finetune.data import PreferenceExample, Tokenize
from llmctl.core.finetune.methods import Method, get_method, qlora_quantization_config
from llmctl.core.finetune.objectives import Objective, get_objective
from llmctl.core.finetune.plot import plot_losses
from llmctl.core.finetune.trainer import Trainer
from llmctl.core.io import ReadStats, atomic_output, check_output, read_records, resolve_input
from llmctl.core.models.varlen import enable_varlen_attention
from llmctl.core.provenance import now, write_provenance


def check_settings(cfg: FinetuneConfig) -> None:
    objective = get_objective(cfg.objective)
    get_method(cfg.method)
    if cfg.pack and objective.preference:
        raise UsageError("--pack works with --objective sft only (preference pairs are never packed)")
    if cfg.pack and not cfg.max_length:
        raise UsageError("--pack needs --max-length (the length of a packed row)")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise UsageError(f"unknown --mixed-precision {cfg.mixed_precision!r}; choose no, bf16 or fp16")
    if not 0 <= cfg.val_split < 1:
        raise UsageError("--val-split must be in [0, 1)")
    if cfg.val and cfg.val_split:
        raise UsageError("give --val or --val-split, not both")
    if cfg.patience and not (cfg.val or cfg.val_split):
        raise UsageError("--patience (early stopping) needs validation data: --val or --val-split")
    if cfg.merge and get_method(cfg.method).name == "full":
        raise UsageError("--merge applies to adapter methods (lora, dora, qlora); full fine-tuning already "
                         "writes a full model")  # fmt: skip
    distributed.check_strategy(cfg.strategy, processes=distributed.world_size(), method=cfg.method,
                               mixed_precision=cfg.mixed_precision)  # fmt: skip


def load_examples(path: str, tokenize: Tokenize, *, skip_bad_lines: bool) -> list:
    stats = ReadStats()
    records = read_records(resolve_input(path), skip_bad_lines=skip_bad_lines, stats=stats)
    return tokenize.all(records, skip_bad_lines=skip_bad_lines)


def split_examples(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded hold-out of ``fraction`` of the examples (at least one, and at least one left to train)."""
    n_val = max(1, round(len(examples) * fraction))
    if n_val >= len(examples):
        raise InputDataError(f"--val-split {fraction} leaves no training examples out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [
        e for i, e in enumerate(examples) if i in held
    ]


def prepare_data(cfg: FinetuneConfig, tokenizer) -> tuple[list, list, dict[str, Any]]:
    objective = get_objective(cfg.objective)
    tokenize = Tokenize(tokenizer, fmt=cfg.format, text_field=cfg.text_field,
                        train_on_prompt=cfg.train_on_prompt, max_length=cfg.max_length)  # fmt: skip
    train = load_examples(cfg.train, tokenize, skip_bad_lines=cfg.skip_bad_lines)
    is_pref = isinstance(train[0], PreferenceExample)
    if objective.preference and not is_pref:
        raise InputDataError(
            f"--objective {objective.name} needs preference records (prompt, chosen, rejected); "
            f"{cfg.train} is in {tokenize.stats.format} format"
        )
    if not objective.preference and is_pref:
        raise InputDataError(
            f"{cfg.train} holds preference records: use --objective dpo, orpo or simpo (or sft on other data)"
        )
    if cfg.val:
        val_tokenize = Tokenize(tokenizer, fmt=tokenize.stats.format, text_field=cfg.text_field,
                                train_on_prompt=cfg.train_on_prompt, max_length=cfg.max_length)  # fmt: skip
        val = load_examples(cfg.val, val_tokenize, skip_bad_lines=cfg.skip_bad_lines)
    elif cfg.val_split:
        train, val = split_examples(train, cfg.val_split, cfg.seed)
    else:
        val = []
    stats = tokenize.stats
    info = {
        "format": stats.format,
        "records": stats.records,
        "train_examples": len(train),
        "val_examples": len(val),
        "tokens": stats.tokens,
        "trained_tokens": stats.trained_tokens,
        "truncated": stats.truncated,
        "skipped": stats.skipped,
    }
    return train, val, info


def load_base(cfg: FinetuneConfig, device):
    """The base model on ``device``; 4-bit NF4 for QLoRA."""
    from llmctl.core.models.hf import load_model, resolve_model

    ref = resolve_model(cfg.base)
    if cfg.method == "qlora":
        from transformers import AutoModelForCausalLM

        quant = qlora_quantization_config(device)
        path, extra = ref.load_args
        where = (device.index or 0) if device.type == "cuda" else "cpu"
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, quantization_config=quant, device_map={"": where}, **extra
            )
        except Exception as e:
            raise ModelError(f"cannot load {cfg.base} in 4-bit NF4 for QLoRA: {e}") from e
    else:
        model = load_model(ref, device=str(device), dtype=cfg.dtype)
    model.config.use_cache = False
    return model


def apply_kernels(model, enabled: bool, log: Callable[[str], None]) -> dict | None:
    # --- KERNELS HOOK -----------------------------------------------------------------------------------
    # `--kernels` swaps in llmctl's fused RMSNorm/RoPE/SwiGLU (and later linear-cross-entropy) kernels from
    # llmctl/kernels. Contract: ``llmctl.kernels.patch_model(model)`` patches the model in place, dispatches
    # to Triton on CUDA and to the torch references elsewhere, and returns a summary of what it patched.
    if not enabled:
        return None
    try:
        from llmctl.kernels import patch_model
    except ImportError:
        raise UsageError("--kernels: llmctl.kernels.patch_model is not available in this version") from None
    summary = patch_model(model)
    log(f"kernels: {summary}")
    return summary.as_dict() if hasattr(summary, "as_dict") else {"summary": str(summary)}


@dataclass
class Run:
    """Everything a run is made of, ready to ``trainer.fit()``."""

    trainer: Trainer
    model: Any
    tokenizer: Any
    method: Method
    objective: Objective
    data_info: dict[str, Any]
    kernels: dict | None = None


def build(cfg: FinetuneConfig, *, log: Callable[[str], None] = lambda m: None,
          progress: Callable[[int, int], None] = lambda s, t: None) -> Run:  # fmt: skip
    """Read the data, load the model, apply the method, make the trainer (and restore ``--resume``)."""
    from llmctl.core.models.hf import load_tokenizer
    from llmctl.core.runtime import resolve_device, set_seed

    check_settings(cfg)
    device = distributed.init(resolve_device(cfg.device))
    objective, method = get_objective(cfg.objective), get_method(cfg.method)
    if method.name == "qlora":
        qlora_quantization_config(device)  # fail before reading anything
    tokenizer = load_tokenizer(cfg.base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, val, info = prepare_data(cfg, tokenizer)
    truncated = (
        f"; {info['truncated']} truncated to --max-length {cfg.max_length}" if info["truncated"] else ""
    )
    log(
        f"{info['format']} data: {info['train_examples']} training and {info['val_examples']} validation "
        f"examples, {info['trained_tokens']:,} of {info['tokens']:,} tokens trained{truncated}"
    )
    train_units = units_of(train, pack=cfg.pack, max_length=cfg.max_length)
    val_units = units_of(val, pack=cfg.pack, max_length=cfg.max_length) if val else []
    if cfg.pack:
        log(f"packed {len(train)} examples into {len(train_units)} rows of up to {cfg.max_length} tokens")

    set_seed(cfg.seed)
    model = load_base(cfg, device)
    kernels = apply_kernels(model, cfg.kernels, log)
    if cfg.gradient_checkpointing:
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable({"use_reentrant": False})
    ref_model = None
    if objective.needs_ref_model and not method.adapter:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # transformers' deprecation notices, raised inside peft
        model = method.prepare(model, cfg)
    if cfg.strategy == "fsdp" and distributed.world_size() > 1:
        layers = distributed.shard(model)
        log(f"fsdp: sharded {layers} decoder layers and the rest over {distributed.world_size()} processes")
    # NEFTune scales its noise by the row length, so it keeps padded rows (as HF/TRL define it)
    padding_free = not objective.preference and not cfg.neftune_alpha and enable_varlen_attention(model)
    if padding_free:
        log("padding-free batches: each micro-batch is one row, attention split per example")
    if cfg.save_every and not cfg.checkpoint_dir:
        cfg.checkpoint_dir = str(Path(cfg.output).with_name(Path(cfg.output).name + "-checkpoints"))
    trainer = Trainer(
        model, objective, train_units, val_units, cfg, pad_id=pad_id, device=device, ref_model=ref_model,
        log=log, on_step=lambda s: progress(s, trainer.total_steps), padding_free=padding_free,
    )  # fmt: skip
    if cfg.resume:
        trainer.load_checkpoint(Path(cfg.resume))
    return Run(trainer, model, tokenizer, method, objective, info, kernels)


def finetune(cfg: FinetuneConfig, *, force: bool = False, log: Callable[[str], None] = lambda m: None,
             progress: Callable[[int, int], None] = lambda s, t: None) -> dict[str, Any]:  # fmt: skip
    """Train and write the output directory; returns the summary (what ``--json`` prints)."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # transformers' deprecation notices, raised inside peft
        return _finetune(cfg, force=force, log=log, progress=progress)


def _finetune(cfg: FinetuneConfig, *, force: bool, log: Callable[[str], None],
              progress: Callable[[int, int], None]) -> dict[str, Any]:  # fmt: skip
    from llmctl.core.models.hf import save_model

    started_at, t0 = now(), time.perf_counter()
    check_output(cfg.output, force=force)
    run = build(cfg, log=log, progress=progress)
    trainer, model, tokenizer, method, objective = (
        run.trainer,
        run.model,
        run.tokenizer,
        run.method,
        run.objective,
    )
    trainable = sum(p.numel() for p in trainer.params)
    total = sum(p.numel() for p in model.parameters())
    unit = "pairs" if objective.preference else "sequences"
    log(
        f"{method.name}/{objective.name}: {trainable:,} of {total:,} parameters train; "
        f"{trainer.total_steps} steps of {trainer.global_per_step} {unit}"
        + (f" over {trainer.world} processes" if trainer.world > 1 else "")
    )

    if trainer.rank != 0:  # data parallel: rank 0 writes everything
        trainer.fit()
        if trainer.sharded:
            trainer.full_trainable_state()  # this process's part of gathering the shards
        distributed.barrier_and_close()
        return {"rank": trainer.rank}
    with atomic_output(cfg.output, force=force) as tmp:
        fit_start = time.perf_counter()
        state = trainer.fit()
        train_seconds = time.perf_counter() - fit_start
        if trainer.sharded:
            model = unsharded_copy(cfg, method, trainer.full_trainable_state())
        model.eval()
        if method.adapter:
            adapter_dir = tmp / "adapter" if cfg.merge else tmp
            model.save_pretrained(adapter_dir)
            if cfg.merge:
                merged = merge_adapter(cfg, model, adapter_dir)
                save_model(merged, tokenizer, tmp)
            else:
                tokenizer.save_pretrained(tmp)
        else:
            save_model(model, tokenizer, tmp)
        history = state.history
        with open(tmp / "metrics.jsonl", "w", encoding="utf-8") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")
        plot_losses(
            tmp / "loss.png",
            [(r["step"], r["loss"]) for r in history],
            [(r["step"], r["val_loss"]) for r in history if "val_loss" in r],
        )
        seconds = time.perf_counter() - t0
        tokens = sum(r["tokens"] for r in history)
        summary = {
            "output": str(cfg.output),
            "method": method.name,
            "objective": objective.name,
            **run.data_info,
            "steps": state.step,
            "stopped_early": state.stopped_early,
            "final_loss": history[-1]["loss"] if history else None,
            "best_val_loss": state.best_val,
            "best_step": state.best_step,
            "trainable_parameters": trainable,
            "parameters": total,
            "seconds": round(seconds, 2),
            "train_seconds": round(train_seconds, 2),
            "train_tokens_per_s": round(tokens / train_seconds, 1) if train_seconds else None,
            "merged": cfg.merge,
            "processes": trainer.world,
            "kernels": run.kernels,
        }
        inputs = [cfg.base, cfg.train] + ([cfg.val] if cfg.val else [])
        write_provenance(
            tmp,
            command="finetune",
            inputs=[i for i in inputs if i != "-"],
            started_at=started_at,
            seed=cfg.seed,
            extra={"finetune": cfg.as_dict(), "summary": summary},
        )
    distributed.barrier_and_close()
    return summary


def unsharded_copy(cfg: FinetuneConfig, method: Method, weights: dict):
    """A plain (unsharded) copy of the trained model on the CPU: the base re-read, ``method`` applied, the
    trained ``weights`` (whole tensors, by parameter name) loaded."""
    import torch

    model = load_base(cfg, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = method.prepare(model, cfg)
    params = dict(model.named_parameters())
    missing = sorted(set(weights) - set(params))
    if missing:
        raise ModelError(f"fsdp: the trained weights do not fit the unsharded model (e.g. {missing[0]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    return model


def merge_adapter(cfg: FinetuneConfig, model, adapter_dir: Path):
    """A full-precision model with the adapter merged in. For QLoRA the base is re-read unquantized and the
    adapter applied to it; merging into NF4 weights would round the update away."""
    if cfg.method != "qlora":
        return model.merge_and_unload()
    from peft import PeftModel

    from llmctl.core.models.hf import load_model, resolve_model

    base = load_model(resolve_model(cfg.base), device="cpu", dtype="float32")
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
