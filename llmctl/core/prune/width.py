"""Width pruning: remove whole MLP channels or whole attention head groups, into a physically smaller model.

Importance is activation-based (the structured form of Wanda's score): a unit's score is how much it can
contribute to the layer's output on the calibration set,

* MLP channel ``j`` (a row of ``gate_proj``/``up_proj``, a column of ``down_proj``):
  ``||X_j||_2 · ||W_down[:, j]||_2`` with ``X`` the input of ``down_proj``;
* attention head group ``g`` (one key/value head and the ``num_attention_heads / num_key_value_heads``
  query heads that share it, so GQA stays intact): the sum of ``||X_c||_2 · ||W_o[:, c]||_2`` over the
  ``o_proj`` input columns ``c`` of its query heads.

Hugging Face configs hold one ``intermediate_size`` and one head count for every layer, so every layer
keeps the same number of units (``round(units * keep_ratio)``, at least one): uniform widths, chosen per
layer. A head-pruned config gets an explicit ``head_dim``. Llama-style layers only (``mlp.gate_proj``,
``up_proj``, ``down_proj``; ``self_attn.q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), biases included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llmctl.core.errors import UsageError
from llmctl.core.prune.wanda import InputNorms
from llmctl.core.quantize.calib import decoder_layers, hooks

TARGETS = ("channels", "heads")
MLP = ("gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_architecture(model, what: str) -> None:
    parent, names = ("mlp", MLP) if what == "channels" else ("self_attn", ATTN)
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, parent, None)
        if block is None or not all(isinstance(getattr(block, n, None), nn.Linear) for n in names):
            raise UsageError(
                f"unsupported architecture for --method {what}: layer {i} has no {parent} with "
                f"{', '.join(names)} linears"
            )


@torch.no_grad()
def _input_norms(model, ids: torch.Tensor, batch_size: int, name: str) -> list[torch.Tensor]:
    """``||X_j||_2`` of the input of ``name`` (``down_proj`` or ``o_proj``) in every layer."""
    parent = "mlp" if name == "down_proj" else "self_attn"
    mods = {str(i): getattr(getattr(layer, parent), name) for i, layer in enumerate(decoder_layers(model))}
    stats = {k: InputNorms(m.in_features) for k, m in mods.items()}
    device = next(model.parameters()).device
    with hooks(mods, lambda k, x: stats[k].add(x)):
        for start in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
    return [stats[str(i)].norms for i in range(len(mods))]


def channel_scores(model, ids: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Per layer, ``[intermediate]`` scores of the MLP channels."""
    norms = _input_norms(model, ids, batch_size, "down_proj")
    layers = decoder_layers(model)
    return [
        n * layer.mlp.down_proj.weight.float().norm(dim=0) for n, layer in zip(norms, layers, strict=True)
    ]


def _heads(model) -> tuple[int, int, int]:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


def head_group_scores(model, ids: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Per layer, ``[num_key_value_heads]`` scores of the head groups."""
    heads, kv, head_dim = _heads(model)
    norms = _input_norms(model, ids, batch_size, "o_proj")
    out = []
    for n, layer in zip(norms, decoder_layers(model), strict=True):
        col = n * layer.self_attn.o_proj.weight.float().norm(dim=0)  # [heads * head_dim]
        out.append(col.reshape(kv, heads // kv * head_dim).sum(1))
    return out


def _sliced(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    W = lin.weight.data
    b = lin.bias.data if lin.bias is not None else None
    if rows is not None:
        W = W[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        W = W[:, cols]
    new = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
    new.weight.data.copy_(W)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def keep_channels(layer: nn.Module, keep: torch.Tensor) -> None:
    mlp = layer.mlp
    mlp.gate_proj = _sliced(mlp.gate_proj, rows=keep)
    mlp.up_proj = _sliced(mlp.up_proj, rows=keep)
    mlp.down_proj = _sliced(mlp.down_proj, cols=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def keep_head_groups(layer: nn.Module, groups: torch.Tensor, heads: int, kv: int, head_dim: int) -> None:
    attn = layer.self_attn
    per = heads // kv
    q = torch.cat([torch.arange(g * per * head_dim, (g + 1) * per * head_dim) for g in groups.tolist()])
    k = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in groups.tolist()])
    attn.q_proj = _sliced(attn.q_proj, rows=q)
    attn.k_proj = _sliced(attn.k_proj, rows=k)
    attn.v_proj = _sliced(attn.v_proj, rows=k)
    attn.o_proj = _sliced(attn.o_proj, cols=q)
    for name, value in (("num_heads", len(groups) * per), ("num_key_value_heads", len(groups))):
        if hasattr(attn, name):
            setattr(attn, name, value)


def kept_count(units: int, keep_ratio: float, what: str) -> int:
    if not 0 < keep_ratio <= 1:
        raise UsageError(f"--keep-ratio {keep_ratio}: must be in (0, 1]")
    return max(1, min(units, round(units * keep_ratio)))


@torch.no_grad()
def prune_width(
    model,
    ids: torch.Tensor,
    what: str,
    keep_ratio: float,
    *,
    batch_size: int = 8,
    progress: Callable[[], None] | None = None,
) -> dict:
    """Remove the lowest-scoring channels or head groups of every layer in place; the report."""  # fmt: skip
    check_architecture(model, what)
    layers = decoder_layers(model)
    cfg = model.config
    if what == "channels":
        scores = channel_scores(model, ids, batch_size)
        units = cfg.intermediate_size
    else:
        heads, kv, head_dim = _heads(model)
        scores = head_group_scores(model, ids, batch_size)
        units = kv
    n_keep = kept_count(units, keep_ratio, what)
    rows = []
    for i, (layer, s) in enumerate(zip(layers, scores, strict=True)):
        keep = torch.sort(torch.argsort(s, descending=True, stable=True)[:n_keep]).values
        if what == "channels":
            keep_channels(layer, keep)
        else:
            keep_head_groups(layer, keep, heads, kv, head_dim)
        row = {
            "index": i,
            "kept": keep.tolist(),
            "kept_score_share": float(s[keep].sum() / s.sum().clamp_min(1e-30)),
        }
        if what == "heads":  # a handful per layer; channel scores would bloat the report
            row["scores"] = [float(x) for x in s]
        rows.append(row)
        if progress:
            progress()
    if what == "channels":
        cfg.intermediate_size = n_keep
        sizes = {"intermediate_size": [units, n_keep]}
    else:
        cfg.head_dim = head_dim
        cfg.num_attention_heads = n_keep * (heads // kv)
        cfg.num_key_value_heads = n_keep
        sizes = {"num_attention_heads": [heads, cfg.num_attention_heads], "num_key_value_heads": [kv, n_keep]}
    return {"unit": "channel" if what == "channels" else "head group", "sizes": sizes, "layers": rows}
