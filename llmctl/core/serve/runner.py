"""One forward step of a :class:`~llmctl.core.generate.model.DecoderLM` over a paged KV cache.

The step's tokens - whole or partial prompts (chunked prefill) and single decode tokens of any number of
sequences - are flattened into one ``[tokens, hidden]`` batch, so the projections and the MLP run as one
matrix multiply each, with no padding. Attention is per sequence kind:

- a sequence with one new token (a decode) goes through ``llmctl.kernels.paged_attention.paged_decode``
  over its block table (the Triton kernel on CUDA, the torch reference elsewhere), all such sequences in
  one call;
- a prefill chunk gathers its context's keys/values from its blocks and runs causal scaled-dot-product
  attention, the chunk's queries at positions ``num_computed ..`` attending to every earlier position.

The weights are the generate engine's modules, used as they are (same names, same RoPE, same RMSNorm),
so greedy tokens match ``llmctl generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmctl.core.generate.model import DecoderLM, rotate_half


class PagedKVCache:
    """Keys and values for every layer: ``[num_blocks, block_size, kv_heads, head_dim]`` each."""

    def __init__(self, model: DecoderLM, num_blocks: int, block_size: int, device, dtype) -> None:
        a = model.args
        shape = (num_blocks, block_size, a.n_kv_heads, a.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(a.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(a.n_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(model: DecoderLM, block_size: int, dtype: torch.dtype) -> int:
        a = model.args
        return 2 * a.n_layers * block_size * a.n_kv_heads * a.head_dim * torch.finfo(dtype).bits // 8


# On these devices, sequences with at most MAX_BATCHED_QUERY new tokens (drafts being verified, short
# prompt chunks) share one batched attention call (``_ShortRows``); the rest get one call each
# (``_prefill_attention``, the reference). Not on CPUs: there the padded gather costs more than the calls
# it saves (measured: 32 sequences x 5 queries over ~300 cached tokens, 30 layers: 0.8 s looped, 1.4 s
# batched), while a GPU pays a kernel launch per call.
BATCHED_SHORT_ROWS_ON = {"cuda"}
MAX_BATCHED_QUERY = 16


@dataclass
class StepInput:
    """What the model computes in one step: for each sequence its new tokens and its block table."""

    token_ids: list[list[int]]  # new tokens per sequence
    starts: list[int]  # position of each sequence's first new token (= tokens already cached)
    tables: list[list[int]]  # block tables (already long enough for the new tokens)
    want_logits: list[bool]  # whether the sequence samples after this step
    # Logits of how many of the sequence's last new tokens (default: 1 when want_logits): a draft's
    # tokens being verified, or a prompt whose every position is scored (echo with logprobs).
    num_logits: list[int] | None = None


@torch.inference_mode()
def forward_step(model: DecoderLM, cache: PagedKVCache, step: StepInput, head=None) -> torch.Tensor:
    """Run the step; returns float32 logits ``[sum(num_logits), vocab]`` in sequence order (the last
    ``num_logits[i]`` positions of sequence i; ``num_logits`` defaults to ``want_logits``), from ``head``
    (final-norm hidden states -> logits) instead of ``lm_head`` if given."""
    from llmctl.kernels.paged_attention import paged_decode

    device = cache.k[0].device
    bs = cache.block_size
    a = model.args
    lengths = [len(t) for t in step.token_ids]
    flat = torch.tensor([t for ts in step.token_ids for t in ts], device=device)  # [T]
    positions, slots = [], []
    for toks, start, table in zip(step.token_ids, step.starts, step.tables, strict=True):
        for p in range(start, start + len(toks)):
            positions.append(p)
            slots.append(table[p // bs] * bs + p % bs)
    pos = torch.tensor(positions, device=device)
    slot_t = torch.tensor(slots, device=device)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)

    decode_rows = [i for i, n in enumerate(lengths) if n == 1]
    batch_short = torch.device(device).type in BATCHED_SHORT_ROWS_ON
    short_rows = [i for i, n in enumerate(lengths) if 1 < n <= MAX_BATCHED_QUERY and batch_short]
    prefill_rows = [i for i, n in enumerate(lengths) if n > 1 and i not in short_rows]
    if short_rows:
        short = _ShortRows(step, short_rows, offsets, bs, device)
    if decode_rows:
        width = max(len(step.tables[i]) for i in decode_rows)
        tables = torch.zeros((len(decode_rows), width), dtype=torch.int32)
        for r, i in enumerate(decode_rows):
            tables[r, : len(step.tables[i])] = torch.tensor(step.tables[i], dtype=torch.int32)
        tables = tables.to(device)
        ctx = torch.tensor([step.starts[i] + 1 for i in decode_rows], dtype=torch.int32, device=device)
        decode_idx = torch.tensor([offsets[i] for i in decode_rows], device=device)

    x = model.model.embed_tokens(flat)  # [T, hidden]
    cos, sin = model.rope(pos[None], x.dtype)
    cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, head_dim]
    scale = a.head_dim**-0.5
    for layer, k_cache, v_cache in zip(model.model.layers, cache.k, cache.v, strict=True):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = attn.project_qkv(h)
        q = q.view(-1, a.n_heads, a.head_dim)  # [T, H, D]
        k = k.view(-1, a.n_kv_heads, a.head_dim)  # [T, KV, D]
        v = v.view(-1, a.n_kv_heads, a.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache.view(-1, a.n_kv_heads, a.head_dim)[slot_t] = k
        v_cache.view(-1, a.n_kv_heads, a.head_dim)[slot_t] = v
        out = torch.empty_like(q)
        if decode_rows:
            out[decode_idx] = paged_decode(q[decode_idx], k_cache, v_cache, tables, ctx, softmax_scale=scale)
        if short_rows:
            out[short.flat] = short.attention(q, k_cache, v_cache, scale)
        for i in prefill_rows:
            out[offsets[i] : offsets[i + 1]] = _prefill_attention(
                q[offsets[i] : offsets[i + 1]], k_cache, v_cache, step.tables[i], step.starts[i], scale
            )
        x = x + attn.o_proj(out.reshape(-1, a.n_heads * a.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    counts = step.num_logits if step.num_logits is not None else [int(w) for w in step.want_logits]
    last = [p for i, k in enumerate(counts) for p in range(offsets[i + 1] - k, offsets[i + 1])]
    if not last:
        return torch.empty((0, a.vocab_size))
    x = x[torch.tensor(last, device=device)]
    return (head or model.lm_head)(model.model.norm(x)).float()


def _prefill_attention(q, k_cache, v_cache, table, start, scale):
    """Causal attention of a chunk's queries ``[n, H, D]`` (positions start..start+n-1) over the
    sequence's cached keys/values (positions 0..start+n-1), gathered from its blocks."""
    n = q.shape[0]
    total = start + n
    blocks = torch.tensor(table[: -(-total // k_cache.shape[1])], device=q.device)
    keys = k_cache[blocks].flatten(0, 1)[:total]  # [total, KV, D]
    values = v_cache[blocks].flatten(0, 1)[:total]
    mask = torch.arange(total, device=q.device)[None] <= torch.arange(start, total, device=q.device)[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # [1, H, n, D]
        keys.transpose(0, 1)[None],  # [1, KV, total, D]
        values.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != keys.shape[1],
    )
    return out[0].transpose(0, 1)  # [n, H, D]


class _ShortRows:
    """Causal attention for several short runs of new tokens at once: each sequence's context is gathered
    from its blocks into a padded ``[rows, context, kv_heads, head_dim]`` batch, queries are padded to the
    longest run, and a mask lets the query at position ``start + j`` see keys ``0 .. start + j``. The
    same arithmetic as :func:`_prefill_attention` per sequence (tested against it), in one call."""

    def __init__(self, step: StepInput, rows: list[int], offsets: list[int], block_size: int, device) -> None:
        lengths = [len(step.token_ids[i]) for i in rows]
        totals = [step.starts[i] + n for i, n in zip(rows, lengths, strict=True)]
        width = max(-(-t // block_size) for t in totals)
        tables = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (i, t) in enumerate(zip(rows, totals, strict=True)):
            used = step.tables[i][: -(-t // block_size)]
            tables[r, : len(used)] = torch.tensor(used, dtype=torch.long)
        self.tables = tables.to(device)
        self.num_queries = max(lengths)
        j = torch.arange(self.num_queries, device=device)
        lens = torch.tensor(lengths, device=device)
        self.valid = j[None] < lens[:, None]  # [rows, Q]: real (not padding) queries
        first = torch.tensor([offsets[i] for i in rows], device=device)
        self.flat = (first[:, None] + j[None])[self.valid]  # their places in the step's flat batch
        positions = torch.tensor([step.starts[i] for i in rows], device=device)[:, None] + j[None]
        context = torch.arange(width * block_size, device=device)
        self.mask = (context[None, None] <= positions[:, :, None])[:, None]  # [rows, 1, Q, context]

    def attention(self, q, k_cache, v_cache, scale):
        """Outputs ``[real queries, H, D]`` in the order of :attr:`flat`."""
        rows = self.tables.shape[0]
        keys = k_cache[self.tables].flatten(1, 2)  # [rows, context, KV, D]
        values = v_cache[self.tables].flatten(1, 2)
        queries = q.new_zeros((rows, self.num_queries, q.shape[1], q.shape[2]))
        queries[self.valid] = q[self.flat]
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),  # [rows, H, Q, D]
            keys.transpose(1, 2),  # [rows, KV, context, D]
            values.transpose(1, 2),
            attn_mask=self.mask,
            scale=scale,
            enable_gqa=q.shape[1] != keys.shape[2],
        )
        return out.transpose(1, 2)[self.valid]  # [real queries, H, D]
