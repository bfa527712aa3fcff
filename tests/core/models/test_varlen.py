"""Padding-free attention: per-document SDPA on one row equals the padded batch, forward and backward."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmctl.core.models.varlen import (
    VARLEN_ATTENTION,
    document_spans,
    enable_varlen_attention,
    varlen_attention_reference,
)


def tiny_llama(kv_heads: int = 2, **extra) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=128, attn_implementation="sdpa", **extra,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).float().eval()


def documents(lengths: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (n,), generator=g) for n in lengths]


def padded_logits(model, docs):
    width = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)], mask[i, : len(d)] = d, 1
    out = model(input_ids=ids, attention_mask=mask).logits
    return [out[i, : len(d)] for i, d in enumerate(docs)]


def flat_logits(model, docs):
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    out = model(input_ids=ids, position_ids=positions).logits[0]
    return list(out.split([len(d) for d in docs]))


def test_document_spans_follow_restarting_positions():
    assert document_spans(torch.tensor([0, 1, 2, 0, 1, 0, 0, 1, 2, 3])) == [(0, 3), (3, 5), (5, 6), (6, 10)]
    assert document_spans(torch.tensor([5, 6, 7])) == [(0, 3)]  # one document that starts later
    assert document_spans(torch.tensor([0, 1, 3, 4])) == [(0, 2), (2, 4)]  # a jump also separates


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_segmented_attention_equals_the_block_diagonal_reference(kv_heads):
    from llmctl.core.models.varlen import _segmented_sdpa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 11, 8, generator=g)
    k = torch.randn(1, kv_heads, 11, 8, generator=g)
    v = torch.randn(1, kv_heads, 11, 8, generator=g)
    spans = [(0, 4), (4, 5), (5, 11)]
    got = _segmented_sdpa(q, k, v, spans, 0.3, kv_heads != 4)
    want = varlen_attention_reference(q, k, v, spans, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_one_unpadded_row_gives_the_padded_batch_logits_and_gradients(kv_heads):
    docs = documents([7, 3, 12, 1])
    model = tiny_llama(kv_heads)
    want = padded_logits(model, docs)
    assert enable_varlen_attention(model)
    assert model.config._attn_implementation == VARLEN_ATTENTION
    got = flat_logits(model, docs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    def grads(fn):
        model.zero_grad()
        torch.cat([x.square().mean(-1) for x in fn(model, docs)]).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    flat = grads(flat_logits)
    model.set_attn_implementation("sdpa")
    padded = grads(padded_logits)
    assert flat.keys() == padded.keys()
    for name in flat:
        torch.testing.assert_close(flat[name], padded[name], rtol=1e-4, atol=1e-6, msg=name)


def test_padded_batches_keep_their_mask_under_the_varlen_implementation():
    docs = documents([9, 4, 6])
    model = tiny_llama()
    want = padded_logits(model, docs)
    enable_varlen_attention(model)
    for a, b in zip(padded_logits(model, docs), want, strict=True):
        torch.testing.assert_close(a, b)


def test_generation_with_a_kv_cache_is_unchanged():
    model = tiny_llama()
    ids = documents([6])[0][None]
    want = model.generate(ids, max_new_tokens=5, do_sample=False)
    enable_varlen_attention(model)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), want)


def test_architectures_with_a_sliding_window_or_other_attention_are_left_alone():
    windowed = tiny_llama()
    windowed.config.model_type = "mistral"
    windowed.config.sliding_window = 16
    assert not enable_varlen_attention(windowed)
    assert windowed.config._attn_implementation == "sdpa"
    eager = tiny_llama()
    eager.set_attn_implementation("eager")
    assert not enable_varlen_attention(eager)
    assert eager.config._attn_implementation == "eager"
