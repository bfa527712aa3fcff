"""AWQ: activation-aware weight quantization (Lin et al., 2023, https://arxiv.org/abs/2306.00978),
following AutoAWQ's search for Llama-like decoder layers.

For each group of linears sharing an input (``q/k/v`` after ``input_layernorm``, ``gate/up`` after
``post_attention_layernorm``, ``down`` after ``up``, ``o`` after ``v`` when their shapes match):

* per input channel, the mean ``|x|`` of the calibration activations and the mean group-normalised
  ``|w|`` of the group's weights;
* for ``alpha`` in ``0, 1/20, ..., 19/20``: scales ``s = x_mean**alpha / w_mean**(1-alpha)`` ("duo
  scaling"), normalised by ``sqrt(max s * min s)``; the group's weights become ``Q(W * s) / s`` and the
  block the group feeds (attention, MLP, or ``down`` itself) is run; the ``alpha`` with the least output
  MSE wins;
* the scales are folded in: the preceding op's output channels divided by ``s`` (norm weight, or the
  previous linear's rows and bias), the linears' input columns multiplied by ``s`` - the fp model's
  output is unchanged;
* clipping: for every linear but ``q``/``k``, each group's range is shrunk to ``(1 - i/20)`` of its
  max for ``i < 10`` and the shrink with the least output error on 512 sampled tokens is kept;
* finally group-wise asymmetric quantization on AutoAWQ's min/max grid.
"""

from __future__ import annotations

import torch
from torch import nn

from llmctl.core.errors import ModelError
from llmctl.core.quantize.calib import LayerInputs
from llmctl.core.quantize.formats import QuantizedWeight, natural_g_idx
from llmctl.core.quantize.rtn import check_group_size

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_TOKENS = 512


def awq_grid(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAWQ's asymmetric grid of ``w [N, K]`` per group: ``(scales, zeros)``, each ``[N, G]``.
    Unlike GPTQ's grid the range need not contain 0."""
    n, k = w.shape
    size = k if group_size == -1 else group_size
    g = w.reshape(n, k // size, size)
    maxq = 2**bits - 1
    wmax, wmin = g.amax(dim=2), g.amin(dim=2)
    scales = (wmax - wmin).clamp(min=1e-5) / maxq
    zeros = (-torch.round(wmin / scales)).clamp(0, maxq)
    return scales, zeros


def awq_fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    n, k = w.shape
    size = k if group_size == -1 else group_size
    scales, zeros = awq_grid(w, bits, group_size)
    g = w.reshape(n, k // size, size)
    q = torch.clamp(torch.round(g / scales[..., None]) + zeros[..., None], 0, 2**bits - 1)
    return ((q - zeros[..., None]) * scales[..., None]).reshape(n, k)


def awq_quantize(weight: torch.Tensor, *, bits: int, group_size: int) -> QuantizedWeight:
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    check_group_size(k, group_size)
    size = k if group_size == -1 else group_size
    scales, zeros = awq_grid(w, bits, group_size)
    q = torch.clamp(
        torch.round(w.reshape(n, k // size, size) / scales[..., None]) + zeros[..., None], 0, 2**bits - 1
    ).reshape(n, k)
    return QuantizedWeight(
        qweight=q.to(torch.uint8), scales=scales, zeros=zeros.to(torch.int32),
        g_idx=natural_g_idx(k, group_size), bits=bits, group_size=group_size, sym=False,
    )  # fmt: skip


def _fold(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide ``prev``'s outputs by ``s`` and multiply the linears' inputs by ``s``: the composition
    (and so the fp model) is unchanged."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None].to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # an RMSNorm/LayerNorm with a per-channel weight
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))


def _w_mean(linears: list[nn.Linear], group_size: int) -> torch.Tensor:
    w = torch.cat([lin.weight.detach().float() for lin in linears], dim=0)  # [sum N, K]
    k = w.shape[1]
    size = k if group_size == -1 else group_size
    g = w.reshape(-1, size).abs()
    g = g / (g.amax(dim=1, keepdim=True) + 1e-6)
    return g.reshape(w.shape).mean(dim=0)  # [K]


def gram(x: list[torch.Tensor]) -> torch.Tensor:
    """``sum x^T x`` over every token of the batches ``x``: ``[K, K]``."""
    flat = [b.reshape(-1, b.shape[-1]).float() for b in x]
    return sum(f.T @ f for f in flat)


@torch.no_grad()
def search_scales(
    linears: list[nn.Linear],
    x: list[torch.Tensor],
    inspect,
    *,
    bits: int,
    group_size: int,
    linear_block: bool = False,
) -> torch.Tensor:
    """The best AWQ scales ``[K]`` for ``linears`` sharing the input batches ``x``; ``inspect(i)`` runs
    the block they feed on batch ``i`` with the current weights.

    ``linear_block``: the block is the single linear itself (``down``, ``o``), so its output error over
    the batches is ``sum ||(W' - W) x||^2 = tr(dW G dW^T)`` with ``G = sum x^T x``: the same number from
    a ``[N, K] x [K, K]`` product per grid point instead of a forward over every calibration token."""
    x_mean = torch.cat([b.reshape(-1, b.shape[-1]).abs().float() for b in x]).mean(dim=0)  # [K]
    w_mean = _w_mean(linears, group_size)
    originals = [lin.weight.detach().clone() for lin in linears]
    if linear_block:
        (only,) = linears
        g = gram(x)
        original = originals[0].float()

        def error() -> float:
            delta = only.weight.float() - original
            return float(((delta @ g) * delta).sum())
    else:
        reference = [inspect(i) for i in range(len(x))]

        def error() -> float:
            return sum(float((inspect(i) - ref).float().pow(2).sum()) for i, ref in enumerate(reference))

    best, best_err = torch.ones_like(x_mean), float("inf")
    try:
        for step in range(N_GRID):
            alpha = step / N_GRID
            s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            for lin, w in zip(linears, originals, strict=True):
                lin.weight.copy_(awq_fake_quantize(w.float() * s, bits, group_size) / s)
            err = error()
            if err < best_err:
                best_err, best = err, s.clone()
    finally:
        for lin, w in zip(linears, originals, strict=True):
            lin.weight.copy_(w)
    return best


@torch.no_grad()
def search_clip(lin: nn.Linear, x: torch.Tensor, *, bits: int, group_size: int) -> torch.Tensor:
    """Per (output row, group) max |w| after the best shrink: ``[N, G]``."""
    w = lin.weight.detach().float()
    n, k = w.shape
    size = k if group_size == -1 else group_size
    groups = k // size
    x = x.reshape(-1, k).float()
    if x.shape[0] > CLIP_TOKENS:  # evenly spaced tokens, deterministic
        x = x[torch.linspace(0, x.shape[0] - 1, CLIP_TOKENS).long()]
    xg = x.reshape(-1, groups, size).permute(1, 0, 2)  # [G, T, size]
    wg = w.reshape(n, groups, size).permute(1, 2, 0)  # [G, size, N]
    reference = torch.bmm(xg, wg)  # [G, T, N]: each group's contribution to the output
    org_max = w.reshape(n, groups, size).abs().amax(dim=2)  # [N, G]
    best_max = org_max.clone()
    best_err = torch.full_like(org_max, float("inf"))
    for i in range(int(MAX_SHRINK * N_GRID)):
        max_val = org_max * (1 - i / N_GRID)
        clipped = torch.maximum(
            torch.minimum(w.reshape(n, groups, size), max_val[..., None]), -max_val[..., None]
        )
        q = awq_fake_quantize(clipped.reshape(n, k), bits, group_size)
        out = torch.bmm(xg, q.reshape(n, groups, size).permute(1, 2, 0))
        err = (out - reference).pow(2).mean(dim=1).T  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


def _apply_clip(lin: nn.Linear, max_val: torch.Tensor, group_size: int) -> None:
    n, k = lin.weight.shape
    size = k if group_size == -1 else group_size
    w = lin.weight.data.reshape(n, k // size, size)
    m = max_val[..., None].to(w.dtype)
    lin.weight.data.copy_(torch.maximum(torch.minimum(w, m), -m).reshape(n, k))


def llama_groups(layer: nn.Module):
    """(prev op, linears, name of the module whose output is inspected) for a Llama-like layer."""
    try:
        attn, mlp = layer.self_attn, layer.mlp
        groups = [
            (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "attn"),
            (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], "mlp"),
            (mlp.up_proj, [mlp.down_proj], "down"),
        ]
        if attn.v_proj.weight.shape[0] == attn.o_proj.weight.shape[1]:
            groups.insert(1, (attn.v_proj, [attn.o_proj], "o"))
    except AttributeError as e:
        raise ModelError(
            f"AWQ supports Llama-like decoder layers (input_layernorm, self_attn.q/k/v/o_proj, "
            f"post_attention_layernorm, mlp.gate/up/down_proj); {type(layer).__name__} lacks {e.name}"
        ) from e
    return groups


@torch.no_grad()
def awq_layer(layer: nn.Module, inputs: LayerInputs, *, bits: int, group_size: int, clip: bool = True):
    """Search and fold AWQ scales and clip ranges into ``layer`` (in place, still floating point)."""
    groups = llama_groups(layer)
    attn, mlp = layer.self_attn, layer.mlp
    taps = {"attn": attn.q_proj, "o": attn.o_proj, "mlp": mlp.gate_proj, "down": mlp.down_proj}
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in taps}
    inputs.collect(layer, taps, lambda name, x: feats[name].append(x.detach()))

    def attn_kwargs(i):
        kw = inputs.kwargs[i]
        return {k: kw[k] for k in ("attention_mask", "position_embeddings", "position_ids") if k in kw}

    def inspector(name):
        if name == "attn":
            return lambda i: attn(hidden_states=feats["attn"][i], **attn_kwargs(i))[0]
        if name == "mlp":
            return lambda i: mlp(feats["mlp"][i])
        module = attn.o_proj if name == "o" else mlp.down_proj
        return lambda i: module(feats[name][i])

    found = []
    for _prev, linears, name in groups:  # every search sees the fp weights and inputs, as in AutoAWQ
        lone = name in ("o", "down")
        s = search_scales(
            linears, feats[name], inspector(name), bits=bits, group_size=group_size, linear_block=lone
        )
        found.append(s)
    for (prev, linears, name), s in zip(groups, found, strict=True):
        _fold(prev, linears, s)
        feats[name] = [x / s.to(x.dtype) for x in feats[name]]
    if clip:
        for lin, name in ((attn.v_proj, "attn"), (attn.o_proj, "o"), (mlp.gate_proj, "mlp"),
                          (mlp.up_proj, "mlp"), (mlp.down_proj, "down")):  # fmt: skip
            x = torch.cat([b.reshape(-1, b.shape[-1]) for b in feats[name]])
            _apply_clip(lin, search_clip(lin, x, bits=bits, group_size=group_size), group_size)
