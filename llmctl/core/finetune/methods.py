"""Fine-tuning methods: which parameters train. A registry; adding a method is one entry and one function.

- ``full``: every parameter.
- ``lora``: low-rank adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) through peft;
  ``--rslora`` scales by ``alpha/sqrt(r)`` (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732).
- ``dora``: weight-decomposed LoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353), peft's ``use_dora``.
- ``qlora``: LoRA over a 4-bit NF4 base with double quantization (Dettmers et al. 2023,
  https://arxiv.org/abs/2305.14314) through bitsandbytes (CUDA, or its CPU backend from 0.46).

The adapter methods' input dropout is :class:`llmctl.core.finetune.dropout.FastDropout` (peft's
``nn.Dropout`` with a cheaper random mask).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmctl.core.errors import LlmctlError, UsageError
from llmctl.core.finetune.dropout import use_fast_dropout


@dataclass(frozen=True)
class Method:
    name: str
    reference: str
    adapter: bool  # the output is a PEFT adapter directory (else a full model)
    prepare: Callable


def linear_module_names(model) -> list[str]:
    """Short names of the model's linear layers (what ``--target-modules`` may name), lm_head excluded."""
    import torch

    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not full.endswith("lm_head"):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def parse_targets(model, target_modules: str) -> str | list[str]:
    if target_modules.strip() in ("all-linear", "all"):
        return "all-linear"
    wanted = [t.strip() for t in target_modules.split(",") if t.strip()]
    available = linear_module_names(model)
    unknown = [t for t in wanted if t not in available]
    if unknown or not wanted:
        raise UsageError(
            f"unknown --target-modules {', '.join(unknown) or repr(target_modules)}; this model's linear "
            f"modules are: {', '.join(available)} (or all-linear)"
        )
    return wanted


def _full(model, opts):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _lora(model, opts, *, dora: bool = False):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=opts.r,
        lora_alpha=opts.alpha,
        lora_dropout=opts.dropout,
        target_modules=parse_targets(model, opts.target_modules),
        use_rslora=opts.rslora,
        use_dora=dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    use_fast_dropout(model)  # peft's nn.Dropout masks cost ~15% of a CPU step; same p, cheaper bits
    return model


def _qlora(model, opts):  # the base was loaded 4-bit by load_base_for(); only adapters train
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=opts.gradient_checkpointing)
    return _lora(model, opts)


METHODS: dict[str, Method] = {
    "full": Method("full", "all parameters", False, _full),
    "lora": Method("lora", "https://arxiv.org/abs/2106.09685", True, _lora),
    "dora": Method("dora", "https://arxiv.org/abs/2402.09353", True, lambda m, o: _lora(m, o, dora=True)),
    "qlora": Method("qlora", "https://arxiv.org/abs/2305.14314", True, _qlora),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown --method {name!r}; choose one of {', '.join(METHODS)}") from None


def require_bitsandbytes(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise LlmctlError(
            f"{what} needs bitsandbytes, which is not installed: pip install 'bitsandbytes>=0.46' "
            "(its CPU backend quantizes and trains NF4 too); or use --method lora / --optimizer adamw"
        )


def qlora_quantization_config(device):
    """bitsandbytes NF4 with double quantization; compute in bfloat16 on CUDA, float32 on the CPU
    (bitsandbytes >= 0.46 runs 4-bit layers on the CPU; float32 is the fast, exact dtype there)."""
    require_bitsandbytes("--method qlora")
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
    )
