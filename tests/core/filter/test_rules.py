"""Each quality rule on hand-made documents at both sides of each of its thresholds."""

from __future__ import annotations

import pytest

from llmctl.core.errors import UsageError
from llmctl.core.filter import RULES, rule_params
from llmctl.core.filter.apply import check

WORDS = "garden river mountain window yellow market silver winter pocket candle forest bridge".split()


def verdict(rule: str, text: str, **overrides) -> str | None:
    params = rule_params([rule], {rule: overrides} if overrides else None)[rule]
    return RULES[rule].check(text, params)[0]


def words(n: int, *pattern: str) -> str:
    pattern = pattern or ("the", "garden")
    return " ".join(pattern[i % len(pattern)] for i in range(n))


def sentences(n: int, words_each: int = 8) -> list[str]:
    """``n`` distinct lines, each a sentence over 30 characters ending with a full stop."""
    out = []
    for i in range(n):
        body = [WORDS[(i * 7 + k * 3 + k * k) % len(WORDS)] for k in range(words_each - 3)]
        out.append(f"The {' '.join(body)} number {i} is here.")
    return out


GOPHER_QUALITY = [
    # (test name, passing text, failing text, overrides that isolate the test)
    ("min_doc_words", words(50), words(49), {}),
    ("max_doc_words", words(60), words(61), {"max_doc_words": 60}),
    (
        "min_avg_word_length",
        words(50, *["with"] * 25, *["to"] * 25),
        words(50, *["with"] * 24, *["to"] * 26),
        {},
    ),
    (
        "max_avg_word_length",
        words(50, *["extraordinarily"] * 29, *["the"] * 21),
        words(50, *["extraordinarily"] * 30, *["the"] * 20),
        {},
    ),
    ("max_symbol_word_ratio(#)", words(50) + " #" * 5, words(50) + " #" * 6, {}),
    ("max_symbol_word_ratio(...)", "the ... " * 5 + words(45), "the ... " * 6 + words(44), {}),
    (
        "max_bullet_lines_ratio",
        "\n".join(["• " + words(6)] * 9 + [words(6)]),
        "\n".join(["• " + words(6)] * 10),
        {"min_doc_words": 1},
    ),
    (
        "max_ellipsis_lines_ratio",
        "\n".join([words(6) + " ..."] * 3 + [words(6)] * 7),
        "\n".join([words(6) + " ..."] * 4 + [words(6)] * 6),
        {},
    ),
    ("min_alpha_words_ratio", words(40) + " 123" * 10, words(39) + " 123" * 11, {}),
    ("min_stop_words", words(48, *WORDS) + " the of", words(49, *WORDS) + " the", {}),
]


@pytest.mark.parametrize("test,passing,failing,overrides", GOPHER_QUALITY, ids=[c[0] for c in GOPHER_QUALITY])
def test_gopher_quality_at_both_sides_of_each_threshold(test, passing, failing, overrides):
    assert verdict("gopher-quality", passing, **overrides) is None
    assert verdict("gopher-quality", failing, **overrides) == test


LOOSE_REPETITION = {
    "max_dup_line_frac": 1.0, "max_dup_para_frac": 1.0, "max_dup_line_char_frac": 1.0,
    "max_dup_para_char_frac": 1.0, "max_top_ngram_char_frac": {2: 1, 3: 1, 4: 1},
    "max_dup_ngram_char_frac": {5: 1, 6: 1, 7: 1, 8: 1, 9: 1, 10: 1},
}  # fmt: skip
PARAS = sentences(10)


def _only(**keep):
    return {**LOOSE_REPETITION, **keep}


GOPHER_REPETITION = [
    (
        "max_dup_para_frac",
        "\n\n".join(PARAS[:7] + PARAS[:3]),
        "\n\n".join(PARAS[:6] + PARAS[:4]),
        _only(max_dup_para_frac=0.3),
    ),
    (
        "max_dup_line_frac",
        "\n".join(PARAS[:7] + PARAS[:3]),
        "\n".join(PARAS[:6] + PARAS[:4]),
        _only(max_dup_line_frac=0.3),
    ),
    ("max_dup_para_char_frac", "\n\n".join(PARAS[:9] + PARAS[:2]), "\n\n".join(PARAS[:7] + PARAS[:3]),
     _only(max_dup_para_char_frac=0.2)),
    ("max_dup_line_char_frac", "\n".join(PARAS[:9] + PARAS[:2]), "\n".join(PARAS[:7] + PARAS[:3]),
     _only(max_dup_line_char_frac=0.2)),
]  # fmt: skip


@pytest.mark.parametrize(
    "test,passing,failing,overrides", GOPHER_REPETITION, ids=[c[0] for c in GOPHER_REPETITION]
)
def test_gopher_repetition_line_and_paragraph_thresholds(test, passing, failing, overrides):
    assert verdict("gopher-repetition", passing, **overrides) is None
    assert verdict("gopher-repetition", failing, **overrides) == test


def test_gopher_repetition_ngram_thresholds():
    distinct = " ".join(f"w{i}x" for i in range(100))  # 100 words of 3 or 4 characters, no repeats
    assert verdict("gopher-repetition", distinct) is None
    # the bigram "aaa bbb" 16 times: 96 of 486 word characters (< 0.2) passes; 17 times (> 0.2) fails
    only_2 = {
        "max_top_ngram_char_frac": {3: 1, 4: 1},
        "max_dup_ngram_char_frac": {n: 1 for n in range(5, 11)},
    }
    assert verdict("gopher-repetition", distinct + " aaa bbb" * 16, **only_2) is None
    assert verdict("gopher-repetition", distinct + " aaa bbb" * 17, **only_2) == "max_top_ngram_char_frac(2)"
    # a repeated 10-gram covering < 10% of the characters passes the 10-gram limit, > 10% fails
    ten = " ".join(f"r{i}" for i in range(10))
    loose = {"max_top_ngram_char_frac": {2: 1, 3: 1, 4: 1},
             "max_dup_ngram_char_frac": {5: 1, 6: 1, 7: 1, 8: 1, 9: 1, 10: 0.10}}  # fmt: skip
    long_distinct = " ".join(f"w{i}x" for i in range(300))
    assert verdict("gopher-repetition", f"{ten} {long_distinct} {ten}", **loose) is None  # 40 of ~1130
    short_distinct = " ".join(f"w{i}x" for i in range(80))
    assert (
        verdict("gopher-repetition", f"{ten} {short_distinct} {ten}", **loose)
        == "max_dup_ngram_char_frac(10)"
    )


def test_c4_document_rules_and_line_cleaning():
    body = sentences(5)
    assert verdict("c4", "\n".join(body)) is None
    assert verdict("c4", "\n".join(body[:4])) == "min_sentences"
    assert verdict("c4", "\n".join(body + ["Lorem ipsum dolor sit amet."])) == "lorem_ipsum"
    assert verdict("c4", "\n".join(body + ["Code: { x } here."])) == "curly_bracket"
    noisy = body[:4] + [
        "Please enable JavaScript to view this page.",
        "Read our privacy policy for details.",
        "Too short.",
        "A line without terminal punctuation",
        "This line trails off...",
    ]
    assert verdict("c4", "\n".join(noisy)) == "min_sentences"  # only 4 good lines survive
    failed, cleaned = check("\n".join(noisy + [body[4]]), ["c4"], rule_params(["c4"]))
    assert failed is None and cleaned == "\n".join(body)


def test_fineweb_rules_at_both_sides_of_their_thresholds():
    lines = sentences(100)
    no_punct = [line.rstrip(".") for line in lines]
    # line punctuation ratio: 13 of 100 lines end with punctuation passes (> 0.12), 12 fails
    assert verdict("fineweb", "\n".join(lines[:13] + no_punct[13:])) is None
    assert verdict("fineweb", "\n".join(lines[:12] + no_punct[12:])) == "min_line_punct_ratio"
    # short lines (<= 30 characters): 66 of 100 passes, 67 fails
    short = [f"Short one {i}." for i in range(100)]
    assert verdict("fineweb", "\n".join(short[:66] + lines[66:]), max_newline_word_ratio=1) is None
    assert (
        verdict("fineweb", "\n".join(short[:67] + lines[67:]), max_newline_word_ratio=1)
        == "max_short_line_ratio"
    )
    # characters in duplicated lines: one repeated 11-character line in ~4,000 passes (< 0.01), many fail
    base = lines[:80]
    assert verdict("fineweb", "\n".join(base + ["Yes indeed."] * 2), max_short_line_ratio=1) is None
    assert verdict("fineweb", "\n".join(base + [base[0]] * 2)) == "max_dup_line_char_ratio"
    # newlines per token (punctuation counts, as with NLTK): 4-token lines (0.245) pass, 3 (0.327) fail
    four = [f"Item {i} good." for i in range(50)]
    three = [f"Item{i} good." for i in range(50)]
    assert verdict("fineweb", "\n".join(four), max_short_line_ratio=1.1) is None
    assert verdict("fineweb", "\n".join(three), max_short_line_ratio=1.1) == "max_newline_word_ratio"


def test_unknown_rules_and_parameters_are_usage_errors():
    with pytest.raises(UsageError, match="unknown parameter"):
        rule_params(["c4"], {"c4": {"min_sentencez": 3}})
    with pytest.raises(UsageError, match="unknown rule"):
        rule_params(["c4"], {"c5": {}})
