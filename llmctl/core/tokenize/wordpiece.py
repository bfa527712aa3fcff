"""Reference WordPiece trainer, built the way Hugging Face ``tokenizers`` builds it.

WordPiece (Schuster & Nakajima 2012; BERT, https://arxiv.org/abs/1810.04805) marks every piece that does
not start a word with a continuing-subword prefix (``##``). HF's ``WordPieceTrainer`` learns the
vocabulary with its BPE trainer run with that prefix: pairs are merged by frequency (not by the
likelihood score of the original paper), ``left + right`` without the right side's prefix. This does the
same through :func:`llmctl.core.tokenize.bpe.train_bpe`, so the two engines give the same vocabulary.

The prefixed alphabet (``##a``, ``##b``, ...) is given ids right after the special tokens, in code-point
order. HF assigns those ids in the order it happens to read words from a hash map, which makes its
tie-breaks, and so its vocabulary, change from run to run; llmctl gives HF the same seed tokens, which
makes both engines deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from llmctl.core.tokenize.bpe import train_bpe

PREFIX = "##"


def seed_tokens(alphabet: Iterable[str], prefix: str = PREFIX) -> list[str]:
    return [prefix + ch for ch in sorted(alphabet, key=ord)]


def train_wordpiece(
    word_counts: Mapping[str, int],
    vocab_size: int,
    *,
    special_tokens: Iterable[str] = (),
    alphabet: Iterable[str],
    min_frequency: int = 0,
    prefix: str = PREFIX,
) -> dict[str, int]:
    """``token -> id`` for a WordPiece model; ``alphabet`` is the characters kept (see compute_alphabet)."""
    alphabet = sorted(set(alphabet), key=ord)
    result = train_bpe(
        word_counts,
        vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        min_frequency=min_frequency,
        continuing_subword_prefix=prefix,
        seed_tokens=seed_tokens(alphabet, prefix),
    )
    return result.vocab
