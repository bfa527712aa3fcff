"""Two ways to run a tokenizer, behind one small interface.

``RustTokenizer`` drives the Rust ``tokenizers`` library directly from a directory's ``tokenizer.json``:
no transformers or torch import (seconds saved per process start), and batches encoded on all cores.
``HFTokenizer`` wraps ``transformers.AutoTokenizer`` and is the reference; it is used for GGUF files,
SentencePiece-only directories, and tokenizers whose ``tokenizer_config.json`` asks transformers to
rewrite the post-processor (``add_bos_token``/``add_eos_token``). Tests hold the two to identical ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from llmctl.core.errors import ModelError, UsageError

# tokenizer_config.json keys that make transformers change what tokenizer.json alone would do.
_REWRITING_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy")


class Tokenizer(Protocol):
    eos_token_id: int | None
    vocab_size: int  # including added tokens

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]: ...
    def decode_batch(self, ids: list[list[int]], skip_special_tokens: bool) -> list[str]: ...
    def render_chat(self, messages: list[dict[str, Any]]) -> str: ...


class HFTokenizer:
    """transformers' tokenizer (the reference path)."""

    def __init__(self, path: str | Path, hf=None) -> None:
        from llmctl.core.models.hf import load_tokenizer

        self.path = path
        self.hf = hf if hf is not None else load_tokenizer(path)
        self.eos_token_id = self.hf.eos_token_id
        self.vocab_size = len(self.hf)

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return self.hf(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]

    def decode_batch(self, ids: list[list[int]], skip_special_tokens: bool) -> list[str]:
        # clean_up_tokenization_spaces=False: exact round trips, decode(encode(x)) == x
        return self.hf.batch_decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        if not getattr(self.hf, "chat_template", None):
            raise UsageError("this tokenizer has no chat template; drop --apply-chat-template")
        return self.hf.apply_chat_template(messages, tokenize=False)


class RustTokenizer:
    """``tokenizers.Tokenizer`` from ``tokenizer.json``, special tokens from ``tokenizer_config.json``."""

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self.directory = directory
        try:
            self.rust = _Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:
            raise ModelError(f"cannot load {directory / 'tokenizer.json'}: {e}") from e
        eos = _token_content(config.get("eos_token"))
        self.eos_token_id = self.rust.token_to_id(eos) if eos else None
        self.vocab_size = self.rust.get_vocab_size(with_added_tokens=True)
        self._chat: HFTokenizer | None = None

    def encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return [e.ids for e in self.rust.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode_batch(self, ids: list[list[int]], skip_special_tokens: bool) -> list[str]:
        return self.rust.decode_batch(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        if self._chat is None:  # chat templates are Jinja run by transformers: load it only when needed
            self._chat = HFTokenizer(self.directory)
        return self._chat.render_chat(messages)


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def open_tokenizer(path: str | Path, *, prefer_rust: bool = True) -> Tokenizer:
    """The fastest faithful tokenizer for ``path`` (a model/tokenizer directory, tokenizer.json or .gguf)."""
    p = Path(path).expanduser()
    directory = p.parent if p.is_file() and p.name == "tokenizer.json" else p
    if prefer_rust and directory.is_dir() and (directory / "tokenizer.json").is_file():
        config_path = directory / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"cannot read {config_path}: {e}") from e
        if not any(key in config for key in _REWRITING_KEYS):
            return RustTokenizer(directory, config)
    return HFTokenizer(p)
