"""Reference BPE and WordPiece learn exactly what Hugging Face tokenizers' trainers learn."""

import json
import random
from collections import Counter

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from llmctl.core.tokenize.bpe import compute_alphabet, train_bpe
from llmctl.core.tokenize.pretokenize import hf_pre_tokenizer, python_splitter
from llmctl.core.tokenize.train import Corpus, TrainOptions, train_tokenizer
from llmctl.core.tokenize.wordpiece import seed_tokens, train_wordpiece

WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they which one "
    "you were all we her she there would their will when who him been has more if no out so said what up "
    "lower lowest newer newest wider widest tokenizer tokenization naïve café 東京 😀 don't it's 2024 3.14"
).split()


def synthetic_lines(n: int, seed: int = 0) -> list[str]:
    """Zipf-like pseudo-text: many ties among rare pairs, some non-ASCII, punctuation and numbers."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    lines = []
    for _ in range(n):
        words = rng.choices(WORDS, weights, k=rng.randint(3, 14))
        lines.append(" ".join(words) + rng.choice([".", ",", "!", "?", "", "  "]))
    return lines


def hf_bpe(lines, vocab_size, *, pre="gpt2", byte_level=True, min_frequency=0, specials=("<s>",)):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = hf_pre_tokenizer(pre, byte_level=byte_level)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def word_counts(lines, pre="gpt2", byte_level=True):
    split = python_splitter(pre, byte_level=byte_level)
    counts = Counter()
    for line in lines:
        counts.update(split(line))
    return counts


def test_merges_on_a_hand_computed_example():
    # (a,b) 2+3=5 first; then (a,a) and (a,ab) tie at 2 and the smaller pair of ids, (a,a), wins.
    result = train_bpe({"aaab": 2, "ab": 3}, 10)
    assert result.merges == [("a", "b"), ("a", "a"), ("aa", "ab")]
    assert result.vocab == {"a": 0, "b": 1, "ab": 2, "aa": 3, "aaab": 4}


def test_min_frequency_stops_merging():
    assert train_bpe({"aaab": 2, "ab": 3}, 10, min_frequency=3).merges == [("a", "b")]


@pytest.mark.parametrize(
    "pre,byte_level,vocab_size,min_frequency",
    [("gpt2", True, 600, 0), ("cl100k", True, 450, 2), ("o200k", True, 500, 0), ("whitespace", False, 300, 0),
     ("metaspace", False, 300, 3)],
)  # fmt: skip
def test_reference_bpe_learns_the_same_merges_in_the_same_order_as_hf(
    pre, byte_level, vocab_size, min_frequency
):
    lines = synthetic_lines(400)
    hf_vocab, hf_merges = hf_bpe(
        lines, vocab_size, pre=pre, byte_level=byte_level, min_frequency=min_frequency
    )
    ours = train_bpe(
        word_counts(lines, pre, byte_level),
        vocab_size,
        special_tokens=["<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
        min_frequency=min_frequency,
    )
    assert len(hf_merges) > 50
    assert ours.merges == hf_merges
    assert ours.vocab == hf_vocab


def test_compute_alphabet_keeps_the_most_frequent_characters_and_the_forced_ones():
    counts = {"aab": 3, "c": 1, "zz": 1}
    assert compute_alphabet(counts) == ["a", "b", "c", "z"]
    assert compute_alphabet(counts, limit=2) == ["a", "b"]
    assert compute_alphabet(counts, initial_alphabet=["c"], limit=2) == ["a", "c"]


def test_reference_wordpiece_vocabulary_equals_hf_with_the_same_seed_tokens():
    lines = synthetic_lines(300, seed=1)
    counts = word_counts(lines, "whitespace", False)
    alphabet = compute_alphabet(counts)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = hf_pre_tokenizer("whitespace", byte_level=False)
    trainer = trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[UNK]", *seed_tokens(alphabet)], initial_alphabet=alphabet,
        limit_alphabet=len(alphabet), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(lines, trainer)
    hf_vocab = json.loads(tok.to_str())["model"]["vocab"]
    ours = train_wordpiece(counts, 400, special_tokens=["[UNK]"], alphabet=alphabet)
    assert any(t.startswith("##") and len(t) > 3 for t in ours)
    assert ours == hf_vocab


@pytest.mark.parametrize(
    "options",
    [
        TrainOptions(algo="bpe", vocab_size=500),
        TrainOptions(algo="bpe", vocab_size=700, byte_fallback=True, pre_tokenizer="metaspace"),
        TrainOptions(algo="bpe", vocab_size=200, byte_level=False, character_coverage=0.98),
        TrainOptions(algo="wordpiece", vocab_size=300, min_frequency=2),
        TrainOptions(algo="wordpiece", vocab_size=300, character_coverage=0.99),
    ],
    ids=["byte-level", "byte-fallback", "coverage", "wordpiece", "wordpiece-coverage"],
)
def test_both_engines_write_the_same_tokenizer(tmp_path, options):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(synthetic_lines(500, seed=2)) + "\n", encoding="utf-8")
    outputs = []
    for engine in ("hf", "reference"):
        options.engine = engine
        tok, summary = train_tokenizer(Corpus([str(path)]), options.resolved())
        outputs.append(tok.to_str())
        assert summary["vocab_size"] <= options.vocab_size
    assert outputs[0] == outputs[1]


def test_hf_wordpiece_is_deterministic_with_seeded_prefix_tokens(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(synthetic_lines(300, seed=3)) + "\n", encoding="utf-8")
    options = TrainOptions(algo="wordpiece", vocab_size=250).resolved()
    runs = {train_tokenizer(Corpus([str(path)]), options)[0].to_str() for _ in range(4)}
    assert len(runs) == 1
