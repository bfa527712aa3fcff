"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step the scheduler (vLLM V1's, in spirit) spends a token budget (``max_num_batched_tokens``):

1. running sequences first, oldest first: one token for a decode, the rest of the prompt (up to the
   budget) for a prefill that was cut into chunks - so a long prompt never stalls the running decodes;
   a sequence that needs a new block when none is free preempts the newest running sequence (its blocks
   are freed and it goes back to the head of the waiting queue, to be recomputed later - with prefix
   caching most of that recompute is a cache hit);
2. then waiting sequences, first come first served, while the budget, ``max_num_seqs`` and free blocks
   allow (none are admitted in a step that had to preempt). An admitted sequence first takes the blocks
   of its longest cached prefix, so only the rest of its prompt is computed; one whose next block is
   being computed for another sequence at that moment waits until it is cached (the same system prompt
   from many clients at once is computed once, as in SGLang's cache-aware scheduling).

Finished sequences leave the running list in :meth:`Scheduler.finish`, and their blocks are freed at once.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch

from llmctl.core.generate.engine import Completion
from llmctl.core.generate.sampling import SamplingParams
from llmctl.core.serve.blocks import BlockAllocator, block_hash

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Sequence:
    """One completion being generated (a request with ``n`` samples has ``n`` sequences)."""

    request_id: str
    index: int  # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    block_size: int
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)  # prompt + generated so far
    num_computed: int = 0  # tokens whose keys/values are in the cache
    table: list[int] = field(default_factory=list)  # block ids, in order
    hashes: list[bytes] = field(default_factory=list)  # chained hashes of the full blocks of `tokens`
    num_registered: int = 0  # leading blocks already offered to the prefix cache
    status: str = WAITING
    completion: Completion = field(default_factory=Completion)
    counts: Counter = field(default_factory=Counter)
    num_preemptions: int = 0
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    user: Any = None  # the caller's handle (the server's request state)
    matcher: Any = None  # constrained decoding: the row's grammar matcher (response_format)
    # Speculative decoding (a draft model; see llmctl.core.serve.speculative):
    draft_computed: int = 0  # tokens whose keys/values are in the draft model's cache
    draft_generator: torch.Generator | None = None  # the draft's sampler (seed + DRAFT_SEED_OFFSET)
    lookahead: int = 0  # draft tokens this step verifies (set by the scheduler for decodes)
    draft_head: Any = None  # --draft-vocab: the draft's vocabulary subset for this sequence (DraftVocab)
    # Echo / prompt logprobs: the prompt is computed in full (no prefix-cache lookup) and the
    # log-probability of each prompt token after the ones before it is recorded here.
    prompt_logprobs: int | None = None  # None: not asked; k: also the k most likely tokens
    prompt_token_logprobs: list[float] = field(default_factory=list)  # for prompt tokens 1..
    prompt_top_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_streamed: int = 0  # completion tokens already handed to the streaming client

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt_ids)
        self.completion.prompt_tokens = len(self.prompt_ids)
        self.update_hashes()

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def update_hashes(self) -> None:
        while len(self.hashes) < len(self.tokens) // self.block_size:
            i = len(self.hashes)
            parent = self.hashes[-1] if self.hashes else None
            self.hashes.append(
                block_hash(parent, self.tokens[i * self.block_size : (i + 1) * self.block_size])
            )

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self.update_hashes()


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        num_lookahead: int = 0,
        draft_cache: bool = True,
    ) -> None:
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Speculative decoding: a decoding sequence also computes up to this many draft tokens per step
        # (vLLM's lookahead slots); they take blocks and budget, and a draft cache is kept in step.
        self.num_lookahead = num_lookahead
        self.draft_cache = draft_cache and num_lookahead > 0  # a draft model's cache to keep in step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The sequences of the next step with their number of new tokens (sum <= the token budget)."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            seq.lookahead = min(self.lookahead(seq), budget - n)
            while not self._reserve(seq, n + seq.lookahead):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n))
                budget -= n + seq.lookahead
                i += 1
                continue
            break
        if preempted:
            return scheduled
        pending = self._blocks_in_flight()
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            # At least one token is always computed, for the logits of the next token.
            usable = seq.hashes[: (seq.num_tokens - 1) // self.block_size]
            if seq.prompt_logprobs is not None:
                usable = []  # every prompt position's logits are needed: compute the prompt in full
            cached = self.allocator.cached_prefix_blocks(usable)
            if cached < len(usable) and usable[cached] in pending:
                # The next block of this prompt is being computed for another sequence right now: wait a
                # step and take it from the cache instead of computing it twice (a shared system prompt
                # sent by many clients at once).
                continue
            seq.table = self.allocator.lookup_prefix(usable, seq.num_tokens)
            seq.num_computed = len(seq.table) * self.block_size
            seq.num_registered = len(seq.table)
            seq.draft_computed = seq.num_computed  # cached blocks hold the draft's keys/values too
            seq.lookahead = 0
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, n):
                self.allocator.free(seq.table)
                seq.table, seq.num_computed, seq.num_registered, seq.draft_computed = [], 0, 0, 0
                break
            self.waiting.remove(seq)
            seq.status = RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
            if self.allocator.prefix_caching:
                pending.update(seq.hashes[seq.num_registered :])
        return scheduled

    def lookahead(self, seq: Sequence) -> int:
        """Draft tokens a running sequence may verify this step: only a plain decode (one new token,
        at least one generated already), never past ``max_tokens``, not under a grammar constraint."""
        if not self.num_lookahead or seq.matcher is not None or seq.num_tokens - seq.num_computed != 1:
            return 0
        generated = len(seq.completion.token_ids)
        if generated < 1:
            return 0
        return max(0, min(self.num_lookahead, seq.params.max_tokens - generated - 1))

    def _blocks_in_flight(self) -> set[bytes]:
        """Hashes of full blocks that running sequences have not finished computing (prefix caching only)."""
        if not self.allocator.prefix_caching:
            return set()
        return {h for seq in self.running for h in seq.hashes[seq.num_registered :]}

    def _reserve(self, seq: Sequence, n: int) -> bool:
        """Give ``seq`` the blocks for ``n`` more tokens, if that many are free."""
        need = -(-(seq.num_computed + n) // self.block_size) - len(seq.table)
        if need > self.allocator.num_free:
            return False
        seq.table.extend(self.allocator.allocate() for _ in range(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the sequence's cache, keep its tokens, requeue it first."""
        self.allocator.free(seq.table)
        seq.table, seq.num_computed, seq.num_registered, seq.draft_computed = [], 0, 0, 0
        seq.status = WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def computed(self, seq: Sequence, n: int) -> None:
        """After a step: ``n`` more tokens of ``seq`` are in the cache; offer its new full blocks."""
        seq.num_computed += n
        done = seq.num_computed
        if self.draft_cache:  # a block is shared only once the draft's cache holds it too
            done = min(done, seq.draft_computed)
        full = min(done // self.block_size, len(seq.hashes))
        if full > seq.num_registered:
            self.allocator.register(seq.table, seq.hashes, seq.num_registered, full)
            seq.num_registered = full

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past the sequence's tokens (they held rejected draft tokens)."""
        keep = -(-seq.num_tokens // self.block_size)
        if len(seq.table) > keep:
            self.allocator.free(seq.table[keep:])
            del seq.table[keep:]

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (finished or aborted) and free its blocks."""
        if seq.status == RUNNING:
            self.running.remove(seq)
        elif seq.status == WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        if seq.table:
            self.allocator.free(seq.table)
        seq.table, seq.num_computed, seq.num_registered, seq.draft_computed = [], 0, 0, 0
        seq.status = FINISHED
