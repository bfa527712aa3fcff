"""Unstructured and N:M pruning of every linear layer inside the decoder layers, layer by layer.

Calibrated methods walk the decoder with :func:`llmctl.core.quantize.calib.run_layerwise`: a layer's
statistics are collected on the outputs of the already-pruned layers before it (one pass over the
calibration set per layer, all of its linears at once, as the Wanda and SparseGPT references do), its
linears are pruned in place, and its pruned outputs feed the next layer. The embeddings and ``lm_head``
are left dense.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmctl.core.errors import UsageError
from llmctl.core.prune.magnitude import magnitude_prune
from llmctl.core.prune.masks import Pattern, sparsity_of
from llmctl.core.prune.sparsegpt import sparsegpt_prune
from llmctl.core.prune.wanda import InputNorms, wanda_prune
from llmctl.core.quantize.calib import LayerInputs, decoder_layers, linears_of, run_layerwise
from llmctl.core.quantize.gptq import HessianAccumulator


@dataclass(frozen=True)
class UnstructuredMethod:
    name: str
    url: str
    prune: Callable[..., torch.Tensor]  # (weight, stats, *, sparsity, pattern, damp, warn, name) -> weight
    stats: Callable[[int], Any] | None  # in_features -> accumulator with .add(x); None: no calibration


WANDA = "https://arxiv.org/abs/2306.11695"
UNSTRUCTURED = {
    "magnitude": UnstructuredMethod("magnitude", f"{WANDA} (baseline)", magnitude_prune, None),
    "wanda": UnstructuredMethod("wanda", WANDA, wanda_prune, InputNorms),
    "sparsegpt": UnstructuredMethod(
        "sparsegpt", "https://arxiv.org/abs/2301.00774", sparsegpt_prune, HessianAccumulator
    ),
}


def prunable(model, skip: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The decoder layers' linears by full module name."""
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    return {
        f"{prefix}.{i}.{name}": lin
        for i, layer in enumerate(layers)
        for name, lin in linears_of(layer, skip).items()
    }


def check_pattern(targets: dict[str, nn.Linear], pattern: Pattern | None) -> None:
    if pattern is None:
        return
    for name, lin in targets.items():
        if lin.in_features % pattern.m:
            raise UsageError(
                f"--pattern {pattern}: M={pattern.m} does not divide the input dimension "
                f"{lin.in_features} of {name}"
            )


@torch.no_grad()
def prune_unstructured(
    model,
    method: str,
    *,
    sparsity: float | None,
    pattern: Pattern | None,
    ids: torch.Tensor | None = None,
    batch_size: int = 8,
    damp: float = 0.01,
    skip: tuple[str, ...] = (),
    warn: Callable[[str], None] | None = None,
    progress: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Prune ``model`` in place; one row per linear: name, shape and the sparsity it now has."""
    m = UNSTRUCTURED[method]
    targets = prunable(model, skip)
    check_pattern(targets, pattern)
    layers = decoder_layers(model)
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    report: list[dict[str, Any]] = []

    def prune_layer(index: int, layer: nn.Module, stats: dict[str, Any]) -> None:
        for name, lin in linears_of(layer, skip).items():
            full = f"{prefix}.{index}.{name}"
            new = m.prune(
                lin.weight,
                stats.get(name),
                sparsity=sparsity,
                pattern=pattern,
                damp=damp,
                warn=warn,
                name=full,
            )
            lin.weight.data.copy_(new.to(lin.weight.dtype))
            report.append(
                {"name": full, "shape": list(lin.weight.shape), "sparsity": sparsity_of(lin.weight)}
            )

    if m.stats is None:
        for index, layer in enumerate(layers):
            prune_layer(index, layer, {})
            if progress:
                progress()
        return report
    if ids is None:
        raise UsageError(f"--method {method} needs calibration token ids")

    def on_layer(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        lins = linears_of(layer, skip)
        stats = {name: m.stats(lin.in_features) for name, lin in lins.items()}
        inputs.collect(layer, lins, lambda name, x: stats[name].add(x))
        prune_layer(index, layer, stats)
        if progress:
            progress()

    run_layerwise(model, ids, on_layer, batch_size=batch_size)
    return report
