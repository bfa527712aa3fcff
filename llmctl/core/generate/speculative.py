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

from llmctl.core.errors import UsageError
from llmctl.core.generate.engine import Completion, Engine, Request, advance, check_rows, expand, finish_text
from llmctl.core.generate.lookup import LookupStats, _forward
from llmctl.core.generate.model import KVCache
from llmctl.core.generate.sampling import SamplingParams, process_logits, warp

SpeculativeStats = LookupStats  # rounds, drafted and accepted tokens, acceptance rate

DRAFT_SEED_OFFSET = 0x5EED  # the draft's sampler is seeded with the request's seed + this (serve too)


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
) -> list[Completion]:
    if num_draft < 1:
        raise UsageError("--num-draft-tokens must be at least 1")
    stats = stats if stats is not None else SpeculativeStats()
    rows = expand([request])
    check_rows(engine, rows)
    return [_one(engine, draft, r, num_draft, stats, on_token) for r in rows]


@dataclass
class _Side:
    """One model's cache and how many of its slots hold accepted tokens."""

    engine: Engine
    cache: KVCache
    filled: int = 0


@torch.inference_mode()
def _one(engine: Engine, draft: Engine, r: Request, k: int, stats: SpeculativeStats, on_token) -> Completion:
    params, prompt = r.params, r.prompt_ids
    total = len(prompt) + params.max_tokens + k + 2
    target = _Side(engine, KVCache(engine.model.args, 1, total, engine.device, engine.dtype))
    small = _Side(draft, KVCache(draft.model.args, 1, total, draft.device, draft.dtype))
    gen_target = _generator(params.seed, engine.device)
    gen_draft = _generator(params.seed + DRAFT_SEED_OFFSET, draft.device)

    out = Completion(prompt_tokens=len(prompt))
    counts: Counter = Counter()
    logits = _forward(engine.model, target.cache, prompt, 0)[-1]
    target.filled = len(prompt)
    if len(prompt) > 1:
        _forward(draft.model, small.cache, prompt[:-1], 0)
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
            d_logits = _forward(draft.model, small.cache, block, small.filled)[-1]
            small.filled += len(block)
            q = distribution(d_logits, params, context + drafts, d_counts)
            d = pick(q, params, gen_draft)
            drafts.append(d)
            qs.append(q)
            d_counts[d] += 1

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
