"""Depth pruning: score decoder layers, then remove whole layers into a physically shallower model.

Scores (one forward pass of the calibration set, hooks on every decoder layer):

* ``block-influence`` — ShortGPT (Men et al., 2024, https://arxiv.org/abs/2403.03853):
  ``BI_i = 1 - E_t[cos(h_in[t], h_out[t])]`` over every calibration token; the K lowest-influence layers
  are dropped (they need not be adjacent).
* ``angular`` — Gromov et al., 2024 (https://arxiv.org/abs/2403.17887):
  ``d(l, n) = arccos(cos(h_l[T], h_{l+n}[T])) / π`` between the input of layer ``l`` and the input of
  layer ``l + n`` (the output of the last layer for ``l + n = L``) at the last token ``T`` of each
  sequence, averaged over sequences; the block of ``n = K`` adjacent layers starting at the minimising
  ``l`` is dropped.
* ``ppl`` — the calibration loss (mean next-token NLL) with each layer removed alone; the K layers whose
  removal raises it least are dropped (one shot).

:func:`progressive_drop` is the greedy, iterative variant in the style of TrimLLM (progressive layer
dropping for a target domain): remove the layer whose removal hurts the in-domain loss least, re-score,
repeat; with ``recover`` (TrimLLM's recovery fine-tuning) a short training run on the in-domain windows
follows each removal, so the next choice is made on the recovered model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.core.errors import UsageError
from llmctl.core.quantize.calib import decoder_layers

SCORES = ("block-influence", "angular", "ppl")


# --- removing layers ------------------------------------------------------------------------------------


def _set_layers(model, layers: nn.ModuleList) -> None:
    current = decoder_layers(model)
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is current:
                setattr(module, child_name, layers)
                return
    raise AssertionError("decoder layer list not found")  # pragma: no cover


def _layer_config(config, keep: Sequence[int]) -> dict[str, Any]:
    """The config attributes that change when only the layers ``keep`` (original indices) remain."""
    out: dict[str, Any] = {"num_hidden_layers": len(keep)}
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list | tuple) and len(layer_types) == config.num_hidden_layers:
        out["layer_types"] = [layer_types[i] for i in keep]
    return out


@contextmanager
def without_layers(model, drop: Sequence[int]) -> Iterator[None]:
    """Run ``model`` as if the layers ``drop`` were not there; everything is restored afterwards."""
    layers = decoder_layers(model)
    drop_set = set(drop)
    keep = [i for i in range(len(layers)) if i not in drop_set]
    saved = {k: getattr(model.config, k) for k in _layer_config(model.config, keep)}
    _set_layers(model, nn.ModuleList([layers[i] for i in keep]))
    for k, v in _layer_config(model.config, keep).items():
        setattr(model.config, k, v)
    try:
        yield
    finally:
        _set_layers(model, layers)
        for k, v in saved.items():
            setattr(model.config, k, v)


def remove_layers(model, drop: Sequence[int]) -> list[int]:
    """Delete the layers ``drop`` for good: the layer list, ``num_hidden_layers``, ``layer_types`` and each
    attention module's ``layer_idx`` (KV-cache slot) are renumbered. Returns the kept original indices."""
    layers = decoder_layers(model)
    n = len(layers)
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise UsageError(f"layer index {bad[0]} out of range: the model has {n} layers")
    drop_set = set(drop)
    keep = [i for i in range(n) if i not in drop_set]
    if not keep:
        raise UsageError(f"cannot drop all {n} layers; keep at least one")
    for k, v in _layer_config(model.config, keep).items():
        setattr(model.config, k, v)
    _set_layers(model, nn.ModuleList([layers[i] for i in keep]))
    for new_index, layer in enumerate(decoder_layers(model)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return keep


def drop_count(num_layers: int, drop: int | None, keep_ratio: float | None) -> int:
    """K from ``--drop K`` or ``--keep-ratio R`` (``round(L * R)`` layers kept), checked."""
    if (drop is None) == (keep_ratio is None):
        raise UsageError("give exactly one of --drop K or --keep-ratio R")
    if keep_ratio is not None:
        if not 0 < keep_ratio <= 1:
            raise UsageError(f"--keep-ratio {keep_ratio}: must be in (0, 1]")
        drop = num_layers - max(1, round(num_layers * keep_ratio))
    assert drop is not None
    if drop < 0:
        raise UsageError(f"--drop {drop}: must be 0 or more")
    if drop >= num_layers:
        raise UsageError(f"--drop {drop} would remove every layer of this {num_layers}-layer model")
    return drop


# --- scores ---------------------------------------------------------------------------------------------


@torch.no_grad()
def layer_states(
    model, ids: torch.Tensor, batch_size: int, fn: Callable[[int, torch.Tensor, torch.Tensor], None]
):
    """Run the calibration set once; ``fn(i, h_in, h_out)`` is called with each decoder layer's input
    and output hidden states ``[batch, seq, hidden]``."""
    layers = decoder_layers(model)
    handles = []
    inputs: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):

        def pre(module, args, kwargs, i=i):
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        def post(module, args, kwargs, out, i=i):
            fn(i, inputs.pop(i), out[0] if isinstance(out, tuple) else out)

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        device = next(model.parameters()).device
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def block_influence(model, ids: torch.Tensor, batch_size: int = 8) -> list[float]:
    """ShortGPT's BI per layer (higher = more important)."""
    n = len(decoder_layers(model))
    sums = [0.0] * n
    counts = [0] * n

    def fn(i, h_in, h_out):
        cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # [batch, seq]
        sums[i] += float(cos.sum())
        counts[i] += cos.numel()

    layer_states(model, ids, batch_size, fn)
    return [1 - s / c for s, c in zip(sums, counts, strict=True)]


def angular_distances(model, ids: torch.Tensor, block: int, batch_size: int = 8) -> list[float]:
    """Gromov et al.'s ``d(l, block)`` for ``l = 0 .. L - block`` (lower = more redundant block)."""
    n = len(decoder_layers(model))
    last: dict[int, list[torch.Tensor]] = {i: [] for i in range(n + 1)}  # input of layer i at the last token

    def fn(i, h_in, h_out):
        last[i].append(h_in[:, -1].float())
        if i == n - 1:
            last[n].append(h_out[:, -1].float())

    layer_states(model, ids, batch_size, fn)
    states = [torch.cat(last[i]) for i in range(n + 1)]  # each [samples, hidden]
    out = []
    for start in range(n - block + 1):
        cos = F.cosine_similarity(states[start], states[start + block], dim=-1).clamp(-1, 1)
        out.append(float((torch.arccos(cos) / math.pi).mean()))
    return out


@torch.no_grad()
def mean_loss(model, ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats per token) over ``ids [samples, seq_len]``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        total += float(
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        )
        count += target.numel()
    return total / count


def removal_losses(
    model,
    ids: torch.Tensor,
    candidates: Sequence[int],
    *,
    removed: Sequence[int] = (),
    batch_size: int = 8,
    progress: Callable[[], None] | None = None,
) -> dict[int, float]:
    """Loss with each candidate layer removed (on top of the already ``removed`` ones)."""
    out = {}
    for i in candidates:
        with without_layers(model, [*removed, i]):
            out[i] = mean_loss(model, ids, batch_size)
        if progress:
            progress()
    return out


@dataclass
class DepthPlan:
    """Which layers to drop, and why."""

    drop: list[int]
    scores: list[float | None]  # per original layer (None where a score does not apply)
    score: str
    details: dict[str, Any] = field(default_factory=dict)


def plan_one_shot(
    model,
    ids: torch.Tensor,
    score: str,
    k: int,
    *,
    batch_size: int = 8,
    progress: Callable[[], None] | None = None,
) -> DepthPlan:
    """The K layers to drop by ``score`` (one of :data:`SCORES`)."""
    n = len(decoder_layers(model))
    if score == "block-influence":
        scores = block_influence(model, ids, batch_size)
        drop = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:k])
        return DepthPlan(drop, list(scores), score)
    if score == "angular":
        if k == 0:
            return DepthPlan([], [None] * n, score)
        dists = angular_distances(model, ids, k, batch_size)
        start = min(range(len(dists)), key=lambda s: (dists[s], s))
        per_layer: list[float | None] = list(dists) + [None] * (n - len(dists))
        return DepthPlan(list(range(start, start + k)), per_layer, score, {"block": k, "start": start})
    if score == "ppl":
        base = mean_loss(model, ids, batch_size)
        losses = removal_losses(model, ids, range(n), batch_size=batch_size, progress=progress)
        scores = [losses[i] - base for i in range(n)]
        drop = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:k])
        return DepthPlan(drop, scores, score, {"calibration_loss": base})
    raise UsageError(f"unknown --score {score!r}; choose one of {', '.join(SCORES)}")


def progressive_drop(
    model,
    ids: torch.Tensor,
    *,
    max_drop: int,
    max_loss_increase: float | None = None,
    batch_size: int = 8,
    progress: Callable[[], None] | None = None,
    recover: Callable[[Any, torch.Tensor], dict[str, Any]] | None = None,
) -> DepthPlan:
    """Greedy: repeatedly find the layer whose removal (given the ones already removed) gives the lowest
    in-domain loss, and remove it; stop after ``max_drop`` layers, or before a removal that would raise
    the loss more than ``max_loss_increase`` nats/token above the unpruned model's. ``recover(model, ids)``
    (if given) trains the model without the removed layers after each removal, in place (the weights of
    the kept layers change; the loss after recovery is in the history)."""
    n = len(decoder_layers(model))
    base = mean_loss(model, ids, batch_size)
    removed: list[int] = []
    history = []
    scores: list[float | None] = [None] * n
    while len(removed) < max_drop:
        candidates = [i for i in range(n) if i not in removed]
        losses = removal_losses(
            model, ids, candidates, removed=removed, batch_size=batch_size, progress=progress
        )
        best = min(candidates, key=lambda i: (losses[i], i))
        if max_loss_increase is not None and losses[best] - base > max_loss_increase:
            break
        removed.append(best)
        scores[best] = losses[best] - base
        row = {"removed": best, "loss": losses[best], "loss_increase": losses[best] - base}
        if recover is not None:
            with without_layers(model, removed):
                stats = recover(model, ids)
                row["recovered_loss"] = mean_loss(model, ids, batch_size)
            row["recovery_steps"] = stats["steps"]
        history.append(row)
    details: dict[str, Any] = {"domain_loss": base, "history": history}
    if recover is not None and history:
        details["final_domain_loss"] = history[-1]["recovered_loss"]
    return DepthPlan(sorted(removed), scores, "domain-loss", details)
