"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023).

Each round the small draft model proposes ``k`` tokens one by one, sampling from its own processed
distribution q; the target model scores the last emitted token and all ``k`` drafts in one forward pass,
giving p at every position. Draft token ``d`` at position i is accepted with probability
``min(1, p_i(d) / q_i(d))``; at the first rejection a replacement is sampled from
``norm(max(0, p_i - q_i))`` and the round ends; when all ``k`` are accepted, a bonus token is sampled from
``p_{k+1}``. Every emitted token is then distributed exactly as the target's own sampler would produce it
(the theorem of both papers), and for greedy decoding (p and q one-hot at their argmax) the output is
token-identical to plain greedy decoding of the target.

p and q are the *processed* distributions: the same penalties, logit bias, temperature, top-k/top-p/min-p
as plain sampling (:mod:`llmctl.core.generate.sampling`), applied with each position's own context.
The draft must share the target's vocabulary (same tokenizer), as in vLLM and transformers' assisted
generation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmctl.core.errors import UsageError
from llmctl.core.generate import cpu_kernels
from llmctl.core.generate.engine import Completion, Engine, Request, advance, check_rows, expand, finish_text
from llmctl.core.generate.lookup import LookupStats, _forward
from llmctl.core.generate.model import KVCache
from llmctl.core.generate.sampling import SamplingParams, process_logits, warp

SpeculativeStats = LookupStats  # rounds, drafted and accepted tokens, acceptance rate

DRAFT_SEED_OFFSET = 0x5EED  # the draft's sampler is seeded with the request's seed + this (serve too)


class DraftVocab:
    """The draft's logits over part of the vocabulary: the ``size`` lowest token ids, the special tokens
    and every token of the request so far (prompt and output); every other token gets ``-inf``.

    A draft model's vocabulary head costs as much as its embedding table (SmolLM2's 49152 x 576 is more
    than a 6-layer draft's decoder layers), while the tokens it proposes come from a small part of it:
    FR-Spec (Zhao et al. 2025, https://arxiv.org/abs/2502.14856) restricts the draft's head to the most
    frequent tokens. For byte-level BPE (and SentencePiece) tokenizers the ids run in merge (score) order,
    roughly by frequency in the tokenizer's training text, so the lowest ids are the frequent ones; on
    SmolLM2's own completions the lowest 8192 ids cover about 90% of tokens, and 98% with the prompt's
    tokens when the answer quotes the prompt. The lowest ids are the first rows of the head's weight, a view:
    nothing is copied. The rest (request tokens above ``size``) are gathered into a small matrix that grows
    as new tokens appear.

    Exactness is untouched: the draft's distribution q is zero outside the subset, and the acceptance rule
    (accept with min(1, p/q), else resample from norm(max(0, p - q))) is exact for any q; greedy drafts are
    the subset's argmax. Only the acceptance rate can change."""

    def __init__(self, draft: Engine, size: int) -> None:
        head = draft.model.lm_head
        if type(head) is not torch.nn.Linear:
            raise UsageError(
                f"--draft-vocab needs a plain linear vocabulary head; this draft's is {type(head).__name__}"
            )
        if size < 1:
            raise UsageError(f"--draft-vocab {size}: must be at least 1 (0 turns it off)")
        self.head = head
        self.vocab = draft.model.args.vocab_size
        self.size = min(size, self.vocab)
        self.always = {*draft.eos_token_ids, *getattr(draft.tokenizer, "all_special_ids", ())}
        self.linear = cpu_kernels.linear if getattr(draft.model, "_kernel", False) else F.linear

    def for_request(self, prompt: list[int], params: SamplingParams | None = None) -> _RequestVocab:
        """A request's head: the lowest ids, the specials, the prompt's tokens and those its
        ``logit_bias`` favours."""
        favoured = [int(t) for t, bias in params.logit_bias.items() if bias > 0] if params else []
        return _RequestVocab(self, [*prompt, *favoured])

    def _top(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of the ``size`` lowest ids, ``-inf`` for every other token."""
        head = self.head
        bias = None if head.bias is None else head.bias[: self.size]
        out = h.new_full((*h.shape[:-1], self.vocab), float("-inf"))
        out[..., : self.size] = self.linear(h, head.weight[: self.size], bias)
        return out

    def rows(self, heads: list[_RequestVocab]) -> Callable[[torch.Tensor], torch.Tensor]:
        """A head for hidden states ``[R, hidden]`` whose row i belongs to the request of ``heads[i]``."""

        def head(h: torch.Tensor) -> torch.Tensor:
            out = self._top(h)
            for i, one in enumerate(heads):
                if one.extra:
                    out[i, one.ids] = self.linear(h[i], one.weight, one.bias)
            return out

        return head


class _RequestVocab:
    """One request's draft head (see :class:`DraftVocab`): call it on final-norm hidden states."""

    def __init__(self, vocab: DraftVocab, tokens: list[int]) -> None:
        self.v = vocab
        self.extra: list[int] = []
        self.seen: set[int] = set()
        self.followed = 0
        self.add([*sorted(vocab.always), *tokens])

    def add(self, tokens) -> None:
        """Include these token ids from now on."""
        new = {t for t in tokens if self.v.size <= t < self.v.vocab and t not in self.seen}
        if not new:
            return
        self.seen.update(new)
        self.extra += sorted(new)
        weight, bias = self.v.head.weight.detach(), self.v.head.bias
        self.ids = torch.tensor(self.extra, device=weight.device)
        self.weight = weight.index_select(0, self.ids)
        self.bias = None if bias is None else bias.detach().index_select(0, self.ids)

    def follow(self, tokens: list[int]) -> None:
        """Include the tokens of a growing list (a completion) added since the last call."""
        self.add(tokens[self.followed :])
        self.followed = len(tokens)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        out = self.v._top(h)
        if self.extra:
            out[..., self.ids] = self.v.linear(h, self.weight, self.bias)
        return out


def check_draft(target: Engine, draft: Engine) -> None:
    """Refuse a draft whose token ids mean something else than the target's."""
    t_vocab, d_vocab = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if t_vocab != d_vocab:
        raise UsageError(
            f"the draft model's vocabulary ({len(d_vocab)} tokens) differs from the target's "
            f"({len(t_vocab)}): speculative decoding needs the same tokenizer"
        )
    if draft.model.args.vocab_size != target.model.args.vocab_size:
        raise UsageError(
            f"the draft model's output size ({draft.model.args.vocab_size}) differs from the target's "
            f"({target.model.args.vocab_size}): speculative decoding needs the same vocabulary"
        )


def distribution(logits: torch.Tensor, params: SamplingParams, context: list[int], counts: Counter):
    """The processed next-token distribution one sampling step draws from (one-hot argmax when greedy)."""
    row = process_logits(logits.float().clone(), params, context, counts)
    if params.greedy:
        probs = torch.zeros_like(row)
        probs[int(row.argmax())] = 1.0
        return probs
    return warp(row, params).softmax(-1)


def draft_probability(logits: torch.Tensor, token: int) -> float:
    """The draft's own probability of ``token`` (softmax of its raw logits): how sure it is."""
    return float(logits.float().softmax(-1)[token])


def check_confidence(value: float) -> None:
    """``--draft-confidence``: a probability below 1 (0 turns it off)."""
    if not 0.0 <= value < 1.0:
        raise UsageError(f"--draft-confidence {value}: must be in [0, 1)")


def pick(dist: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from a processed distribution: its argmax when greedy, else a draw with ``generator``."""
    return int(dist.argmax()) if params.greedy else int(torch.multinomial(dist, 1, generator=generator))


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor, token: int, generator: torch.Generator | None
) -> tuple[int, bool]:
    """Leviathan/Chen's rule for one draft token: (token, True) if accepted, else (replacement, False)."""
    q_token = float(q[token])
    ratio = float(p[token]) / q_token if q_token > 0 else 0.0
    if ratio >= 1.0:
        return token, True
    u = float(torch.rand((), generator=generator, device=p.device))
    if u < ratio:
        return token, True
    residual = (p - q).clamp(min=0)
    total = float(residual.sum())
    if total <= 0:  # p == q numerically: any sample from p is right
        residual = p
    return int(torch.multinomial(residual, 1, generator=generator)), False


def generate_speculative(
    engine: Engine,
    draft: Engine,
    request: Request,
    *,
    num_draft: int = 4,
    stats: SpeculativeStats | None = None,
    on_token: Callable[[int, str], None] | None = None,
    draft_vocab: DraftVocab | None = None,
    min_confidence: float = 0.0,
) -> list[Completion]:
    """``request``'s completions (``n`` of them, one after another) by speculative decoding: up to
    ``num_draft`` draft tokens per round, fewer when the draft gives a token a probability below
    ``min_confidence`` (the round's drafting stops after it, as transformers' assistant confidence
    threshold does); ``draft_vocab`` restricts the draft's head (:class:`DraftVocab`)."""
    if num_draft < 1:
        raise UsageError("--num-draft-tokens must be at least 1")
    check_confidence(min_confidence)
    stats = stats if stats is not None else SpeculativeStats()
    rows = expand([request])
    check_rows(engine, rows)
    return [_one(engine, draft, r, stats, on_token, num_draft, draft_vocab, min_confidence) for r in rows]


@dataclass
class _Side:
    """One model's cache and how many of its slots hold accepted tokens."""

    engine: Engine
    cache: KVCache
    filled: int = 0


@torch.inference_mode()
def _one(
    engine: Engine, draft: Engine, r: Request, stats: SpeculativeStats, on_token, k: int, vocab, confidence
) -> Completion:
    params, prompt = r.params, r.prompt_ids
    head = vocab.for_request(prompt, params) if vocab is not None else None
    total = len(prompt) + params.max_tokens + k + 2
    target = _Side(engine, KVCache(engine.model.args, 1, total, engine.device, engine.dtype))
    small = _Side(draft, KVCache(draft.model.args, 1, total, draft.device, draft.dtype))
    gen_target = _generator(params.seed, engine.device)
    gen_draft = _generator(params.seed + DRAFT_SEED_OFFSET, draft.device)

    out = Completion(prompt_tokens=len(prompt))
    counts: Counter = Counter()
    logits = _forward(engine.model, target.cache, prompt, 0, last_only=True)[-1]
    target.filled = len(prompt)
    if len(prompt) > 1:
        _forward(draft.model, small.cache, prompt[:-1], 0, head, last_only=True)  # fills the cache
    small.filled = len(prompt) - 1
    pending = [prompt[-1]]  # accepted tokens the draft has not consumed yet

    # The first token comes from the target alone (its prefill already gives the distribution).
    p = distribution(logits, params, prompt, counts)
    token = pick(p, params, gen_target)
    while True:
        advance(engine, out, r, token, counts, on_token, 0)
        if out.finish_reason == "stop" or len(out.token_ids) >= params.max_tokens:
            break
        pending.append(token)
        if head is not None:  # a replacement or bonus token the draft's subset may not hold yet
            head.add([token])
        room = params.max_tokens - len(out.token_ids)
        n_draft = min(k, room - 1) if room > 1 else 0

        # Draft n_draft tokens autoregressively, keeping each q.
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        context = prompt + out.token_ids
        d_counts = Counter(counts)
        base, n_pending = small.filled, len(pending)
        for _ in range(n_draft):
            block = pending if not drafts else [drafts[-1]]
            d_logits = _forward(draft.model, small.cache, block, small.filled, head)[-1]
            small.filled += len(block)
            q = distribution(d_logits, params, context + drafts, d_counts)
            d = pick(q, params, gen_draft)
            drafts.append(d)
            qs.append(q)
            d_counts[d] += 1
            if confidence and draft_probability(d_logits, d) < confidence:
                break  # the draft is unsure: verify what it has (the bookkeeping below uses len(drafts))

        # Score [token, drafts...] with the target in one pass: p at each draft position and one beyond.
        t_logits = _forward(engine.model, target.cache, [token] + drafts, target.filled)
        stats.steps += 1
        stats.drafted += len(drafts)
        accepted: list[int] = []
        t_counts = Counter(counts)
        replacement = None
        for i, d in enumerate(drafts):
            p = distribution(t_logits[i], params, context + accepted, t_counts)
            chosen, ok = accept_or_resample(p, qs[i], d, gen_target)
            if not ok:
                replacement = chosen
                break
            accepted.append(d)
            t_counts[d] += 1
        stats.accepted += len(accepted)
        if replacement is None:  # every draft accepted: the bonus token from the last position
            p = distribution(t_logits[len(drafts)], params, context + accepted, t_counts)
            replacement = pick(p, params, gen_target)
        target.filled += 1 + len(accepted)  # slots of rejected drafts are overwritten next round
        if drafts:  # the draft consumed pending + drafts[:-1]: keep its accepted part, feed the rest later
            small.filled = base + n_pending + min(len(accepted), len(drafts) - 1)
            pending = accepted[len(drafts) - 1 :]  # the last draft, when every draft was accepted
        for t in accepted:
            advance(engine, out, r, t, counts, on_token, 0)
            if out.finish_reason == "stop" or len(out.token_ids) >= params.max_tokens:
                finish_text(engine, out, on_token)
                return out
        token = replacement
    finish_text(engine, out, on_token)
    return out


def _generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
