"""Reference Unigram trainer (Kudo 2018, https://arxiv.org/abs/1804.10959), the model SentencePiece uses.

A unigram language model over pieces: a word's probability is the product of its pieces' probabilities,
and a word is cut into the most probable sequence of pieces (Viterbi). Training:

1. Seed: every substring (up to ``max_piece_length`` characters) of the distinct words that
   :func:`is_valid_piece` allows and that occurs more than once, scored by frequency x length; the
   ``seed_size`` best are kept, and every character always.
2. EM: the E-step counts each piece's expected uses over all segmentations of each word
   (forward-backward), weighted by word counts; the M-step sets
   ``log p = digamma(count) - digamma(total)`` (SentencePiece's Bayesian M-step: the digamma penalises
   rare pieces, which keeps whole rare words out of the vocabulary).
3. Prune (with Viterbi, the segmentation used at encoding time): a piece's loss is how much the corpus
   log-likelihood drops without it, approximated as
   ``count x (log p(piece) - log p(best segmentation of the piece without it))``. Keep the pieces with
   the largest losses (a ``shrinking_factor`` fraction per round, single characters always) until
   ``vocab_size`` is reached; then a last EM step sets the final scores.

Readable rather than fast: the default engine (Hugging Face ``tokenizers``' UnigramTrainer) is the fast
path, and tests hold this one to comparable compression, not identical pieces (seeds, cut-offs and the
pruning loss differ in their details).
"""

from __future__ import annotations

import math
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping

from llmctl.core.tokenize.pretokenize import METASPACE


def viterbi(word: str, logp: Mapping[str, float], max_len: int) -> tuple[float, list[str]]:
    """The most probable segmentation of ``word`` into pieces of ``logp``; (-inf, []) when there is none."""
    n = len(word)
    best = [-math.inf] * (n + 1)  # best[j]: log-probability of the best cut of word[:j]
    back = [0] * (n + 1)  # back[j]: where the last piece of that cut starts
    best[0] = 0.0
    for j in range(1, n + 1):
        for i in range(max(0, j - max_len), j):
            if best[i] == -math.inf:
                continue
            lp = logp.get(word[i:j])
            if lp is not None and best[i] + lp > best[j]:
                best[j], back[j] = best[i] + lp, i
    if best[n] == -math.inf:
        return -math.inf, []
    pieces, j = [], n
    while j > 0:
        pieces.append(word[back[j] : j])
        j = back[j]
    return best[n], pieces[::-1]


def _kind(ch: str) -> str:
    cat = unicodedata.category(ch)
    return "L" if cat[0] in "LM" else "N" if cat[0] == "N" else "P"


def is_valid_piece(piece: str, space: str = METASPACE) -> bool:
    """SentencePiece's rules, simplified: a word boundary ("▁") only at the start, and no piece mixing
    letters, digits and punctuation (a stand-in for its split by Unicode script and by number)."""
    body = piece[1:] if piece.startswith(space) else piece
    if space in body:
        return False
    return len({_kind(ch) for ch in body}) <= 1


def _seed(word_counts: Mapping[str, int], max_len: int, seed_size: int, chars: set[str]) -> dict[str, int]:
    freq: dict[str, int] = defaultdict(int)  # substring -> occurrences
    for word, n in word_counts.items():
        for i in range(len(word)):
            for j in range(i + 1, min(len(word), i + max_len) + 1):
                freq[word[i:j]] += n
    # Substrings seen once are left out, as SentencePiece leaves them out: they would only memorise.
    multi = sorted(
        (p for p in freq if len(p) > 1 and freq[p] > 1 and is_valid_piece(p)),
        key=lambda p: (-freq[p] * len(p), p),
    )[:seed_size]
    seed = {p: freq[p] for p in multi}
    for ch in chars:
        seed[ch] = freq.get(ch, 1)
    return seed


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def expected_counts(word: str, logp: Mapping[str, float], max_len: int) -> dict[str, float]:
    """E-step for one word: each piece's expected number of uses over all segmentations (forward-backward)."""
    n = len(word)
    alpha = [-math.inf] * (n + 1)  # alpha[j]: log of the summed probability of all cuts of word[:j]
    beta = [-math.inf] * (n + 1)  # beta[i]: the same for word[i:]
    alpha[0] = beta[n] = 0.0
    edges = []  # (i, j, log p) for every piece word[i:j] in the vocabulary
    for j in range(1, n + 1):
        for i in range(max(0, j - max_len), j):
            lp = logp.get(word[i:j])
            if lp is not None:
                edges.append((i, j, lp))
                alpha[j] = _logaddexp(alpha[j], alpha[i] + lp)
    for i, j, lp in reversed(edges):
        beta[i] = _logaddexp(beta[i], lp + beta[j])
    z = alpha[n]
    out: dict[str, float] = defaultdict(float)
    if z == -math.inf:
        return out
    for i, j, lp in edges:
        out[word[i:j]] += math.exp(alpha[i] + lp + beta[j] - z)
    return out


def _em_step(word_counts: Mapping[str, int], logp: dict[str, float], max_len: int, chars: set[str]):
    counts: dict[str, float] = defaultdict(float)  # piece -> expected uses, weighted by word counts
    for word, n in word_counts.items():
        for piece, c in expected_counts(word, logp, max_len).items():
            counts[piece] += n * c
    counts = {p: c for p, c in counts.items() if c >= 0.5 or p in chars}  # SentencePiece's cut-off
    for ch in chars:  # characters stay, however rare, so that every word can be cut
        counts[ch] = max(counts.get(ch, 0.0), 0.5)
    total = digamma(sum(counts.values()))
    return {p: digamma(c) - total for p, c in counts.items() if c > 0}, counts


def digamma(x: float) -> float:
    """psi(x) for x > 0: the recurrence up to x >= 10, then the asymptotic series."""
    result = 0.0
    while x < 10.0:
        result -= 1.0 / x
        x += 1.0
    inv2 = 1.0 / (x * x)
    return result + math.log(x) - 0.5 / x - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 / 252))


def train_unigram(
    word_counts: Mapping[str, int],
    vocab_size: int,
    *,
    special_tokens: Iterable[str] = (),
    alphabet: Iterable[str] = (),
    max_piece_length: int = 16,
    seed_size: int = 1_000_000,
    shrinking_factor: float = 0.75,
    n_sub_iterations: int = 2,
) -> list[tuple[str, float]]:
    """``[(piece, log-probability)]``: special tokens first (score 0), then pieces by score, best first."""
    specials = list(dict.fromkeys(special_tokens))
    chars = set(alphabet) or {ch for word in word_counts for ch in word}
    target = max(vocab_size - len(specials), len(chars))
    seed = _seed(word_counts, max_piece_length, seed_size, chars)
    total = sum(seed.values())
    logp = {p: math.log(c / total) for p, c in seed.items()}
    while True:
        for _ in range(n_sub_iterations):
            logp, counts = _em_step(word_counts, logp, max_piece_length, chars)
        if len(logp) <= target:
            break
        loss: dict[str, float] = {}
        for piece in [p for p in logp if p not in chars]:
            lp = logp.pop(piece)  # the piece's best cut without itself, then put it back
            alt = viterbi(piece, logp, max_piece_length)[0]
            logp[piece] = lp
            loss[piece] = counts[piece] * (lp - alt)
        keep = max(target, int(len(logp) * shrinking_factor)) - len(chars)
        kept = sorted(loss, key=lambda p: (-loss[p], p))[: max(keep, 0)]
        logp = {p: logp[p] for p in (*kept, *chars)}
    multi = sorted((p for p in logp if p not in chars and p not in specials), key=lambda p: (-logp[p], p))
    kept = set(multi[: max(target - len(chars), 0)]) | (chars - set(specials))
    pieces = sorted(((p, logp[p]) for p in kept), key=lambda kv: (-kv[1], kv[0]))
    return [(s, 0.0) for s in specials] + pieces
