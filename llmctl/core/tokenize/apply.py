"""``llmctl tokenize``: add token ids to records, pack them into fixed-length sequences, or decode them.

``tokenizer`` is a :class:`llmctl.core.tokenize.backend.Tokenizer` (see :func:`open_tokenizer`).
All three stream: records are read, encoded in batches of ``batch_size`` (one call into the Rust
tokenizer per batch) and written in input order as they are done. Fields other than the one written
pass through untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from llmctl.core.errors import InputDataError, UsageError
from llmctl.core.io.fields import get_field, set_field
from llmctl.core.io.jsonl import ReadStats, Record


@dataclass
class EncodeOptions:
    ids_field: str = "input_ids"
    attention_mask: bool = False
    add_special_tokens: bool | None = None  # None: the tokenizer's default (False for chat templates)
    max_length: int | None = None
    truncate: bool = False
    skip_bad_lines: bool = False


@dataclass
class TokenizeStats:
    records: int = 0
    tokens: int = 0
    truncated: int = 0
    sequences: int = 0  # --pack: sequences written
    dropped_tokens: int = 0  # --pack: tokens of the last, incomplete sequence


def messages_of(record: dict) -> tuple[Any, str | None]:
    """``extract`` for chat records: a non-empty list of {role, content} objects."""
    messages = record.get("messages")
    if messages is None:
        return None, "missing field 'messages' (needed by --apply-chat-template)"
    if not isinstance(messages, list) or not messages:
        return None, "field 'messages' must be a non-empty list"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            return None, "every message needs a string 'role' and a 'content'"
    return messages, None


def _batches(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_records(
    tokenizer,
    records: Iterable[Record],
    options: EncodeOptions,
    *,
    chat: bool = False,
    batch_size: int = 64,
    stats: TokenizeStats | None = None,
    read_stats: ReadStats | None = None,
) -> Iterator[dict]:
    """Yield each record with ``input_ids`` (and ``attention_mask``) added."""
    stats = stats if stats is not None else TokenizeStats()
    add_special = options.add_special_tokens
    if add_special is None:
        add_special = not chat  # the template already holds the special tokens
    for batch in _batches(records, batch_size):
        texts = [tokenizer.render_chat(r.text) if chat else r.text for r in batch]
        encoded = tokenizer.encode_batch(texts, add_special_tokens=add_special)
        for record, ids in zip(batch, encoded, strict=True):
            if options.max_length is not None and len(ids) > options.max_length:
                if not options.truncate:
                    message = (
                        f"{record.where}: {len(ids)} tokens, more than --max-length {options.max_length} "
                        "(add --truncate to cut)"
                    )
                    if options.skip_bad_lines and read_stats is not None:
                        read_stats.skip(message)
                        continue
                    raise InputDataError(message)
                ids = ids[: options.max_length]
                stats.truncated += 1
            out = record.data
            set_field(out, options.ids_field, ids)
            if options.attention_mask:
                set_field(out, "attention_mask", [1] * len(ids))
            stats.records += 1
            stats.tokens += len(ids)
            yield out


def pack_sequences(
    tokenizer,
    encoded: Iterable[dict],
    length: int,
    *,
    ids_field: str = "input_ids",
    attention_mask: bool = False,
    keep_remainder: bool = False,
    stats: TokenizeStats | None = None,
) -> Iterator[dict]:
    """Join documents with EOS between them and cut the stream into sequences of exactly ``length``.

    A document that already ends with EOS gets no second one. The last, shorter sequence is dropped
    (its tokens are counted) unless ``keep_remainder``.
    """
    if length < 1:
        raise UsageError("--pack must be at least 1")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("--pack needs a tokenizer with an EOS token to separate documents")
    stats = stats if stats is not None else TokenizeStats()
    buffer: list[int] = []

    def emit(ids: list[int]) -> dict:
        stats.sequences += 1
        seq: dict[str, Any] = {ids_field: ids}
        if attention_mask:
            seq["attention_mask"] = [1] * len(ids)
        return seq

    for record in encoded:
        ids = list(get_field(record, ids_field))
        buffer.extend(ids)
        if not ids or ids[-1] != eos:
            buffer.append(eos)
        while len(buffer) >= length:
            yield emit(buffer[:length])
            del buffer[:length]
    if buffer:
        if keep_remainder:
            yield emit(buffer)
        else:
            stats.dropped_tokens += len(buffer)


def ids_of(ids_field: str):
    """``extract`` for --decode: a list of non-negative integers at ``ids_field``."""

    def extract(record: dict) -> tuple[Any, str | None]:
        try:
            ids = get_field(record, ids_field)
        except KeyError:
            return None, f"missing field {ids_field!r}"
        if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
            return None, f"field {ids_field!r} must be a list of non-negative integers"
        return ids, None

    return extract


def decode_records(
    tokenizer,
    records: Iterable[Record],
    *,
    text_field: str = "text",
    skip_special_tokens: bool = False,
    batch_size: int = 64,
    stats: TokenizeStats | None = None,
) -> Iterator[dict]:
    """Yield each record with ``text_field`` set to the decoded ``input_ids``."""
    stats = stats if stats is not None else TokenizeStats()
    vocab = tokenizer.vocab_size
    for batch in _batches(records, batch_size):
        for record in batch:
            bad = next((i for i in record.text if i >= vocab), None)
            if bad is not None:
                raise InputDataError(
                    f"{record.where}: token id {bad} is outside the vocabulary (size {vocab})"
                )
        texts = tokenizer.decode_batch([r.text for r in batch], skip_special_tokens=skip_special_tokens)
        for record, text in zip(batch, texts, strict=True):
            set_field(record.data, text_field, text)
            stats.records += 1
            stats.tokens += len(record.text)
            yield record.data
