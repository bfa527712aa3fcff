"""Draft-free exact greedy decoding: guess the next tokens, verify them in one forward pass, keep the
longest prefix greedy decoding agrees with (plus the model's own next token).

Exact for greedy decoding: every emitted token is the argmax the model gives after exactly the tokens
before it, so the output equals plain greedy decoding, whatever the guesses; good guesses only make it
faster. Two drafters:

- **prompt lookup** (Saxena, "Prompt Lookup Decoding", 2023): copy what followed the latest earlier
  occurrence of the last n-gram; fast when the completion repeats spans of the prompt (extraction,
  editing, summarising with quotes, code);
- **lookahead** (Jacobi iteration, Fu et al., "Break the Sequential Dependency of LLM Inference Using
  Lookahead Decoding", 2024): the verification pass also predicts every position of the guessed window,
  and those predictions, shifted past what was accepted, are the next guesses (one Jacobi step per
  forward); every window's predictions also fill an n-gram pool keyed by their first token, and a pool
  n-gram that starts with the token just emitted is preferred over the Jacobi guesses (lookahead's
  verification branch, verified inline).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmctl.core.errors import UsageError
from llmctl.core.generate.engine import Completion, Engine, Request, advance, check_rows, expand, finish_text
from llmctl.core.generate.model import KVCache


@dataclass
class LookupStats:
    steps: int = 0  # forward passes after the prefill
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class PromptLookup:
    """Drafts by prompt lookup (see the module docstring)."""

    def __init__(self, num_draft: int, max_ngram: int) -> None:
        self.num_draft, self.max_ngram = num_draft, max_ngram

    def propose(self, sequence: list[int], room: int) -> list[int]:
        return find_draft(sequence, min(self.num_draft, room), self.max_ngram) if room > 0 else []

    def observe(self, block: list[int], greedy: list[int], accepted: int) -> None:
        pass


class Lookahead:
    """Drafts by Jacobi iteration over a window, plus an n-gram pool of past window predictions."""

    def __init__(self, window: int, ngram: int = 4, pool_size: int = 8) -> None:
        self.window, self.ngram, self.pool_size = window, ngram, pool_size
        self.guesses: list[int] = []
        self.pool: dict[int, list[tuple[int, ...]]] = {}

    def propose(self, sequence: list[int], room: int) -> list[int]:
        n = min(self.window, room)
        if n <= 0:
            return []
        last = sequence[-1]
        for gram in self.pool.get(last, ()):  # the newest n-gram first
            if len(gram) > 1:
                return list(gram[1 : 1 + n])
        return self.guesses[:n]

    def observe(self, block: list[int], greedy: list[int], accepted: int) -> None:
        # greedy[j] is the model's prediction after block[: j + 1]; those past the accepted prefix are
        # Jacobi guesses for the tokens after the next one (greedy[accepted] is emitted now).
        self.guesses = greedy[accepted + 1 :]
        # Every window position yields an n-gram (its token, then the predictions that follow it).
        for j in range(len(block)):
            gram = (block[j], *greedy[j : j + self.ngram - 1])
            if len(gram) < 2:
                continue
            entries = self.pool.setdefault(gram[0], [])
            if gram in entries:
                entries.remove(gram)
            entries.insert(0, gram)
            del entries[self.pool_size :]


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
    if num_draft < 1 or max_ngram < 1:
        raise UsageError("--prompt-lookup and --lookup-ngram must be at least 1")
    return generate_drafted(
        engine, request, lambda: PromptLookup(num_draft, max_ngram), num_draft, stats, on_token
    )


def generate_lookahead(
    engine: Engine,
    request: Request,
    *,
    window: int = 5,
    ngram: int = 4,
    stats: LookupStats | None = None,
    on_token: Callable[[int, str], None] | None = None,
) -> list[Completion]:
    """Greedy completion(s) of one request with lookahead (Jacobi) decoding."""
    if window < 1 or ngram < 2:
        raise UsageError("--lookahead must be at least 1 and --lookahead-ngram at least 2")
    return generate_drafted(engine, request, lambda: Lookahead(window, ngram), window, stats, on_token)


def generate_drafted(engine: Engine, request: Request, drafter, num_draft: int, stats, on_token):
    if not request.params.greedy:
        raise UsageError("draft-free drafting is exact only for greedy decoding: use --temperature 0")
    stats = stats if stats is not None else LookupStats()
    rows = expand([request])
    check_rows(engine, rows)
    return [_one(engine, r, drafter(), num_draft, stats, on_token) for r in rows]


@torch.inference_mode()
def _one(engine: Engine, r: Request, drafter, num_draft: int, stats: LookupStats, on_token) -> Completion:
    model, device = engine.model, engine.device
    prompt = r.prompt_ids
    total = len(prompt) + r.params.max_tokens + num_draft + 1
    cache = KVCache(model.args, 1, total, device, engine.dtype)
    n = len(prompt)
    logits = _forward(model, cache, prompt, 0, last_only=True)  # [1, vocab]
    out = Completion(prompt_tokens=n)
    counts: Counter = Counter()
    next_token = int(logits[-1].argmax())
    filled = n  # cache slots holding real tokens
    while True:
        advance(engine, out, r, next_token, counts, on_token, 0)
        if out.finish_reason == "stop" or len(out.token_ids) >= r.params.max_tokens:
            break
        sequence = prompt + out.token_ids
        room = r.params.max_tokens - len(out.token_ids)
        draft = drafter.propose(sequence, room - 1)
        block = [next_token] + draft
        logits = _forward(model, cache, block, filled)  # predictions after each token of the block
        stats.steps += 1
        stats.drafted += len(draft)
        greedy = logits.argmax(-1).tolist()
        accepted = 0
        while accepted < len(draft) and draft[accepted] == greedy[accepted]:
            accepted += 1
        stats.accepted += accepted
        drafter.observe(block, greedy, accepted)
        filled += 1 + accepted  # the slots of rejected drafts are simply overwritten later
        for token in draft[:accepted]:
            advance(engine, out, r, token, counts, on_token, 0)
            if out.finish_reason == "stop" or len(out.token_ids) >= r.params.max_tokens:
                finish_text(engine, out, on_token)
                return out
        next_token = greedy[accepted]
    finish_text(engine, out, on_token)
    return out


def _forward(
    model, cache: KVCache, tokens: list[int], start: int, head=None, last_only: bool = False
) -> torch.Tensor:
    """Run ``tokens`` at cache slots ``start..``; logits ``[len(tokens), vocab]`` (``[1, vocab]``, the last
    token's, with ``last_only``), from ``head`` if given."""
    device = cache.k[0].device
    t = len(tokens)
    slots = torch.arange(start, start + t, device=device)
    # Each new token sees every earlier slot and the block's tokens up to itself.
    mask = torch.ones((t, start + t), dtype=torch.bool, device=device)
    mask[:, start:] = torch.ones((t, t), dtype=torch.bool, device=device).tril()
    x = torch.tensor([tokens], device=device)
    return model(x, slots[None], slots, mask[None, None], cache, last_only=last_only, head=head)[0]
