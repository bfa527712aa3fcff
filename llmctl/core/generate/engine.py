"""The decode loop: prefill a batch of left-padded prompts, then one token per step for every row.

``generate(engine, requests)`` returns one :class:`Completion` per request (per sample with ``n > 1``),
in request order. A row stops at EOS (unless ``ignore_eos``), at a stop token id, when its text contains
a stop string (the completion is cut before it, as OpenAI does), or at ``max_tokens``; the batch stops
when every row has. Logprobs are those of the model's own distribution (log-softmax of the raw logits),
before any processor, as OpenAI and vLLM report them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from llmctl.core.errors import InputDataError
from llmctl.core.generate.constrained import Constraint, compiler_for
from llmctl.core.generate.model import DecoderLM, KVCache
from llmctl.core.generate.sampling import SamplingParams, process_logits, sample


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    where: str = ""  # file:line, for error messages
    constraint: Constraint | None = None  # output language (JSON schema, regex, grammar)


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    score: float | None = None  # beam search: the hypothesis' length-normalised log-probability
    cut_at_stop: bool = False  # the text was cut before a stop string: it is final

    @property
    def usage(self) -> dict[str, int]:
        n = len(self.token_ids)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
        }


class Engine:
    """A model, its tokenizer and the ids that end a completion."""

    def __init__(self, model: DecoderLM, tokenizer, eos_token_ids: list[int]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @property
    def context_length(self) -> int:
        return self.model.args.max_position

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def expand(requests: list[Request]) -> list[Request]:
    """``n`` samples of a request become ``n`` rows with seeds seed, seed+1, ... (reproducible per sample)."""
    rows = []
    for r in requests:
        for i in range(r.params.n):
            rows.append(replace(r, params=replace(r.params, seed=r.params.seed + i, n=1)))
    return rows


def generate(
    engine: Engine, requests: list[Request], on_token: Callable[[int, str], None] | None = None
) -> list[Completion]:
    """Complete every request (rows = requests x n). ``on_token(row, text_delta)`` streams text."""
    rows = expand(requests)
    if not rows:
        return []
    check_rows(engine, rows)
    return list(_run(engine, rows, on_token))


def check_rows(engine: Engine, rows: list[Request]) -> None:
    """Refuse empty and too-long prompts; cap max_tokens at what the context has room for."""
    for r in rows:
        need = len(r.prompt_ids) + r.params.max_tokens
        if not r.prompt_ids:
            raise InputDataError(f"{r.where}: empty prompt")
        if len(r.prompt_ids) >= engine.context_length:
            raise InputDataError(
                f"{r.where}: prompt of {len(r.prompt_ids)} tokens does not fit the context "
                f"of {engine.context_length}"
            )
        if need > engine.context_length:
            r.params = _capped(r.params, engine.context_length - len(r.prompt_ids))


def _capped(params: SamplingParams, max_tokens: int) -> SamplingParams:
    return replace(params, max_tokens=max_tokens)


@torch.inference_mode()
def _run(engine: Engine, rows: list[Request], on_token) -> Iterator[Completion]:
    model, device = engine.model, engine.device
    b = len(rows)
    prompt_len = max(len(r.prompt_ids) for r in rows)
    max_new = max(r.params.max_tokens for r in rows)
    total = prompt_len + max_new
    # Left padding: row i's prompt ends at slot prompt_len - 1 for every row.
    pad = [prompt_len - len(r.prompt_ids) for r in rows]
    tokens = torch.zeros((b, prompt_len), dtype=torch.long)
    valid = torch.zeros((b, total), dtype=torch.bool)  # which cache slots hold real tokens
    for i, r in enumerate(rows):
        tokens[i, pad[i] :] = torch.tensor(r.prompt_ids)
        valid[i, pad[i] : prompt_len] = True
    positions = (valid[:, :prompt_len].long().cumsum(-1) - 1).clamp(min=0)
    tokens, valid, positions = tokens.to(device), valid.to(device), positions.to(device)
    model.column_major(b == 1)  # the faster weight layout for this batch size on a CPU (a no-op elsewhere)
    cache = KVCache(model.args, b, total, device, engine.dtype)
    causal = torch.ones((prompt_len, prompt_len), dtype=torch.bool, device=device).tril()
    mask = (causal[None] & valid[:, None, :prompt_len])[:, None]  # [B, 1, T, T]
    # A fully padded query row would attend to nothing (NaN); let padding attend to itself.
    mask = mask | torch.eye(prompt_len, dtype=torch.bool, device=device)[None, None]
    logits = model(tokens, positions, torch.arange(prompt_len, device=device), mask, cache)[:, -1]

    generators = [_generator(r.params.seed, device) for r in rows]
    matchers = [compiler_for(engine).matcher(r.constraint, r.where) if r.constraint else None for r in rows]
    done = [False] * b
    out = [Completion(prompt_tokens=len(r.prompt_ids)) for r in rows]
    counts = [Counter() for _ in rows]
    next_pos = positions[:, -1] + 1
    for step in range(max_new):
        chosen = []
        for i, r in enumerate(rows):
            if done[i]:
                chosen.append(engine.eos_token_ids and next(iter(engine.eos_token_ids)) or 0)
                continue
            row = logits[i].clone()
            if r.params.logprobs or r.params.top_logprobs:
                record_logprobs(out[i], row, r.params)
            row = process_logits(row, r.params, r.prompt_ids + out[i].token_ids, counts[i])
            if matchers[i] is not None:
                matchers[i].mask(row)
            token = sample(row, r.params, generators[i])
            if matchers[i] is not None:
                matchers[i].accept(token)
            if r.params.logprobs or r.params.top_logprobs:
                out[i].logprobs.append(float(logits[i].log_softmax(-1)[token]))
            chosen.append(token)
            advance(engine, out[i], r, token, counts[i], on_token, i)
            if matchers[i] is not None and matchers[i].finished:
                out[i].finish_reason = "stop"  # the grammar is complete (it allowed only EOS)
            done[i] = out[i].finish_reason == "stop" or len(out[i].token_ids) >= r.params.max_tokens
        if all(done) or step == max_new - 1:
            break
        slot = prompt_len + step
        valid[:, slot] = True
        mask = valid[:, None, None, : slot + 1]
        token_tensor = torch.tensor(chosen, device=device)[:, None]
        logits = model(token_tensor, next_pos[:, None], torch.tensor([slot], device=device), mask, cache)[
            :, -1
        ]
        next_pos = next_pos + 1
    for i, c in enumerate(out):
        finish_text(engine, c, on_token, i)
    yield from out


def _generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def record_logprobs(completion: Completion, raw: torch.Tensor, params: SamplingParams) -> None:
    if params.top_logprobs:
        logp = raw.log_softmax(-1)
        values, ids = torch.topk(logp, params.top_logprobs)
        completion.top_logprobs.append({int(t): float(v) for t, v in zip(ids, values, strict=True)})


def advance(
    engine: Engine, c: Completion, r: Request, token: int, counts: Counter, on_token, row: int
) -> None:
    """Append ``token`` to completion ``c`` and decide whether it ends it."""
    p = r.params
    if (token in engine.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
        c.finish_reason = "stop"
        return
    before = c.text
    c.token_ids.append(token)
    counts[token] += 1
    text = engine.decode(c.token_ids)
    if p.stop:
        hits = [text.find(s) for s in p.stop if s and s in text]
        if hits:
            c.text = text[: min(hits)]
            c.finish_reason = "stop"
            c.cut_at_stop = True
            if on_token and len(c.text) > len(before):
                on_token(row, c.text[len(before) :])
            return
    # Hold back text that may be the start of a stop string or an incomplete UTF-8 sequence.
    safe = text if not text.endswith("\ufffd") else before
    c.text = safe
    if on_token and len(safe) > len(before):
        on_token(row, safe[len(before) :])


def finish_text(engine: Engine, c: Completion, on_token=None, row: int = 0) -> None:
    """Final text of a completion that ended by length (flush anything held back, streaming it too)."""
    before = c.text
    if not c.cut_at_stop:  # EOS, a stop token or the length: flush text held back
        c.text = engine.decode(c.token_ids)
    if on_token and len(c.text) > len(before) and c.text.startswith(before):
        on_token(row, c.text[len(before) :])


def as_dict(c: Completion, tokenizer: Any = None, *, logprobs: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"finish_reason": c.finish_reason, "usage": c.usage}
    if c.score is not None:
        out["score"] = c.score
    if logprobs:
        out["logprobs"] = {
            "tokens": [tokenizer.convert_ids_to_tokens(t) for t in c.token_ids] if tokenizer else c.token_ids,
            "token_ids": c.token_ids,
            "token_logprobs": c.logprobs[: len(c.token_ids)],
        }
        if c.top_logprobs:
            out["logprobs"]["top_logprobs"] = [
                {(tokenizer.convert_ids_to_tokens(t) if tokenizer else str(t)): v for t, v in d.items()}
                for d in c.top_logprobs[: len(c.token_ids)]
            ]
    return out
