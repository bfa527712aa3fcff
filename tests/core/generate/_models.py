"""Tiny random models for the generate tests."""

from __future__ import annotations

from pathlib import Path


def sharp_llama(directory: Path, seed: int = 3) -> Path:
    """A llama-tiny with its matrices scaled 8x, so the next-token distribution has clear winners (a plain
    random init is nearly flat: greedy ties and identical beams would make the tests weak)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmctl.core.models.init import init_model

    directory.mkdir(parents=True, exist_ok=True)
    init_model("llama-tiny", directory, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(directory)
    return directory
