"""``llmctl init``: a reproducible, randomly initialised model directory from a preset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.core.models.hf import load_tokenizer, save_model
from llmctl.core.models.presets import get_preset
from llmctl.core.models.tokenizers import CHATML_TEMPLATE, byte_level_tokenizer
from llmctl.core.runtime import resolve_dtype, set_seed


def init_model(
    preset: str,
    directory: Path,
    *,
    seed: int = 0,
    vocab_from: str | Path | None = None,
    dtype: str = "auto",
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the preset's model with ``seed`` and save it, with its tokenizer, into ``directory``.

    The same preset, seed and tokenizer give bit-identical weights: the seed is set immediately before
    the weights are initialised, on the CPU, in float32 (then cast to ``dtype``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    spec = get_preset(preset)
    tokenizer = load_tokenizer(vocab_from) if vocab_from else byte_level_tokenizer()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None) and "<|im_start|>" in tokenizer.get_vocab():
        tokenizer.chat_template = CHATML_TEMPLATE
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = spec.make_config(**ids, **(overrides or {}))
    tokenizer.model_max_length = config.max_position_embeddings
    set_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target = resolve_dtype(dtype, "cpu")
    model.to(target)
    model.config.dtype = target
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    save_model(model, tokenizer, directory)
    return {
        "preset": spec.name,
        "output": str(directory),
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.vocab_size,
        "dtype": str(target).removeprefix("torch."),
        "seed": seed,
    }
