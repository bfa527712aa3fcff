"""Weight layout for CPU decoding: linear layers that keep their weight transposed, ``[in, out]``.

Batch-1 decoding is a chain of matrix-vector products, limited by how fast the weights stream from memory.
On the CPU BLAS this project ships with (MKL), ``x @ W_t`` over a row-major ``[in, out]`` copy streams the
weight once, with contiguous accumulation into the output row, and measured 15-25% faster for SmolLM2's
shapes than ``F.linear(x, W)`` over the ``[out, in]`` layout checkpoints use (``benchmarks/generate.py``).
The arithmetic is the same matrix product; only the summation order inside the BLAS may differ, at the
level of float rounding (greedy tokens are tested equal to transformers').

:func:`transpose_linears` swaps every plain ``nn.Linear`` of a model for a :class:`TransposedLinear`
holding the same parameters; quantized or factored modules are left as they are. ``weight`` stays
available (a transposed view) for code that reads it.
"""

from __future__ import annotations

import torch
from torch import nn


class TransposedLinear(nn.Module):
    """``y = x @ weight_t + bias`` with ``weight_t = W.T`` stored contiguous (``[in, out]``)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.bias is None:
            out = torch.mm(flat, self.weight_t)
        else:
            out = torch.addmm(self.bias, flat, self.weight_t)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


def transpose_linears(model: nn.Module) -> int:
    """Replace each plain ``nn.Linear`` (exact type) of ``model`` by a :class:`TransposedLinear`.
    Returns how many were replaced. A tied output head gets its own transposed copy."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in swaps:
        setattr(parent, name, TransposedLinear(child))
    return len(swaps)
