"""Sampling parameters, logits processors and the sampler.

Processors run in Hugging Face's order (``GenerationMixin._get_logits_processor``), each on one row's
float32 logits ``[vocab]``:

1. repetition penalty (CTRL, Keskar et al. 2019; HF's definition): for every token already in the prompt
   or the completion, a positive logit is divided by the penalty and a negative one multiplied by it;
2. frequency and presence penalties (OpenAI's definition, on completion tokens only):
   ``logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)``;
3. logit bias (OpenAI): ``logit[t] += bias[t]``;
4. temperature: ``logits / T`` (T = 0 means greedy: argmax, no sampling);
5. top-k: keep the k largest logits;
6. top-p (nucleus): keep the smallest set of most likely tokens whose probability reaches p
   (HF keeps at least one token);
7. min-p: drop tokens whose probability is below ``min_p * max probability``.

Each request has its own ``torch.Generator`` seeded from its ``seed``, so what a request samples does not
depend on the other requests in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from llmctl.core.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int = 0
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0

    def validate(self) -> SamplingParams:
        checks = [
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (self.n >= 1, "n must be at least 1"),
            (0 <= self.top_logprobs <= 20, "top_logprobs must be in [0, 20]"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_overrides(self, overrides: dict[str, Any]) -> SamplingParams:
        """Per-record overrides (a JSONL line's own ``temperature`` etc.), type-checked."""
        known = {f.name: f for f in fields(self)}
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in known:
                continue
            current = getattr(self, key)
            try:
                if key == "logit_bias":
                    value = {int(k): float(v) for k, v in dict(value).items()}
                elif key in ("stop", "stop_token_ids"):
                    value = tuple([value] if isinstance(value, str | int) else value)
                elif isinstance(current, bool):
                    if not isinstance(value, bool):
                        raise TypeError
                elif isinstance(current, int):
                    if isinstance(value, bool) or int(value) != value:
                        raise TypeError
                    value = int(value)
                elif isinstance(current, float):
                    value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key}={value!r} has the wrong type") from None
            values[key] = value
        return replace(self, **values)


SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams))


def process_logits(
    logits: torch.Tensor, params: SamplingParams, context: list[int], completion_counts: dict[int, int]
) -> torch.Tensor:
    """Apply processors 1-3 (everything that is not a sampling warper) to one row ``[vocab]``."""
    if params.repetition_penalty != 1.0 and context:
        ids = torch.tensor(sorted(set(context)), device=logits.device)
        scores = logits[ids]
        logits[ids] = torch.where(
            scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty
        )
    if (params.frequency_penalty or params.presence_penalty) and completion_counts:
        ids = torch.tensor(list(completion_counts), device=logits.device)
        counts = torch.tensor(list(completion_counts.values()), device=logits.device, dtype=logits.dtype)
        logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        valid = ids < logits.shape[-1]
        logits[ids[valid]] += torch.tensor(list(params.logit_bias.values()), device=logits.device)[valid]
    return logits


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p (processors 4-7): returns logits with dropped tokens at -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= (1 - params.top_p)
        drop_sorted[-1] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one processed row."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = warp(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
