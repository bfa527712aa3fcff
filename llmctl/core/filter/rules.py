"""Quality filter rules: a registry of published heuristics with their published thresholds.

Each rule has a name, a reference, default parameters (every one overridable from YAML) and a ``check``
that returns the name of the first failed test (``None`` when the document passes) and, for rules that
clean text (C4's line filters), the new text. The thresholds follow the papers and datatrove's
implementations, which produced FineWeb.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmctl.core.filter import text as T

Check = Callable[[str, dict[str, Any]], tuple[str | None, str | None]]


@dataclass(frozen=True)
class Rule:
    name: str
    reference: str
    defaults: dict[str, Any]
    check: Check  # (text, params) -> (failed test or None, cleaned text or None)


# -- Gopher quality (Rae et al. 2021, "Scaling Language Models", appendix A.1.1) -------------------------
GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
BULLETS = ("•", "●", "◦", "▪", "‣", "-", "*")


def gopher_quality(text: str, p: dict[str, Any]) -> tuple[str | None, str | None]:
    toks = T.tokens(text)
    ws = [t for t in toks if not T.is_punct(t)]
    n = len(ws)
    if n < p["min_doc_words"]:
        return "min_doc_words", None
    if n > p["max_doc_words"]:
        return "max_doc_words", None
    mean = sum(len(w) for w in ws) / n
    if mean < p["min_avg_word_length"]:
        return "min_avg_word_length", None
    if mean > p["max_avg_word_length"]:
        return "max_avg_word_length", None
    if text.count("#") / n > p["max_symbol_word_ratio"]:
        return "max_symbol_word_ratio(#)", None
    if (text.count("...") + text.count("…")) / n > p["max_symbol_word_ratio"]:
        return "max_symbol_word_ratio(...)", None
    ls = text.splitlines() or [""]
    if sum(line.lstrip().startswith(BULLETS) for line in ls) / len(ls) > p["max_bullet_lines_ratio"]:
        return "max_bullet_lines_ratio", None
    ellipsis = sum(line.rstrip().endswith(("...", "…")) for line in ls)
    if ellipsis / len(ls) > p["max_ellipsis_lines_ratio"]:
        return "max_ellipsis_lines_ratio", None
    if sum(any(c.isalpha() for c in w) for w in ws) / n < p["min_alpha_words_ratio"]:
        return "min_alpha_words_ratio", None
    stop = set(p["stop_words"])
    if sum(w.lower() in stop for w in ws) < p["min_stop_words"]:
        return "min_stop_words", None
    return None, None


# -- Gopher repetition (Rae et al. 2021, table A1) -------------------------------------------------------
def gopher_repetition(text: str, p: dict[str, Any]) -> tuple[str | None, str | None]:
    chars = max(len(text), 1)
    paras = T.paragraphs(text)
    count, dup_chars = T.duplicates(paras)
    if paras and count / len(paras) > p["max_dup_para_frac"]:
        return "max_dup_para_frac", None
    if dup_chars / chars > p["max_dup_para_char_frac"]:
        return "max_dup_para_char_frac", None
    ls = [line for line in re.split(r"\n+", text) if line.strip()]
    count, dup_chars = T.duplicates(ls)
    if ls and count / len(ls) > p["max_dup_line_frac"]:
        return "max_dup_line_frac", None
    if dup_chars / chars > p["max_dup_line_char_frac"]:
        return "max_dup_line_char_frac", None
    ws = T.words(text)
    for n, limit in sorted(p["max_top_ngram_char_frac"].items()):
        if T.top_ngram_char_fraction(ws, int(n)) > limit:
            return f"max_top_ngram_char_frac({n})", None
    for n, limit in sorted(p["max_dup_ngram_char_frac"].items()):
        if T.duplicate_ngram_char_fraction(ws, int(n)) > limit:
            return f"max_dup_ngram_char_frac({n})", None
    return None, None


# -- C4 (Raffel et al. 2020, section 2.2): line cleaning, then document rules ----------------------------
C4_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
C4_END = (".", "!", "?", '"', "'")


def c4(text: str, p: dict[str, Any]) -> tuple[str | None, str | None]:
    lower = text.lower()
    if p["filter_lorem_ipsum"] and "lorem ipsum" in lower:
        return "lorem_ipsum", None
    if p["filter_curly_bracket"] and "{" in text:
        return "curly_bracket", None
    kept = []
    for line in text.split("\n"):
        line = line.strip()
        low = line.lower()
        if not line.endswith(C4_END) or line.endswith(("...", "…")):
            continue
        if len(T.words(line)) < p["min_words_per_line"]:
            continue
        if any(len(w) > p["max_word_length"] for w in line.split()):
            continue
        if p["filter_javascript"] and "javascript" in low:
            continue
        if p["filter_policy"] and any(phrase in low for phrase in C4_POLICY):
            continue
        kept.append(line)
    cleaned = "\n".join(kept)
    if T.count_sentences(cleaned) < p["min_sentences"]:
        return "min_sentences", None
    return None, cleaned if p["edit_lines"] else None


# -- FineWeb (Penedo et al. 2024, section 3.3: its own three filters; datatrove adds the list ratio) ------
FINEWEB_END = (".", "'", '"', "!", "?")


def fineweb(text: str, p: dict[str, Any]) -> tuple[str | None, str | None]:
    ls = text.split("\n")
    if sum(line.endswith(FINEWEB_END) for line in ls) / len(ls) <= p["min_line_punct_ratio"]:
        return "min_line_punct_ratio", None
    if sum(len(line) <= p["short_line_length"] for line in ls) / len(ls) >= p["max_short_line_ratio"]:
        return "max_short_line_ratio", None
    non_empty = [line for line in ls if line.strip()]
    body = max(len(text.replace("\n", "")), 1)
    if T.duplicates(non_empty)[1] / body >= p["max_dup_line_char_ratio"]:
        return "max_dup_line_char_ratio", None
    n_words = max(len(T.tokens(text)), 1)
    if text.count("\n") / n_words > p["max_newline_word_ratio"]:
        return "max_newline_word_ratio", None
    return None, None


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule(
            "gopher-quality",
            "https://arxiv.org/abs/2112.11446",
            {
                "min_doc_words": 50, "max_doc_words": 100_000, "min_avg_word_length": 3,
                "max_avg_word_length": 10, "max_symbol_word_ratio": 0.1, "max_bullet_lines_ratio": 0.9,
                "max_ellipsis_lines_ratio": 0.3, "min_alpha_words_ratio": 0.8, "min_stop_words": 2,
                "stop_words": list(GOPHER_STOP_WORDS),
            },
            gopher_quality,
        ),
        Rule(
            "gopher-repetition",
            "https://arxiv.org/abs/2112.11446",
            {
                "max_dup_line_frac": 0.30, "max_dup_para_frac": 0.30, "max_dup_line_char_frac": 0.20,
                "max_dup_para_char_frac": 0.20,
                "max_top_ngram_char_frac": {2: 0.20, 3: 0.18, 4: 0.16},
                "max_dup_ngram_char_frac": {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
            },
            gopher_repetition,
        ),
        Rule(
            "c4",
            "https://arxiv.org/abs/1910.10683",
            {
                "min_words_per_line": 3, "max_word_length": 1000, "min_sentences": 5,
                "filter_lorem_ipsum": True, "filter_curly_bracket": True, "filter_javascript": True,
                "filter_policy": True, "edit_lines": True,
            },
            c4,
        ),
        Rule(
            "fineweb",
            "https://arxiv.org/abs/2406.17557",
            {
                "min_line_punct_ratio": 0.12, "max_short_line_ratio": 0.67, "short_line_length": 30,
                "max_dup_line_char_ratio": 0.01, "max_newline_word_ratio": 0.3,
            },
            fineweb,
        ),
    )
}  # fmt: skip
