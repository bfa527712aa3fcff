"""Task-vector merges: task arithmetic, TIES, DARE (TIES and linear) and Model Breadcrumbs.

They differ only in settings, so they are one parameterised class. For each fine-tuned model i the task
vector is ``d_i = x_i - base``; then

1. sparsify ``d_i`` to ``density`` (TIES: largest magnitudes; DARE: Bernoulli keep, rescaled;
   Breadcrumbs: drop the ``gamma`` largest outliers and the smallest),
2. weight it: ``d_i *= w_i``,
3. with a sign consensus (TIES, DARE-TIES), elect each entry's sign as the sign of ``sum_i d_i`` and keep
   only the ``d_i`` that agree (the "disjoint" part),
4. sum: ``delta = sum_i d_i`` (divided by the sum of the kept weights when ``normalize``), times
   ``lambda``, and ``merged = base + delta``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.core.merge.methods.base import Inputs, MergeMethod, Param, Scope
from llmctl.core.merge.methods.sparsify import SPARSIFIERS, streamed

STREAM_MIN = 1 << 22  # tensors with at least this many entries are merged in chunks (CPU, float32)
CHUNK = 1 << 20


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """[models, ...] -> mask of the entries whose sign agrees with the sign of their sum (0 counts as +)."""
    elected = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return deltas.sign() == elected


@dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    sparsify: str | None = None  # "magnitude", "random", "magnitude_outliers" or None
    consensus: bool = False

    def merge(self, inputs: Inputs) -> torch.Tensor:
        base = inputs.tensors[inputs.base]
        if not inputs.non_base:
            return base
        if base.numel() >= STREAM_MIN and base.device.type == "cpu" and base.dtype == torch.float32:
            return self._merge_streamed(inputs)
        return self._merge_whole(inputs)

    def _sparsifier_kwargs(self, inputs: Inputs, i: int) -> dict:
        if self.sparsify == "magnitude_outliers":
            return {"gamma": inputs.per_input[i]["gamma"]}
        if self.sparsify == "random":
            return {"generator": inputs.generator}
        return {}

    def _weights(self, inputs: Inputs, like: torch.Tensor, dims: int) -> torch.Tensor:
        return torch.tensor(
            [inputs.per_input[i]["weight"] for i in inputs.non_base], dtype=like.dtype, device=like.device
        ).reshape(-1, *([1] * dims))

    def _combine(self, deltas: torch.Tensor, weights: torch.Tensor, shared: dict) -> torch.Tensor:
        """Steps 2-4 on stacked sparsified task vectors ``[models, ...]``: weight, elect, sum, scale."""
        deltas.mul_(weights)
        if self.consensus:
            mask = sign_consensus(deltas).to(deltas.dtype)
            delta = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            delta = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if shared["normalize"]:
            delta /= divisor
        if shared["lambda"] != 1:
            delta *= shared["lambda"]
        return delta

    def _merge_whole(self, inputs: Inputs) -> torch.Tensor:
        """The reference: every task vector whole, stacked."""
        base = inputs.tensors[inputs.base]
        others = inputs.non_base
        deltas = base.new_empty((len(others), *base.shape))  # [models, *shape]
        for row, i in enumerate(others):
            delta = inputs.tensors[i] - base
            if self.sparsify:
                delta = SPARSIFIERS[self.sparsify](
                    delta,
                    inputs.per_input[i]["density"],
                    rescale=inputs.shared["rescale"],
                    **self._sparsifier_kwargs(inputs, i),
                )
            deltas[row] = delta
        delta = self._combine(deltas, self._weights(inputs, deltas, base.dim()), inputs.shared)
        return (base + delta).to(base.dtype)

    def _merge_streamed(self, inputs: Inputs) -> torch.Tensor:
        """The same result in chunks of ``CHUNK`` entries, so a large tensor (an embedding) needs memory for
        the inputs and the output plus one chunk's temporaries (see ``streamed`` for ties at a cut)."""
        base = inputs.tensors[inputs.base].reshape(-1)
        n = base.numel()
        spans = [(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)]
        flat = {i: inputs.tensors[i].reshape(-1) for i in inputs.non_base}

        def chunks(x: torch.Tensor):
            return lambda: (x[s:e] - base[s:e] for s, e in spans)

        appliers = {}
        for i in inputs.non_base:
            if not self.sparsify:
                appliers[i] = None
                continue
            appliers[i] = streamed(
                self.sparsify,
                chunks(flat[i]),
                n,
                inputs.per_input[i]["density"],
                rescale=inputs.shared["rescale"],
                **self._sparsifier_kwargs(inputs, i),
            )
        weights = self._weights(inputs, base, 1)
        out = torch.empty_like(base)
        for s, e in spans:
            deltas = base.new_empty((len(flat), e - s))
            for row, (i, x) in enumerate(flat.items()):
                delta = x[s:e] - base[s:e]
                deltas[row] = appliers[i](delta) if appliers[i] else delta
            out[s:e] = base[s:e] + self._combine(deltas, weights, inputs.shared)
        return out.reshape(inputs.tensors[inputs.base].shape)


def _params(normalize: bool, rescale: bool, gamma: bool = False) -> tuple[Param, ...]:
    params = [
        Param("weight", float, Scope.NON_BASE, help="weight of each task vector"),
        Param("density", float, Scope.NON_BASE, 1.0, "fraction of each task vector kept"),
        Param("normalize", bool, Scope.SHARED, normalize, "divide by the sum of the (kept) weights"),
        Param("rescale", bool, Scope.SHARED, rescale, "rescale kept entries to the task vector's L1 norm"),
        Param("lambda", float, Scope.SHARED, 1.0, "scale of the merged task vector"),
        Param("int8_mask", bool, Scope.SHARED, False, "accepted for mergekit compatibility; no effect"),
    ]
    if gamma:
        params.append(Param("gamma", float, Scope.NON_BASE, 0.01, "fraction of largest outliers dropped"))
    return tuple(params)


def _method(name, pretty, url, sparsify, consensus, normalize, rescale) -> TaskArithmetic:
    return TaskArithmetic(
        name=name,
        pretty_name=pretty,
        reference_url=url,
        params=_params(normalize, rescale, gamma=sparsify == "magnitude_outliers"),
        base="required",
        min_models=1,
        random=sparsify == "random",
        sparsify=sparsify,
        consensus=consensus,
    )


TIES_URL = "https://arxiv.org/abs/2306.01708"
DARE_URL = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_URL = "https://arxiv.org/abs/2312.06795"

METHODS = [
    _method(
        "task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089", None, False, False, False
    ),
    _method("ties", "TIES", TIES_URL, "magnitude", True, True, False),
    _method("dare_ties", "DARE TIES", DARE_URL, "random", True, False, True),
    _method("dare_linear", "Linear DARE", DARE_URL, "random", False, False, True),
    _method("breadcrumbs", "Model Breadcrumbs", BREADCRUMBS_URL, "magnitude_outliers", False, False, False),
    _method(
        "breadcrumbs_ties",
        "Model Breadcrumbs with TIES",
        BREADCRUMBS_URL,
        "magnitude_outliers",
        True,
        False,
        False,
    ),
]
