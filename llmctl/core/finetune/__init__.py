"""Fine-tuning: data formats and masking, packing, methods (full/LoRA/DoRA/QLoRA), objectives
(SFT/DPO/ORPO/SimPO), optimizers and schedules, and the training loop. ``finetune(FinetuneConfig(...))``
runs one end to end (``run.py``).

Importing this package does not import torch (the CLI starts fast); ``finetune`` and the registries load
on first use.
"""

from typing import Any

from llmctl.core.finetune.config import FinetuneConfig

__all__ = ["METHODS", "OBJECTIVES", "FinetuneConfig", "finetune"]


def __getattr__(name: str) -> Any:
    if name == "finetune":
        from llmctl.core.finetune.run import finetune

        return finetune
    if name == "METHODS":
        from llmctl.core.finetune.methods import METHODS

        return METHODS
    if name == "OBJECTIVES":
        from llmctl.core.finetune.objectives import OBJECTIVES

        return OBJECTIVES
    raise AttributeError(name)
