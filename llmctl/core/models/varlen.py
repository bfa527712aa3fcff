"""Variable-length ("padding-free") causal attention for Hugging Face models on SDPA.

A padding-free batch is one row holding several documents end to end, with ``position_ids`` restarting
at 0 for each (what ``llmctl finetune`` feeds the model). Every linear layer then works on real tokens
only. What is left is attention, where each document may see only itself. Transformers handles such a
row with SDPA by building a dense ``[tokens, tokens]`` block-diagonal mask, which costs (sum of
lengths)² per layer: for a batch of B equal documents that is B times the attention work of a padded
batch, and SDPA cannot use its fast causal path with a mask.

:data:`VARLEN_ATTENTION` is an attention implementation registered with transformers'
``AttentionInterface``. It needs no mask for such rows. It finds the documents from ``position_ids``,
using transformers' own rule (a new document starts wherever a position is not the previous one
plus 1). It then runs SDPA with ``is_causal=True`` on each document. So the work is the sum of the
squared lengths, the same as a padded batch without its padding. Any call it does not recognise (a
padding mask, a KV cache, decoding) goes to transformers' SDPA function unchanged. Its mask
function returns None only where the 2D padding mask is None. That is exactly the case the segment
split covers, so padded batches keep their masks.

It is enabled only on architectures whose attention receives ``position_ids`` and has no sliding
window (:func:`enable_varlen_attention` says whether it switched). The tests hold its logits and
gradients equal to the padded batch's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "llmctl_varlen_sdpa"

# model_type -> attention modules that forward ``position_ids`` to the attention function
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def document_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each document in one row of position ids: a document starts at 0 and wherever
    a position is not the previous one plus 1 (transformers' ``find_packed_sequence_indices`` rule)."""
    pos = position_ids.reshape(-1)
    n = pos.numel()
    if n == 0:
        return []
    breaks = (pos[1:] != pos[:-1] + 1).nonzero().flatten().add(1).tolist()
    edges = [0, *breaks, n]
    return list(zip(edges[:-1], edges[1:], strict=True))


def varlen_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: list[tuple[int, int]], scaling: float
) -> torch.Tensor:
    """The dense definition: one block-diagonal causal mask over the whole row (what transformers builds).
    ``query`` [batch, heads, tokens, d]; key/value may have fewer heads (GQA). Returns the same layout."""
    n = query.shape[2]
    doc = torch.empty(n, dtype=torch.long, device=query.device)
    for i, (start, end) in enumerate(spans):
        doc[start:end] = i
    idx = torch.arange(n, device=query.device)
    allowed = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=allowed, scale=scaling)


def _segmented_sdpa(query, key, value, spans, scaling, gqa: bool) -> torch.Tensor:
    outs = [
        F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling, enable_gqa=gqa
        )
        for s, e in spans
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def make_varlen_attention(fallback: Callable) -> Callable:
    """An HF attention function: per-document causal SDPA for unpadded rows, ``fallback`` otherwise. Every
    layer of one forward gets the same ``position_ids`` tensor, so its spans are found once, not per layer."""
    last: list = [None, None]  # (position_ids tensor, spans of each row)

    def spans_of(position_ids: torch.Tensor, rows: int) -> list[list[tuple[int, int]]]:
        if last[0] is not position_ids or len(last[1]) != rows:
            expanded = position_ids.expand(rows, -1)
            last[:] = [position_ids, [document_spans(expanded[b]) for b in range(rows)]]
        return last[1]

    def llmctl_varlen_sdpa(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
    ):
        position_ids = kwargs.get("position_ids")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        plain = (
            attention_mask is None
            and position_ids is not None
            and causal
            and not (dropout and module.training)
            and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions")
            and query.shape[2] == key.shape[2]  # no KV cache: the row attends to itself only
            and query.shape[2] > 1
            and position_ids.shape[-1] == query.shape[2]
        )
        if not plain:
            kwargs.update(dropout=dropout, scaling=scaling, is_causal=is_causal)
            return fallback(module, query, key, value, attention_mask, **kwargs)
        gqa = query.shape[1] != key.shape[1]
        spans = spans_of(position_ids, query.shape[0])
        out = torch.cat(
            [
                _segmented_sdpa(query[b : b + 1], key[b : b + 1], value[b : b + 1], spans[b], scaling, gqa)
                for b in range(query.shape[0])
            ],
            dim=0,
        )
        return out.transpose(1, 2).contiguous(), None  # HF wants [batch, tokens, heads, d]

    return llmctl_varlen_sdpa


def _register() -> bool:
    try:
        from transformers import masking_utils
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover - transformers without the attention interface
        return False
    masks = getattr(masking_utils, "ALL_MASK_ATTENTION_FUNCTIONS", None)
    if masks is None or "sdpa" not in ALL_ATTENTION_FUNCTIONS or "sdpa" not in masks:
        return False
    if VARLEN_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        sdpa_mask = masks["sdpa"]

        def varlen_mask(*args, **kwargs):
            # no 2D padding mask: the attention splits the row by position_ids itself
            if kwargs.get("attention_mask") is None:
                return None
            return sdpa_mask(*args, **kwargs)

        ALL_ATTENTION_FUNCTIONS.register(
            VARLEN_ATTENTION, make_varlen_attention(ALL_ATTENTION_FUNCTIONS["sdpa"])
        )
        masks.register(VARLEN_ATTENTION, varlen_mask)
    return True


def supports_varlen(config) -> bool:
    """Whether this architecture's attention can run :data:`VARLEN_ATTENTION` exactly."""
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return False
    layer_types = getattr(config, "layer_types", None) or []
    return all(t == "full_attention" for t in layer_types)


def enable_varlen_attention(model) -> bool:
    """Switch an SDPA model (or a PEFT model around one) to :data:`VARLEN_ATTENTION`; True if it runs it now.
    Models on another implementation (eager, flash, llmctl's kernels) or architectures it does not cover are
    left alone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config._attn_implementation == VARLEN_ATTENTION:
        return True
    if config._attn_implementation != "sdpa" or not supports_varlen(config) or not _register():
        return False
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(VARLEN_ATTENTION)
    else:  # pragma: no cover - older transformers
        config._attn_implementation = VARLEN_ATTENTION
    return config._attn_implementation == VARLEN_ATTENTION
