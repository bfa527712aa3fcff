"""Tiny Llama fine-tunes of one base, trained a few steps with plain torch on different data.

Shared by the merge tests (core and command): ``make_family(root)`` -> (base, [ft1, ft2, ft3]).
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def finetune(base: Path, out: Path, *, seed: int, steps: int = 3, text: bytes) -> Path:
    """``steps`` AdamW steps of next-token loss on ``text`` (byte-level tokens), saved as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    ids = torch.tensor([list(text)], dtype=torch.long) % model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (base / name).is_file() and not (out / name).exists():
            shutil.copy2(base / name, out / name)
    return out


DATA = [
    b"The quick brown fox jumps over the lazy dog. " * 4,
    b"1 + 1 = 2, 2 + 2 = 4, 3 + 3 = 6, 4 + 4 = 8. " * 4,
    b"def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 3,
]


_FAMILIES: dict[str, tuple[Path, list[Path]]] = {}


def make_family(root: Path, preset: str = "llama-tiny") -> tuple[Path, list[Path]]:
    """Built once per test session (the core and command tests share it)."""
    from llmctl.core.models.init import init_model

    if preset not in _FAMILIES:
        base = root / "base"
        init_model(preset, base, seed=0)
        fts = [finetune(base, root / f"ft{i + 1}", seed=i + 1, text=DATA[i]) for i in range(3)]
        _FAMILIES[preset] = (base, fts)
    return _FAMILIES[preset]
