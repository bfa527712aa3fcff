"""Linear (model soup): a weighted average of the models' tensors. https://arxiv.org/abs/2203.05482

merged = sum_i w_i * x_i / sum_i w_i        (without the division when normalize is false)
"""

from __future__ import annotations

import torch

from llmctl.core.merge.methods.base import Inputs, MergeMethod, Param, Scope, work_dtype


class Linear(MergeMethod):
    def merge(self, inputs: Inputs) -> torch.Tensor:
        first = inputs.tensors[0]
        dtype = work_dtype(first)
        weights = [float(p["weight"]) for p in inputs.per_input]
        out = torch.zeros_like(first, dtype=dtype)
        for x, w in zip(inputs.tensors, weights, strict=True):
            out.add_(x.to(dtype), alpha=w)
        if inputs.shared["normalize"]:
            out.div_(sum(weights))
        return out


LINEAR = Linear(
    name="linear",
    pretty_name="Linear",
    reference_url="https://arxiv.org/abs/2203.05482",
    params=(
        Param("weight", float, Scope.INPUT, help="weight of each model"),
        Param("normalize", bool, Scope.SHARED, True, "divide by the sum of the weights"),
    ),
)
