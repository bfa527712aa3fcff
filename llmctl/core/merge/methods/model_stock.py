"""Model Stock: interpolate between the base and the average of the fine-tunes, by their angle.
https://arxiv.org/abs/2403.19522

With task vectors ``d_i = x_i - base`` (k >= 2 of them) and ``cos`` the mean pairwise cosine between them,

    t = k cos / (1 + (k - 1) cos),    merged = t * mean_i(x_i) + (1 - t) * base

computed over the whole flattened tensor, or per output row with ``filter_wise``. Where
``1 + (k - 1) cos`` is ~0 the base is kept.
"""

from __future__ import annotations

import torch

from llmctl.core.merge.methods.base import Inputs, MergeMethod, Param, Scope


class ModelStock(MergeMethod):
    def merge(self, inputs: Inputs) -> torch.Tensor:
        base = inputs.tensors[inputs.base]
        models = [inputs.tensors[i] for i in inputs.non_base]
        shape = base.shape
        if inputs.shared["filter_wise"]:
            if base.dim() == 1:
                base, models = base.unsqueeze(0), [m.unsqueeze(0) for m in models]
        else:
            base, models = base.reshape(-1), [m.reshape(-1) for m in models]
        deltas = [m - base for m in models]
        cosines = []
        for i, a in enumerate(deltas):
            for b in deltas[i + 1 :]:
                norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        k = len(models)
        denominator = 1 + (k - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1, denominator))
        average = sum(models) / k
        return (t * average + (1 - t) * base).reshape(shape)


MODEL_STOCK = ModelStock(
    name="model_stock",
    pretty_name="Model Stock",
    reference_url="https://arxiv.org/abs/2403.19522",
    params=(Param("filter_wise", bool, Scope.SHARED, False, "one interpolation ratio per output row"),),
    base="required",
    min_models=3,
)
