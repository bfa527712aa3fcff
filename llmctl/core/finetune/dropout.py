"""Inverted dropout with a cheaper random mask, for LoRA's input dropout.

peft applies ``nn.Dropout`` to the input of every adapted layer: in SmolLM2 with all-linear LoRA that is
210 masks per forward pass, one per element of each input. On the CPU ``bernoulli_`` draws one 32-bit
number per element through the Mersenne Twister, and in a LoRA step it took about 15% of the time.

:class:`FastDropout` draws 64 random bits per *four* elements and compares each 16-bit field with a
threshold. So an element is dropped with probability ``round(p·65536) / 65536``: p = 0.05 becomes
0.0500031. The survivors are scaled by ``1 / (1 − that)``, so the expectation is exactly the input. The
bits come from torch's generator on the input's device, so ``torch.manual_seed`` and llmctl's checkpoints
(which save the RNG state) make runs reproducible and resumable, as with ``nn.Dropout``. The backward
pass keeps the boolean mask only, one byte per element, as ``nn.Dropout`` does.

:func:`use_fast_dropout` swaps it in for every ``nn.Dropout`` inside a PEFT model's LoRA layers.
:class:`torch.nn.Dropout` stays the reference: the tests check the drop rate, the scaling, the gradient
and eval mode against it.
"""

from __future__ import annotations

import torch

FIELDS = 4  # 16-bit fields per 64-bit random word
RESOLUTION = 1 << 16


def keep_mask(shape: torch.Size | tuple[int, ...], threshold: int, device: torch.device) -> torch.Tensor:
    """A boolean mask of ``shape``: each element False (dropped) with probability ``threshold / 65536``."""
    n = 1
    for s in shape:
        n *= s
    words = torch.empty((n + FIELDS - 1) // FIELDS, dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1)  # the full range: all 64 bits uniform
    fields = words.view(torch.int16)[:n]  # uniform over [-32768, 32767]
    return (fields >= threshold - RESOLUTION // 2).view(shape)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x * (mask * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * (mask * ctx.scale).to(grad.dtype), None, None


class FastDropout(torch.nn.Module):
    """``nn.Dropout(p)`` with ``p`` rounded to a multiple of 1/65536 and a cheaper mask (see the module)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * RESOLUTION)
        self.scale = 1.0 / (1.0 - self.threshold / RESOLUTION)

    @property
    def effective_p(self) -> float:
        return self.threshold / RESOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        return _MaskedScale.apply(x, keep_mask(x.shape, self.threshold, x.device), self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p} (effective {self.effective_p:.7f})"


def use_fast_dropout(model) -> int:
    """Replace every ``nn.Dropout`` with p > 0 held in a LoRA layer's ``lora_dropout`` by :class:`FastDropout`
    (same p); returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        container = getattr(module, "lora_dropout", None)
        if not isinstance(container, torch.nn.ModuleDict):
            continue
        for name, dropout in list(container.items()):
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                fast = FastDropout(dropout.p)
                fast.train(dropout.training)
                container[name] = fast
                replaced += 1
    return replaced
