"""Prompt-lookup decoding: draft tokens by copying what followed the latest n-gram match, verify them in
one forward pass, keep the longest prefix greedy decoding agrees with (plus the model's own next token).

Exact for greedy decoding: every emitted token is the argmax the model gives after exactly the tokens
before it, so the output equals plain greedy decoding; it is faster when the completion repeats spans of
the prompt (extraction, editing, summarising with quotes, code). Draft-free: no second model.
(Saxena, "Prompt Lookup Decoding", 2023; the acceptance rule is speculative decoding's greedy case.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmctl.core.errors import UsageError
from llmctl.core.generate.engine import Completion, Engine, Request, _advance, check_rows, expand, finish_text
from llmctl.core.generate.model import KVCache


@dataclass
class LookupStats:
    steps: int = 0  # forward passes after the prefill
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def find_draft(tokens: list[int], num_draft: int, max_ngram: int) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of the longest suffix n-gram."""
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest match first, not the suffix itself
            if tokens[start : start + n] == suffix:
                follow = tokens[start + n : start + n + num_draft]
                if follow:
                    return follow
    return []


@torch.inference_mode()
def generate_lookup(
    engine: Engine,
    request: Request,
    *,
    num_draft: int = 8,
    max_ngram: int = 3,
    stats: LookupStats | None = None,
    on_token: Callable[[int, str], None] | None = None,
) -> list[Completion]:
    """Greedy completion(s) of one request with prompt-lookup drafting."""
    if not request.params.greedy:
        raise UsageError("--prompt-lookup is exact only for greedy decoding: use --temperature 0")
    if num_draft < 1 or max_ngram < 1:
        raise UsageError("--prompt-lookup and --lookup-ngram must be at least 1")
    stats = stats if stats is not None else LookupStats()
    rows = expand([request])
    check_rows(engine, rows)
    return [_one(engine, r, num_draft, max_ngram, stats, on_token) for r in rows]


def _one(
    engine: Engine, r: Request, num_draft: int, max_ngram: int, stats: LookupStats, on_token
) -> Completion:
    model, device = engine.model, engine.device
    prompt = r.prompt_ids
    total = len(prompt) + r.params.max_tokens + num_draft + 1
    cache = KVCache(model.args, 1, total, device, engine.dtype)
    n = len(prompt)
    logits = _forward(model, cache, prompt, 0)  # [n, vocab]
    out = Completion(prompt_tokens=n)
    counts: Counter = Counter()
    next_token = int(logits[-1].argmax())
    filled = n  # cache slots holding real tokens
    while True:
        _advance(engine, out, r, next_token, counts, on_token, 0)
        if out.finish_reason == "stop" or len(out.token_ids) >= r.params.max_tokens:
            break
        sequence = prompt + out.token_ids
        room = r.params.max_tokens - len(out.token_ids)
        draft = find_draft(sequence, min(num_draft, max(room - 1, 0)), max_ngram) if room > 1 else []
        block = [next_token] + draft
        logits = _forward(model, cache, block, filled)  # predictions after each token of the block
        stats.steps += 1
        stats.drafted += len(draft)
        greedy = logits.argmax(-1).tolist()
        accepted = 0
        while accepted < len(draft) and draft[accepted] == greedy[accepted]:
            accepted += 1
        stats.accepted += accepted
        filled += 1 + accepted  # the slots of rejected drafts are simply overwritten later
        for token in draft[:accepted]:
            _advance(engine, out, r, token, counts, on_token, 0)
            if out.finish_reason == "stop" or len(out.token_ids) >= r.params.max_tokens:
                finish_text(engine, out)
                return out
        next_token = greedy[accepted]
    finish_text(engine, out)
    return out


def _forward(model, cache: KVCache, tokens: list[int], start: int) -> torch.Tensor:
    """Run ``tokens`` at cache slots ``start..``; logits ``[len(tokens), vocab]``."""
    device = cache.k[0].device
    t = len(tokens)
    slots = torch.arange(start, start + t, device=device)
    # Each new token sees every earlier slot and the block's tokens up to itself.
    mask = torch.ones((t, start + t), dtype=torch.bool, device=device)
    mask[:, start:] = torch.ones((t, t), dtype=torch.bool, device=device).tril()
    x = torch.tensor([tokens], device=device)
    return model(x, slots[None], slots, mask[None, None], cache, last_only=False)[0]
