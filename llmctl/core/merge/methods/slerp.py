"""SLERP: spherical linear interpolation between two models, tensor by tensor.
https://en.wikipedia.org/wiki/Slerp (for merges: Shoemake 1985, popularised by mergekit)

Each tensor is flattened; with ``theta = acos(<a/|a|, b/|b|>)``

    merged = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b

and plain ``(1 - t) a + t b`` when the two are nearly colinear (|cos theta| > 0.9995), where the formula
is ill-conditioned. ``t = 0`` gives the base model, ``t = 1`` the other; ``t`` may be a per-layer gradient.
"""

from __future__ import annotations

import math

import torch

from llmctl.core.merge.methods.base import Inputs, MergeMethod, Param, Scope, work_dtype

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dtype = work_dtype(a)
    x = a.reshape(-1).to(dtype)
    y = b.reshape(-1).to(dtype)
    if x.numel() == 0:
        return ((1 - t) * x + t * y).reshape(a.shape)
    norm_x = torch.linalg.vector_norm(x)
    norm_y = torch.linalg.vector_norm(y)
    norm_x = norm_x if norm_x > EPS else torch.ones_like(norm_x)
    norm_y = norm_y if norm_y > EPS else torch.ones_like(norm_y)
    dot = float(((x / norm_x) * (y / norm_y)).sum().clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        return ((1 - t) * x + t * y).reshape(a.shape)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    coef_x = math.sin((1 - t) * theta) / sin_theta
    coef_y = math.sin(t * theta) / sin_theta
    return (coef_x * x + coef_y * y).reshape(a.shape)


class Slerp(MergeMethod):
    def merge(self, inputs: Inputs) -> torch.Tensor:
        other = inputs.non_base[0]
        return slerp(float(inputs.shared["t"]), inputs.tensors[inputs.base], inputs.tensors[other])


SLERP = Slerp(
    name="slerp",
    pretty_name="SLERP",
    reference_url="https://en.wikipedia.org/wiki/Slerp",
    params=(Param("t", float, Scope.SHARED, help="0 = base model, 1 = the other model"),),
    base="required",
    min_models=2,
    max_models=2,
)
