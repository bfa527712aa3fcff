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

STREAM_MIN = 1 << 22  # tensors with at least this many entries are merged in chunks (CPU, float32)
CHUNK = 1 << 20


def _ratio(cos: torch.Tensor, k: int) -> torch.Tensor:
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1, denominator))


class ModelStock(MergeMethod):
    def merge(self, inputs: Inputs) -> torch.Tensor:
        base = inputs.tensors[inputs.base]
        models = [inputs.tensors[i] for i in inputs.non_base]
        if base.numel() >= STREAM_MIN and base.device.type == "cpu" and base.dtype == torch.float32:
            return self._merge_streamed(base, models, inputs.shared["filter_wise"])
        return self._merge_whole(base, models, inputs.shared["filter_wise"])

    @staticmethod
    def _merge_whole(base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
        """The reference: whole tensors."""
        shape = base.shape
        if filter_wise:
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
        t = _ratio(cos, len(models))
        average = sum(models) / len(models)
        return (t * average + (1 - t) * base).reshape(shape)

    @classmethod
    def _merge_streamed(
        cls, base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool
    ) -> torch.Tensor:
        """The same result in chunks, so a large tensor needs memory for the inputs and the output only:
        row by row (rows are independent) with ``filter_wise``; else a first pass sums the dot products and
        norms that give the one ratio ``t`` and a second pass interpolates."""
        out = torch.empty_like(base)
        if filter_wise and base.dim() >= 2:
            rows = base.reshape(-1, base.shape[-1])
            step = max(1, CHUNK // rows.shape[1])
            flat_out, flat_models = out.view(rows.shape), [m.reshape(rows.shape) for m in models]
            for r in range(0, rows.shape[0], step):
                part = [m[r : r + step] for m in flat_models]
                flat_out[r : r + step] = cls._merge_whole(rows[r : r + step], part, True)
            return out
        flat, flat_models = base.reshape(-1), [m.reshape(-1) for m in models]
        k, n = len(models), flat.numel()
        spans = [(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)]
        dots = torch.zeros(k, k, dtype=torch.float64)
        for s, e in spans:
            deltas = torch.stack([m[s:e] - flat[s:e] for m in flat_models])  # [k, chunk]
            dots += deltas.double() @ deltas.double().T
        norms = dots.diagonal().sqrt()
        cosines = [
            (dots[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
            for i in range(k)
            for j in range(i + 1, k)
        ]
        t = _ratio(torch.stack(cosines).mean().float(), k)
        flat_out = out.view(-1)
        for s, e in spans:
            average = sum(m[s:e] for m in flat_models) / k
            flat_out[s:e] = t * average + (1 - t) * flat[s:e]
        return out


MODEL_STOCK = ModelStock(
    name="model_stock",
    pretty_name="Model Stock",
    reference_url="https://arxiv.org/abs/2403.19522",
    params=(Param("filter_wise", bool, Scope.SHARED, False, "one interpolation ratio per output row"),),
    base="required",
    min_models=3,
)
