"""Metrics and aggregations as lm-evaluation-harness defines them (``lm_eval/api/metrics.py``).

- ``acc``: argmax of the choices' log-likelihoods is the gold index; ``acc_norm``: the same with each
  log-likelihood divided by its choice's length in characters; mean over documents, stderr
  ``sample_stddev / sqrt(n)`` (n - 1 in the variance);
- ``word_perplexity`` / ``byte_perplexity``: ``exp(-sum(loglikelihood) / sum(words or bytes))`` with
  words counted as ``len(re.split(r"\\s+", text))`` and bytes as UTF-8 bytes; ``bits_per_byte``:
  ``-sum(loglikelihood) / sum(bytes) / ln 2``; ``token_perplexity`` (llmctl's addition):
  ``exp(-sum(loglikelihood) / sum(tokens))``;
- ``exact_match``: equality after removing ``regexes_to_ignore`` and optional case/punctuation folding
  (Hugging Face ``evaluate``'s exact_match, which lm-eval uses);
- ``ece``: expected calibration error over 15 equal-width confidence bins (Guo et al., 2017).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mean_stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def argmax(values: Sequence[float]) -> int:
    """First index of the maximum (numpy's tie rule, as lm-eval uses np.argmax)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def multiple_choice(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    pred = argmax(lls)
    pred_norm = argmax([ll / float(len(c)) for ll, c in zip(lls, choices, strict=True)])
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}


def words_of(text: str) -> int:
    return len(re.split(r"\s+", text))


def weighted_perplexity(pairs: Sequence[tuple[float, float]]) -> float:
    return math.exp(-sum(ll for ll, _ in pairs) / sum(w for _, w in pairs))


def bits_per_byte(pairs: Sequence[tuple[float, float]]) -> float:
    return -sum(ll for ll, _ in pairs) / sum(w for _, w in pairs) / math.log(2)


def exact_match(
    prediction: str,
    reference: str,
    *,
    regexes_to_ignore: Sequence[str] = (),
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
) -> float:
    for pattern in regexes_to_ignore:
        prediction = re.sub(pattern, "", prediction)
        reference = re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[float], bins: int = 15
) -> float:
    """Sum over equal-width bins of |accuracy - confidence| weighted by the bin's share of samples."""
    n = len(confidences)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if (lo < c <= hi) or (b == 0 and c == 0)]
        if idx:
            acc = mean([correct[i] for i in idx])
            conf = mean([confidences[i] for i in idx])
            total += len(idx) / n * abs(acc - conf)
    return total


def apply_filters(text: str, steps: Sequence[dict]) -> str:
    """lm-eval's ``regex`` then ``take_first`` filter chain, for one response."""
    out = text
    for step in steps:
        fn = step.get("function")
        if fn == "regex":
            pattern = re.compile(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"))
            group_select = int(step.get("group_select", 0))
            fallback = step.get("fallback", "[invalid]")
            matches = pattern.findall(out)
            if matches:
                match = matches[group_select]
                if isinstance(match, tuple):
                    match = [m for m in match if m]
                    match = match[0] if match else fallback
                out = match.strip()
            else:
                out = fallback
        elif fn in ("take_first", None):
            continue
        elif fn == "lowercase":
            out = out.lower()
        elif fn == "remove_whitespace":
            out = out.lstrip()
        else:
            raise ValueError(f"filter function {fn!r} is not supported")
    return out
