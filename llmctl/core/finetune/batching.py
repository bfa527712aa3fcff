"""Examples → tensors: padded batches, packed sequences, preference pairs.

Every batch carries ``targets`` (the next-token ids, ``-100`` where no loss is taken) already shifted *per
document*: ``targets[t] = labels[t + 1]`` inside a document and ``-100`` on its last token. So the loss is a
plain cross-entropy of ``logits[:, t]`` against ``targets[:, t]`` with no shift, and in a packed row the last
token of one document never learns to predict the first token of the next.

Packing (``--pack``) concatenates whole documents into rows of at most ``max_length`` tokens (first fit in
data order) and restarts ``position_ids`` at 0 for every document. With ``attention_mask=None``,
transformers' masking (``find_packed_sequence_indices``) turns restarting position ids into a
block-diagonal causal mask for eager/SDPA/flex attention, so documents never attend to each other, and
RoPE sees each document at its own positions: a packed row's loss equals the sum of its documents' losses.

Padding-free batches (``flatten=True``, what the trainer uses when the model runs
:mod:`llmctl.core.models.varlen` attention) go one step further: a micro-batch's rows, packed or not, are laid
end to end in a single row with restarting positions. No padding token is computed at all, and the varlen
attention keeps every document to itself. The batch holds the same examples and gives the same loss and
gradients as the padded one.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmctl.core.finetune.data import IGNORE, Example, PreferenceExample


def shifted_targets(labels: list[int]) -> list[int]:
    """Next-token targets of one document: ``labels[1:] + [-100]``."""
    return list(labels[1:]) + [IGNORE]


@dataclass
class Packed:
    """One packed row: several documents end to end."""

    input_ids: list[int]
    targets: list[int]
    position_ids: list[int]
    documents: int


def pack_examples(examples: list[Example], max_length: int) -> list[Packed]:
    """First-fit packing in data order; a document longer than ``max_length`` must be truncated before."""
    rows: list[Packed] = []
    for ex in examples:
        n = len(ex.input_ids)
        if n > max_length:
            raise ValueError(f"{ex.source}: {n} tokens exceed the pack length {max_length}")
        for row in rows:
            if len(row.input_ids) + n <= max_length:
                break
        else:
            row = Packed([], [], [], 0)
            rows.append(row)
        row.input_ids += ex.input_ids
        row.targets += shifted_targets(ex.labels)
        row.position_ids += list(range(n))
        row.documents += 1
    return rows


def as_unit(ex: Example) -> Packed:
    """An unpacked example in the same shape as a packed row (one document)."""
    return Packed(list(ex.input_ids), shifted_targets(ex.labels), list(range(len(ex.input_ids))), 1)


def collate(units: list[Packed], pad_id: int, *, packed: bool) -> dict:
    """Pad rows to the longest one. Unpacked batches use a 2D ``attention_mask``; packed ones pass
    ``position_ids`` (restarting per document) and no mask, padding being one more document of its own."""
    import torch

    width = max(len(u.input_ids) for u in units)
    ids, targets, positions, mask = [], [], [], []
    for u in units:
        pad = width - len(u.input_ids)
        ids.append(u.input_ids + [pad_id] * pad)
        targets.append(u.targets + [IGNORE] * pad)
        positions.append(u.position_ids + list(range(pad)))
        mask.append([1] * len(u.input_ids) + [0] * pad)
    batch = {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "targets": torch.tensor(targets, dtype=torch.long),
        "tokens": torch.tensor(sum(len(u.input_ids) for u in units)),  # real tokens, padding excluded
    }
    if packed:
        batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
    else:
        batch["attention_mask"] = torch.tensor(mask, dtype=torch.long)
    return batch


def flatten_units(units: list[Packed]) -> Packed:
    """Several rows as one: their documents end to end, positions still restarting per document."""
    row = Packed([], [], [], 0)
    for u in units:
        row.input_ids += u.input_ids
        row.targets += u.targets
        row.position_ids += u.position_ids
        row.documents += u.documents
    return row


def collate_pairs(pairs: list[PreferenceExample], pad_id: int) -> dict:
    """Chosen rows first, then rejected rows, in one padded batch of ``2 * len(pairs)`` rows."""
    units = [as_unit(p.chosen) for p in pairs] + [as_unit(p.rejected) for p in pairs]
    return collate(units, pad_id, packed=False)


def units_of(examples: list, *, pack: bool, max_length: int | None) -> list:
    """What one training "item" is: a packed row, an example, or a preference pair."""
    if examples and isinstance(examples[0], PreferenceExample):
        return list(examples)
    if pack:
        return pack_examples(examples, max_length or max(len(e.input_ids) for e in examples))
    return [as_unit(e) for e in examples]


def collate_units(units: list, pad_id: int, *, pack: bool, flatten: bool = False) -> dict:
    """A micro-batch's tensors. Preference pairs stay padded rows (their losses are per row)."""
    if units and isinstance(units[0], PreferenceExample):
        return collate_pairs(units, pad_id)
    if flatten:
        return collate([flatten_units(units)], pad_id, packed=True)
    return collate(units, pad_id, packed=pack)
