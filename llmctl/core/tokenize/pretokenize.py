"""Pre-tokenizers: how text is cut into words before a subword model sees it.

Each scheme exists twice, built from one definition: as a Hugging Face ``tokenizers`` pre-tokenizer (what
goes into ``tokenizer.json``) and as a plain Python function (what the reference trainers use). Tests hold
the two to identical splits.

The regexes are those of GPT-2 and of tiktoken's cl100k_base and o200k_base (written without possessive
quantifiers, as Llama 3's ``tokenizer.json`` writes cl100k, so that both Oniguruma, which ``tokenizers``
uses, and Python's ``regex`` module read them the same way).

``byte_level``: after the split, each word's UTF-8 bytes are mapped to GPT-2's printable byte alphabet, so
every string is made of 256 symbols and nothing is ever unknown.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from llmctl.core.errors import UsageError
from llmctl.core.models.tokenizers import bytes_to_unicode

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
# HF's Whitespace pre-tokenizer: runs of word characters, runs of other non-space characters.
WHITESPACE_PATTERN = r"""\w+|[^\w\s]+"""
METASPACE = "\u2581"  # "▁", SentencePiece's visible space

PATTERNS = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN, "o200k": O200K_PATTERN}
PRE_TOKENIZERS = ("gpt2", "cl100k", "o200k", "whitespace", "metaspace", "none")


def check_pre_tokenizer(name: str) -> str:
    if name not in PRE_TOKENIZERS:
        raise UsageError(f"unknown pre-tokenizer {name!r}; choose one of {', '.join(PRE_TOKENIZERS)}")
    return name


@lru_cache(maxsize=1)
def byte_encoder() -> dict[int, str]:
    return bytes_to_unicode()


def to_byte_level(word: str) -> str:
    enc = byte_encoder()
    return "".join(enc[b] for b in word.encode("utf-8"))


def python_splitter(name: str, *, byte_level: bool) -> Callable[[str], list[str]]:
    """``text -> words`` exactly as :func:`hf_pre_tokenizer` (same name and byte_level) splits it."""
    import regex

    check_pre_tokenizer(name)
    if name in PATTERNS or name == "whitespace":
        pattern = regex.compile(PATTERNS.get(name, WHITESPACE_PATTERN))

        def split(text: str) -> list[str]:
            return pattern.findall(text)

    elif name == "metaspace":

        def split(text: str) -> list[str]:
            if not text:
                return []
            # prepend_scheme="always", split=True: "a b" -> "▁a", "▁b"; every word starts at a "▁".
            text = text.replace(" ", METASPACE)
            if not text.startswith(METASPACE):
                text = METASPACE + text
            words, start = [], 0
            for i in range(1, len(text)):
                if text[i] == METASPACE:
                    words.append(text[start:i])
                    start = i
            words.append(text[start:])
            return [w for w in words if w]

    else:  # none: the whole text is one word

        def split(text: str) -> list[str]:
            return [text] if text else []

    if not byte_level:
        return split
    enc = byte_encoder()

    def split_bytes(text: str) -> list[str]:
        return ["".join(enc[b] for b in w.encode("utf-8")) for w in split(text)]

    return split_bytes


def hf_pre_tokenizer(name: str, *, byte_level: bool):
    """The ``tokenizers`` pre-tokenizer for ``name`` (None for "none" without byte_level)."""
    from tokenizers import Regex, pre_tokenizers

    check_pre_tokenizer(name)
    if name in PATTERNS:
        # The patterns match every character, so "isolated" pieces are exactly the regex's matches.
        steps = [pre_tokenizers.Split(Regex(PATTERNS[name]), behavior="isolated", invert=False)]
    elif name == "whitespace":
        steps = [pre_tokenizers.Whitespace()]
    elif name == "metaspace":
        steps = [pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)]
    else:
        steps = []
    if byte_level:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
