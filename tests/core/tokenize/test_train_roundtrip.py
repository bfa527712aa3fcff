"""Property tests: trained tokenizers give the text back, and special tokens are never split."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmctl.core.tokenize.train import Corpus, TrainOptions, train_tokenizer
from tests.core.tokenize.test_train_bpe import synthetic_lines

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROFILE = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Arbitrary Unicode, with extra weight on what breaks tokenizers: emoji, CJK, combining marks,
# control characters and long runs of whitespace.
AWKWARD_TEXT = st.lists(
    st.one_of(
        st.text(max_size=20),
        st.sampled_from(
            ["👋🏽", "👨‍👩‍👧", "🇫🇷", "漢字", "かな", "e\u0301", "\u0308", "\x00", "\x1b", "\ufeff"]
        ),
        st.text(alphabet=" \t\n\r\u3000\u00a0", min_size=1, max_size=30),
        st.sampled_from(WORDS := ["the", " lower", "newest", "don't", "2024"]),
    ),
    max_size=12,
).map("".join)


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(synthetic_lines(400, seed=7)) + "\n", encoding="utf-8")
    return path


def trained(path, **kwargs):
    options = TrainOptions(special_tokens=list(SPECIALS), **kwargs).resolved()
    return train_tokenizer(Corpus([str(path)]), options)[0]


@pytest.fixture(scope="module")
def byte_level_bpe(corpus_path):
    return {
        pre: trained(corpus_path, algo="bpe", vocab_size=500, pre_tokenizer=pre) for pre in ("gpt2", "o200k")
    }


@pytest.fixture(scope="module")
def fallback(corpus_path):
    return {
        "unigram": trained(corpus_path, algo="unigram", vocab_size=400, byte_fallback=True),
        "bpe": trained(
            corpus_path, algo="bpe", vocab_size=400, byte_fallback=True, pre_tokenizer="metaspace"
        ),
    }


@pytest.fixture(scope="module")
def wordpiece(corpus_path):
    return trained(corpus_path, algo="wordpiece", vocab_size=300)


@PROFILE
@given(text=AWKWARD_TEXT)
def test_byte_level_bpe_round_trips_any_unicode(byte_level_bpe, text):
    for tok in byte_level_bpe.values():
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


@PROFILE
@given(left=AWKWARD_TEXT, right=AWKWARD_TEXT, special=st.sampled_from(SPECIALS))
def test_special_tokens_are_never_split(byte_level_bpe, fallback, left, right, special):
    text = left + special + right
    expected = re.findall("|".join(map(re.escape, SPECIALS)), text)  # every occurrence, in order
    for tok in [*byte_level_bpe.values(), *fallback.values()]:
        tokens = tok.encode(text, add_special_tokens=False).tokens
        assert [t for t in tokens if t in SPECIALS] == expected


@PROFILE
@given(text=AWKWARD_TEXT.filter(lambda t: not t.startswith(" ") and "\u2581" not in t))
def test_byte_fallback_tokenizers_round_trip_up_to_a_leading_space(fallback, text):
    # Documented normalisation: metaspace turns a leading space into the word-start mark, and the
    # decoder drops one leading space; a literal "▁" in the text decodes as a space.
    for tok in fallback.values():
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


@PROFILE
@given(text=st.text(alphabet="thelowrnsidcfa'. ,!?\n\t", max_size=80))
def test_wordpiece_round_trips_up_to_whitespace(wordpiece, text):
    decoded = wordpiece.decode(wordpiece.encode(text, add_special_tokens=False).ids)
    assert "".join(decoded.split()) == "".join(text.split())


SAMPLES = ["the lowest newer, 2024 café", "👋🏽 漢字\t\tx  \n", "don't\x00stop", "a" * 50]


@pytest.mark.parametrize("engine", ["hf", "reference"])
@pytest.mark.parametrize("pre", ["gpt2", "cl100k", "o200k", "metaspace", "none"])
@pytest.mark.parametrize(
    "algo,byte_level,byte_fallback", [("bpe", True, False), ("bpe", False, True), ("unigram", True, False)]
)
def test_every_lossless_combination_round_trips(tmp_path, engine, pre, algo, byte_level, byte_fallback):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(synthetic_lines(150, seed=9)) + "\n", encoding="utf-8")
    options = TrainOptions(
        algo=algo, pre_tokenizer=pre, byte_level=byte_level, byte_fallback=byte_fallback, engine=engine,
        vocab_size=400,
    ).resolved()  # fmt: skip
    tok = train_tokenizer(Corpus([str(path)]), options)[0]
    for text in SAMPLES:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
