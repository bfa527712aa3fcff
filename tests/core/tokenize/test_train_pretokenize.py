"""The Python pre-tokenizers (reference engine) split exactly as the tokenizers ones (HF engine) do."""

import pytest

from llmctl.core.errors import UsageError
from llmctl.core.tokenize.pretokenize import (
    PRE_TOKENIZERS,
    check_pre_tokenizer,
    hf_pre_tokenizer,
    python_splitter,
    to_byte_level,
)

AWKWARD = [
    "",
    " ",
    "a",
    "Hello, world!",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n\n",
    "I'M he's we'll THEY'D",
    "numbers 1234567 and 3.14159",
    "héllo wörld naïve café",
    "漢字とかなカタカナ 한국어",
    "emoji 👋🏽 👨‍👩‍👧 flags 🇫🇷",
    "combining e\u0301 a\u0308",
    "control \x00\x01\x7f chars",
    "CamelCaseWord snake_case path/to/file.py",
    "▁already ▁meta▁spaced",
    "x" * 40 + " " * 17 + "y",
]


@pytest.mark.parametrize("name", PRE_TOKENIZERS)
@pytest.mark.parametrize("byte_level", [False, True])
def test_python_splitter_matches_the_tokenizers_pre_tokenizer(name, byte_level):
    hf = hf_pre_tokenizer(name, byte_level=byte_level)
    split = python_splitter(name, byte_level=byte_level)
    for text in AWKWARD:
        expected = [w for w, _ in hf.pre_tokenize_str(text)] if hf else ([text] if text else [])
        assert split(text) == expected, repr(text)


def test_byte_level_words_use_the_256_symbol_alphabet():
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    assert len(alphabet) == 256
    assert set(to_byte_level("".join(AWKWARD))) <= alphabet


def test_unknown_pre_tokenizer_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown pre-tokenizer 'bert'"):
        check_pre_tokenizer("bert")
