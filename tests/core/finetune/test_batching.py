"""Packing: per-document targets and positions, and a packed row's loss equal to its documents' losses."""

from __future__ import annotations

import pytest
import torch

from llmctl.core.finetune.batching import as_unit, collate, collate_units, pack_examples, shifted_targets
from llmctl.core.finetune.data import IGNORE, Example
from llmctl.core.finetune.objectives import forward_logits, sft_sum


def test_targets_are_shifted_within_a_document():
    assert shifted_targets([IGNORE, 5, 6]) == [5, 6, IGNORE]


def test_packing_restarts_positions_and_never_predicts_across_documents():
    a = Example([1, 2, 3], [IGNORE, 2, 3])
    b = Example([4, 5], [4, 5])
    c = Example([6, 7, 8, 9], [6, 7, 8, 9])
    rows = pack_examples([a, b, c], max_length=6)
    assert [r.input_ids for r in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    first = rows[0]
    assert first.position_ids == [0, 1, 2, 0, 1]
    # token 3 (last of a) does not learn to predict 4 (first of b)
    assert first.targets == [2, 3, IGNORE, 5, IGNORE]
    assert first.documents == 2


def test_first_fit_fills_earlier_rows():
    exs = [Example([1] * 4, [1] * 4), Example([2] * 5, [2] * 5), Example([3] * 2, [3] * 2)]
    rows = pack_examples(exs, max_length=6)
    assert [r.input_ids for r in rows] == [[1, 1, 1, 1, 3, 3], [2] * 5]


def test_packed_batches_carry_position_ids_and_no_mask():
    rows = pack_examples([Example([1, 2], [1, 2]), Example([3], [3])], max_length=4)
    batch = collate(rows + [as_unit(Example([9, 9, 9, 9], [9, 9, 9, 9]))], pad_id=0, packed=True)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0], [0, 1, 2, 3]]  # padding is its own document
    assert batch["targets"].tolist()[0] == [2, IGNORE, IGNORE, IGNORE]


@pytest.fixture(scope="module")
def model(tiny_model):
    from llmctl.core.models.hf import load_model, resolve_model

    return load_model(resolve_model(tiny_model), device="cpu")


def test_packed_loss_equals_the_sum_of_unpacked_losses(model):
    g = torch.Generator().manual_seed(0)
    docs = []
    for n in (7, 5, 9, 3):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        docs.append(Example(ids, [IGNORE] + ids[1:]))
    rows = pack_examples(docs, max_length=16)
    assert [r.documents for r in rows] == [3, 1]
    packed = collate(rows, pad_id=0, packed=True)
    with torch.no_grad():
        packed_loss, packed_n = sft_sum(forward_logits(model, packed), packed["targets"])
        alone = [collate([as_unit(d)], pad_id=0, packed=False) for d in docs]
        sums = [sft_sum(forward_logits(model, x), x["targets"]) for x in alone]
    assert packed_n == sum(n for _, n in sums)
    torch.testing.assert_close(packed_loss, sum(s for s, _ in sums), rtol=1e-5, atol=1e-5)


def test_packed_logits_match_each_document_alone(model):
    docs = [Example([10, 11, 12], [10, 11, 12]), Example([13, 14, 15, 16], [13, 14, 15, 16])]
    packed = collate(pack_examples(docs, max_length=8), pad_id=0, packed=True)
    with torch.no_grad():
        logits = forward_logits(model, packed)[0]
        second = forward_logits(model, collate([as_unit(docs[1])], pad_id=0, packed=False))[0]
        naive = model(input_ids=packed["input_ids"], use_cache=False).logits[0]  # no boundaries
    torch.testing.assert_close(logits[3:7], second, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(naive[3:7], second, atol=1e-4)  # the check can fail: cross-attention shows


def test_padding_does_not_change_the_loss(model):
    docs = [Example([5, 6, 7, 8, 9], [5, 6, 7, 8, 9]), Example([10, 11], [10, 11])]
    batch = collate([as_unit(d) for d in docs], pad_id=0, packed=False)
    with torch.no_grad():
        together, _ = sft_sum(forward_logits(model, batch), batch["targets"])
        apart = sum(
            sft_sum(forward_logits(model, x), x["targets"])[0]
            for x in (collate([as_unit(d)], pad_id=0, packed=False) for d in docs)
        )
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


def test_a_flattened_micro_batch_is_one_row_with_restarting_positions():
    units = [
        as_unit(Example([1, 2, 3], [1, 2, 3])),
        *pack_examples([Example([4], [4]), Example([5, 6], [5, 6])], 4),
    ]
    batch = collate_units(units, pad_id=0, pack=False, flatten=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch["targets"].tolist() == [[2, 3, IGNORE, IGNORE, 6, IGNORE]]
    assert int(batch["tokens"]) == 6 and "attention_mask" not in batch


@pytest.mark.parametrize("varlen", [True, False])
def test_a_padding_free_batch_gives_the_padded_batch_loss_and_gradients(tiny_model, varlen):
    from llmctl.core.models.hf import load_model, resolve_model
    from llmctl.core.models.varlen import enable_varlen_attention

    model = load_model(resolve_model(tiny_model), device="cpu")
    g = torch.Generator().manual_seed(3)
    docs = []
    for n in (9, 4, 13, 1, 6):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        docs.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2 :]))
    units = [as_unit(d) for d in docs]

    def loss_and_grads(batch):
        model.zero_grad()
        loss, n = sft_sum(forward_logits(model, batch), batch["targets"])
        (loss / n).backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    padded_loss, padded_grads = loss_and_grads(collate_units(units, pad_id=0, pack=False))
    # with varlen attention the row is split per document; without it transformers' block mask does it
    if varlen:
        assert enable_varlen_attention(model)
    flat_loss, flat_grads = loss_and_grads(collate_units(units, pad_id=0, pack=False, flatten=True))
    torch.testing.assert_close(flat_loss, padded_loss, rtol=1e-5, atol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(flat_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
