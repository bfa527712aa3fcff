"""Reference Unigram: Viterbi and forward-backward by hand, and compression comparable to HF's trainer."""

import math

import pytest

from llmctl.core.tokenize.train import Corpus, TrainOptions, train_tokenizer
from llmctl.core.tokenize.unigram import digamma, expected_counts, is_valid_piece, train_unigram, viterbi
from tests.core.tokenize.test_train_bpe import synthetic_lines

LOGP = {
    "a": math.log(0.3),
    "b": math.log(0.3),
    "ab": math.log(0.2),
    "abc": math.log(0.05),
    "c": math.log(0.15),
}


def test_viterbi_finds_the_most_probable_segmentation():
    score, pieces = viterbi("abc", LOGP, 16)
    # candidates: a|b|c = .3*.3*.15 = .0135, ab|c = .2*.15 = .03, abc = .05
    assert pieces == ["abc"]
    assert score == pytest.approx(math.log(0.05))
    assert viterbi("abab", LOGP, 16)[1] == ["ab", "ab"]
    assert viterbi("abd", LOGP, 16) == (-math.inf, [])


def test_expected_counts_weigh_every_segmentation_by_its_probability():
    counts = expected_counts("abc", LOGP, 16)
    z = 0.0135 + 0.03 + 0.05
    assert counts["abc"] == pytest.approx(0.05 / z)
    assert counts["ab"] == pytest.approx(0.03 / z)
    assert counts["a"] == pytest.approx(0.0135 / z)
    assert counts["c"] == pytest.approx((0.0135 + 0.03) / z)


def test_digamma_matches_known_values():
    assert digamma(1.0) == pytest.approx(-0.5772156649, abs=1e-9)
    assert digamma(0.5) == pytest.approx(-1.9635100260, abs=1e-9)
    assert digamma(100.0) == pytest.approx(4.6001618527, abs=1e-9)


def test_pieces_do_not_cross_word_starts_or_mix_letters_digits_and_punctuation():
    assert is_valid_piece("▁the") and is_valid_piece("ing") and is_valid_piece("▁")
    assert not is_valid_piece("e▁t") and not is_valid_piece("a1") and not is_valid_piece("d,")


def test_train_unigram_returns_specials_first_then_pieces_by_score_and_every_character():
    counts = {"▁lower": 5, "▁lowest": 3, "▁newer": 6, "▁newest": 2, "▁low": 7, "▁new": 4}
    pieces = train_unigram(counts, 20, special_tokens=["<unk>"])
    assert pieces[0] == ("<unk>", 0.0)
    assert len(pieces) <= 20
    scores = [s for _, s in pieces[1:]]
    assert scores == sorted(scores, reverse=True)
    assert {ch for word in counts for ch in word} <= {p for p, _ in pieces}
    assert any(len(p) > 2 for p, _ in pieces)


def test_reference_unigram_compresses_within_ten_percent_of_hf(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(synthetic_lines(1500, seed=4)) + "\n", encoding="utf-8")
    results = {}
    for engine in ("hf", "reference"):
        options = TrainOptions(algo="unigram", vocab_size=150, engine=engine).resolved()
        _, summary = train_tokenizer(Corpus([str(path)]), options)
        assert summary["vocab_size"] <= 150
        assert summary["unk_rate"] == 0.0
        results[engine] = summary["bytes_per_token"]
    assert results["reference"] >= 0.9 * results["hf"], results


def test_hf_unigram_output_is_deterministic(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(synthetic_lines(300, seed=5)) + "\n", encoding="utf-8")
    options = TrainOptions(algo="unigram", vocab_size=120).resolved()
    assert len({train_tokenizer(Corpus([str(path)]), options)[0].to_str() for _ in range(3)}) == 1


@pytest.mark.parametrize("engine", ["hf", "reference"])
def test_character_coverage_leaves_rare_characters_out_of_the_vocabulary(tmp_path, engine):
    path = tmp_path / "corpus.txt"
    lines = synthetic_lines(600, seed=6) + ["rare: ж ѣ ǆ"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    options = TrainOptions(algo="unigram", vocab_size=150, character_coverage=0.995, engine=engine).resolved()
    tok, summary = train_tokenizer(Corpus([str(path)]), options)
    vocab = tok.get_vocab()
    assert not any(ch in piece for piece in vocab for ch in "жѣǆ")
    assert "e" in vocab and summary["alphabet_size"] < len(set("".join(lines)))
    ids = tok.encode("the ж").ids
    assert tok.token_to_id("<unk>") in ids
