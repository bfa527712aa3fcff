"""A byte-level tokenizer that needs no training data and no download, for ``llmctl init``.

Every byte is a token (GPT-2's byte-to-unicode alphabet, so any text round-trips), plus the ChatML
special tokens. No merges: it compresses nothing, but it is a real tokenizer that transformers,
tokenizers and llama.cpp all load, which is what tests and pipeline dry runs need. Train a real one with
``llmctl tokenize-train`` and pass it to ``llmctl init --vocab-from``.
"""

from __future__ import annotations

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as SmolLM2 and Qwen use it: a system turn only when given.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the rest (controls, space, ...) are shifted to 256+n so
    that no token is whitespace or a control character.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    mapping = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def byte_level_tokenizer(special_tokens: list[str] = SPECIAL_TOKENS):
    """A transformers fast tokenizer: special tokens get ids 0..k-1, then the 256 bytes in byte order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for _, ch in sorted(bytes_to_unicode().items()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    end = special_tokens[0]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special_tokens[1] if len(special_tokens) > 1 else end,
        eos_token=special_tokens[2] if len(special_tokens) > 2 else end,
        unk_token=end,
        pad_token=end,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast
