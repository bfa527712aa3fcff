"""The Rust fast path gives exactly the ids and texts of transformers' tokenizer (the reference)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmctl.core.tokenize.backend import HFTokenizer, RustTokenizer, open_tokenizer

AWKWARD = [
    "", "a", " ", "   leading", "trailing  ", "a  1", "tabs\tand\nnewlines\r\n", "émoji 👋🏽 ok",
    "漢字とかな", "e\u0301 combining", "\x00\x07 control", "<|im_end|> special in text", "1234567 89",
]  # fmt: skip


def _both(path):
    rust, hf = open_tokenizer(path), HFTokenizer(path)
    assert isinstance(rust, RustTokenizer)
    return rust, hf


@pytest.mark.parametrize("add_special", [True, False])
def test_rust_path_matches_transformers_on_awkward_strings(tiny_model, add_special):
    rust, hf = _both(tiny_model)
    assert rust.encode_batch(AWKWARD, add_special) == hf.encode_batch(AWKWARD, add_special)
    ids = hf.encode_batch(AWKWARD, add_special)
    for skip in (True, False):
        assert rust.decode_batch(ids, skip) == hf.decode_batch(ids, skip)
    assert rust.decode_batch(ids, False) == AWKWARD  # byte-level: exact round trip
    assert (rust.eos_token_id, rust.vocab_size) == (hf.eos_token_id, hf.vocab_size)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=4))
def test_rust_path_matches_transformers_on_arbitrary_unicode(tiny_tokenizers, texts):
    rust, hf = tiny_tokenizers
    assert rust.encode_batch(texts, True) == hf.encode_batch(texts, True)
    assert rust.decode_batch(rust.encode_batch(texts, True), False) == texts


@pytest.fixture(scope="module")
def tiny_tokenizers(tiny_model):
    return _both(tiny_model)


def test_chat_rendering_is_the_templates(tiny_model):
    rust, hf = _both(tiny_model)
    messages = [{"role": "user", "content": "Hi"}]
    assert rust.render_chat(messages) == hf.render_chat(messages) == "<|im_start|>user\nHi<|im_end|>\n"


def test_tokenizer_configs_that_rewrite_special_tokens_use_transformers(tiny_model, tmp_path):
    import shutil

    copy = tmp_path / "tok"
    shutil.copytree(tiny_model, copy)
    config = (copy / "tokenizer_config.json").read_text()
    (copy / "tokenizer_config.json").write_text(config.replace("{", '{"add_bos_token": true,', 1))
    chosen = open_tokenizer(copy)
    assert isinstance(chosen, HFTokenizer)
    from transformers import AutoTokenizer

    assert chosen.encode_batch(["hi"], True) == [AutoTokenizer.from_pretrained(copy)("hi")["input_ids"]]


@pytest.mark.slow
def test_rust_path_matches_transformers_on_smollm2(smollm2):
    rust, hf = _both(smollm2)
    texts = AWKWARD + ["The capital of France is Paris.", "def f(x):\n    return x ** 2  # 42"]
    assert rust.encode_batch(texts, True) == hf.encode_batch(texts, True)
    assert rust.decode_batch(hf.encode_batch(texts, True), False) == hf.decode_batch(
        hf.encode_batch(texts, True), False
    )
