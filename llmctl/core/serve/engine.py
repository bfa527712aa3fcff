"""The serving engine: requests in, tokens out, one scheduler step at a time.

:class:`ServeEngine` is synchronous and single-threaded (the tests drive it step by step);
:class:`AsyncEngine` runs it on a background thread and hands each request's tokens to an asyncio queue,
which is what the HTTP server awaits. Sampling reuses the generate engine's processors and its
completion bookkeeping (stop strings, EOS, held-back partial UTF-8), so a request gets the same tokens
here as from ``llmctl generate``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from llmctl.core.errors import LlmctlError, UsageError
from llmctl.core.generate.constrained import compiler_for
from llmctl.core.generate.engine import Engine, advance, finish_text, record_logprobs
from llmctl.core.generate.sampling import SamplingParams, process_logits, sample
from llmctl.core.generate.speculative import check_draft
from llmctl.core.serve.blocks import BlockAllocator
from llmctl.core.serve.runner import PagedKVCache, StepInput, forward_step
from llmctl.core.serve.scheduler import FINISHED, Scheduler, Sequence
from llmctl.core.serve.speculative import Drafter, PromptLookup


class RequestError(LlmctlError):
    """A request the engine refuses (HTTP 400): empty or too long a prompt."""


class QueueFullError(LlmctlError):
    """The waiting queue is at its bound (HTTP 429)."""


class EngineStoppedError(LlmctlError):
    """The engine is shutting down or has stopped (HTTP 503)."""


@dataclass(frozen=True)
class ServeConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: from kv_cache_memory
    kv_cache_memory: float = 1.0  # GiB, when num_blocks is not given
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    prefix_caching: bool = True
    max_waiting: int = 512  # sequences queued beyond this are refused
    num_draft_tokens: int = 4  # speculative decoding (with a draft model): tokens drafted per step
    draft_vocab: int = 0  # the draft scores only this many lowest token ids + each request's (0: all)
    draft_confidence: float = 0.0  # a sequence stops drafting after a token the draft gives less than this
    prompt_lookup: int = 0  # speculative decoding without a draft: up to this many tokens by prompt lookup
    lookup_ngram: int = 3  # the longest n-gram prompt lookup matches


class ServeEngine:
    """A model, a paged KV cache, a block allocator and a scheduler (and optionally a draft model for
    speculative decoding, :mod:`llmctl.core.serve.speculative`)."""

    def __init__(
        self, engine: Engine, config: ServeConfig = ServeConfig(), metrics=None, draft: Engine | None = None
    ) -> None:
        if config.block_size < 1 or config.max_num_seqs < 1 or config.max_num_batched_tokens < 1:
            raise LlmctlError("block size, max_num_seqs and max_num_batched_tokens must be at least 1")
        if draft is None and (config.draft_vocab or config.draft_confidence):
            raise UsageError("--draft-vocab and --draft-confidence go with --draft")
        if draft is not None:
            check_draft(engine, draft)
            if config.prompt_lookup:
                raise UsageError("choose one of a draft model and prompt lookup")
        self.engine, self.config, self.metrics = engine, config, metrics
        model = engine.model
        num_blocks = config.num_blocks
        if num_blocks is None:
            per_block = PagedKVCache.bytes_per_block(model, config.block_size, engine.dtype)
            if draft is not None:  # the draft's cache has as many blocks, addressed by the same tables
                per_block += Drafter.bytes_per_block(draft, config.block_size)
            # No more than every sequence at full context could use.
            most = config.max_num_seqs * -(-engine.context_length // config.block_size)
            num_blocks = max(1, min(int(config.kv_cache_memory * 2**30) // per_block, most))
        self.allocator = BlockAllocator(num_blocks, config.block_size, prefix_caching=config.prefix_caching)
        self.cache = PagedKVCache(model, num_blocks, config.block_size, engine.device, engine.dtype)
        # The speculative proposer: a draft model (its own paged cache) or prompt lookup, or none.
        self.drafter: Drafter | PromptLookup | None = None
        if draft is not None:
            self.drafter = Drafter(
                draft, num_blocks, config.block_size, config.num_draft_tokens, config.draft_vocab,
                config.draft_confidence,
            )  # fmt: skip
        elif config.prompt_lookup:
            self.drafter = PromptLookup(config.prompt_lookup, config.lookup_ngram)
        self.scheduler = Scheduler(
            self.allocator,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            num_lookahead=self.drafter.num_draft if self.drafter is not None else 0,
            draft_cache=self.drafter is not None and self.drafter.keeps_cache,
        )
        self.requests: dict[str, list[Sequence]] = {}
        self.on_token: Callable[[Sequence, str], None] | None = None
        self.on_finish: Callable[[Sequence], None] | None = None
        self.num_steps = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.num_blocks * self.config.block_size

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.engine.context_length, self.capacity_tokens) - 1

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) > self.max_prompt_tokens:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                f"{self.max_prompt_tokens} "
                f"(context {self.engine.context_length}, KV cache {self.capacity_tokens} tokens)"
            )

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        user=None,
        constraint=None,
        prompt_logprobs: int | None = None,
    ):
        """Queue ``params.n`` sequences (seeds seed, seed+1, ..., as generate does); returns them.
        ``prompt_logprobs`` (k >= 0) also scores every prompt token (echo), with the k most likely."""
        self.check_prompt(prompt_ids)
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        room = min(self.engine.context_length, self.capacity_tokens) - len(prompt_ids)
        seqs = []
        for i in range(params.n):
            p = replace(params, seed=params.seed + i, n=1, max_tokens=min(params.max_tokens, room))
            g = None
            if not p.greedy:
                g = torch.Generator(device=self.engine.device)
                g.manual_seed(p.seed)
            seq = Sequence(request_id, i, list(prompt_ids), p, self.config.block_size, generator=g, user=user)
            seq.prompt_logprobs = prompt_logprobs
            if self.drafter is not None and not p.greedy:
                seq.draft_generator = self.drafter.generator(p.seed)  # None for prompt lookup
            if constraint is not None:
                seq.matcher = compiler_for(self.engine).matcher(constraint)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        self.prompt_tokens += len(prompt_ids)
        return seqs

    def abort(self, request_id: str) -> None:
        for seq in self.requests.pop(request_id, []):
            if seq.status != FINISHED:
                seq.completion.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> int:
        """Schedule, run the model once (after the draft's proposals, with a draft), sample; returns the
        number of tokens the target computed."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return 0
        proposals = self.drafter.propose(scheduled) if self.drafter is not None else {}
        step = StepInput([], [], [], [], [])
        for seq, n in scheduled:
            drafts = proposals[seq].tokens if seq in proposals else []
            step.token_ids.append(seq.tokens[seq.num_computed : seq.num_computed + n] + drafts)
            step.starts.append(seq.num_computed)
            step.tables.append(seq.table)
            samples = seq.num_computed + n == seq.num_tokens
            step.want_logits.append(samples)
            wanted = 1 + len(drafts) if samples else 0
            if seq.prompt_logprobs is not None and seq.num_computed < len(seq.prompt_ids) - 1:
                wanted = n  # every position of the chunk scores the prompt token after it
            step.num_logits.append(wanted)
        logits = forward_step(self.engine.model, self.cache, step)
        self.num_steps += 1
        row = 0
        for (seq, n), samples, wanted in zip(scheduled, step.want_logits, step.num_logits, strict=True):
            rows = logits[row : row + wanted]
            row += wanted
            if seq in proposals:
                self._verify(seq, rows, proposals[seq])
                continue
            if seq.prompt_logprobs is not None:
                self._score_prompt(seq, n, rows)
            self.scheduler.computed(seq, n)
            if samples:
                self._sample(seq, rows[-1])
        return sum(n + len(proposals[seq].tokens if seq in proposals else ()) for seq, n in scheduled)

    def _score_prompt(self, seq: Sequence, n: int, rows: torch.Tensor) -> None:
        """Record log P(prompt[p + 1] | prompt[:p + 1]) for the chunk's positions p (the last
        ``len(rows)`` of ``num_computed .. num_computed + n - 1``); positions already scored (a
        recompute after preemption) are skipped."""
        end = seq.num_computed + n
        for i, position in enumerate(range(end - len(rows), end)):
            target = position + 1
            if target >= len(seq.prompt_ids) or target - 1 < len(seq.prompt_token_logprobs):
                continue
            logp = rows[i].log_softmax(-1)
            seq.prompt_token_logprobs.append(float(logp[seq.prompt_ids[target]]))
            if seq.prompt_logprobs:
                values, ids = torch.topk(logp, seq.prompt_logprobs)
                seq.prompt_top_logprobs.append({int(t): float(v) for t, v in zip(ids, values, strict=True)})

    def _sample(self, seq: Sequence, raw: torch.Tensor) -> None:
        c, p = seq.completion, seq.params
        if p.max_tokens < 1:  # echo only: score the prompt, generate nothing
            c.finish_reason = "length"
            self._finish(seq)
            return
        processed = process_logits(raw.clone(), p, seq.prompt_ids + c.token_ids, seq.counts)
        if seq.matcher is not None:
            seq.matcher.mask(processed)
        token = sample(processed, p, seq.generator)
        if seq.matcher is not None:
            seq.matcher.accept(token)
        self._emit(seq, raw, token)

    def _verify(self, seq: Sequence, rows: torch.Tensor, proposal) -> None:
        """Speculative decoding: accept drafts, emit them and the next token, roll back the rest."""
        accepted, token = self.drafter.verify(seq, rows, proposal)
        for i, t in enumerate([*accepted, token]):
            if self._emit(seq, rows[i], t):
                return
        self.scheduler.computed(seq, 1 + len(accepted))  # the last token and the accepted drafts
        self.scheduler.trim(seq)  # blocks that held only rejected drafts go back

    def _emit(self, seq: Sequence, raw: torch.Tensor, token: int) -> bool:
        """Append a chosen token (``raw``: the target's logits it was chosen from); True if it ended
        the sequence."""
        c, p = seq.completion, seq.params
        if p.logprobs or p.top_logprobs:
            record_logprobs(c, raw, p)
            c.logprobs.append(float(raw.log_softmax(-1)[token]))
        now = time.monotonic()
        first = seq.first_token_at is None
        if self.metrics is not None:
            self.metrics.on_token(seq, now, first)
        if first:
            seq.first_token_at = now
        seq.last_token_at = now
        self.generation_tokens += 1

        def emit(_row: int, text: str) -> None:
            if self.on_token is not None:
                self.on_token(seq, text)

        advance(self.engine, c, seq, token, seq.counts, emit, seq.index)
        if seq.matcher is not None and seq.matcher.finished:
            c.finish_reason = "stop"  # the output is complete in its grammar
        if c.finish_reason == "stop" or len(c.token_ids) >= p.max_tokens:
            finish_text(self.engine, c, emit, seq.index)  # streams text held back until the end
            self._finish(seq)
            return True
        seq.append(token)
        return False

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        seqs = self.requests.get(seq.request_id, [])
        if all(s.status == FINISHED for s in seqs):
            self.requests.pop(seq.request_id, None)
        if self.metrics is not None:
            self.metrics.on_finish(seq, time.monotonic())
        if self.on_finish is not None:
            self.on_finish(seq)

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def stats(self) -> dict:
        a = self.allocator
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "num_blocks": a.num_blocks,
            "used_blocks": a.num_used,
            "kv_cache_usage": a.usage,
            "prefix_cache_queries": a.queries,
            "prefix_cache_hits": a.hits,
            "preemptions": self.scheduler.num_preemptions,
            "steps": self.num_steps,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
        } | self.spec_stats()

    def spec_stats(self) -> dict:
        if self.drafter is None:
            return {}
        s = self.drafter.stats
        return {
            "spec_decode_num_drafts": s.num_drafts,
            "spec_decode_num_draft_tokens": s.num_draft_tokens,
            "spec_decode_num_accepted_tokens": s.num_accepted_tokens,
            "spec_decode_num_emitted_tokens": s.num_emitted_tokens,
            "spec_decode_acceptance_rate": s.acceptance_rate,
            "spec_decode_mean_acceptance_length": s.mean_acceptance_length,
        }


def acceptance_line(stats) -> str:
    return (
        f"speculative decoding: {stats.num_accepted_tokens} of {stats.num_draft_tokens} draft tokens "
        f"accepted ({stats.acceptance_rate:.1%}), {stats.mean_acceptance_length:.2f} tokens per "
        f"verification"
    )


@dataclass
class TokenDelta:
    """What a sequence streams at once: new text and the completion tokens (with their log-probabilities,
    when asked) not streamed before. Built on the engine thread, so it is a snapshot."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    seq: Sequence


def token_delta(seq: Sequence, text: str) -> TokenDelta:
    c = seq.completion
    start, end = seq.num_streamed, len(c.token_ids)
    seq.num_streamed = end
    return TokenDelta(text, c.token_ids[start:end], c.logprobs[start:end], c.top_logprobs[start:end], seq)


class RequestStream:
    """The asyncio side of one request: events ``("token", index, TokenDelta)``, ``("finish", index,
    seq)`` and ``("error", None, message)`` arrive on :attr:`queue`. Several streams may share one
    queue (a completions request with a list of prompts): ``offset`` is added to their indices."""

    def __init__(
        self,
        request_id: str,
        n: int,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue | None = None,
        offset: int = 0,
    ) -> None:
        self.request_id, self.n, self.loop, self.offset = request_id, n, loop, offset
        self.queue: asyncio.Queue = queue if queue is not None else asyncio.Queue()
        self.sequences: list[Sequence] = []

    def push(self, event: tuple) -> None:
        kind, index, payload = event
        if index is not None:
            event = (kind, index + self.offset, payload)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed (the server stopped): nobody is listening
            pass


class AsyncEngine:
    """Runs a :class:`ServeEngine` on its own thread; requests are added and aborted through an inbox
    that the thread drains before every step (the engine itself is only ever touched by that thread)."""

    def __init__(
        self,
        core: ServeEngine,
        *,
        log: Callable[[str], None] | None = None,
        info: Callable[[str], None] | None = None,
    ) -> None:
        self.core = core
        self.log = log or (lambda _m: None)  # problems
        self.info = info or self.log  # progress (speculative decoding's acceptance)
        core.on_token = lambda seq, text: seq.user.push(("token", seq.index, token_delta(seq, text)))
        core.on_finish = lambda seq: seq.user.push(("finish", seq.index, seq))
        self._inbox: list[tuple] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._stopped = threading.Event()
        self._pending = 0  # sequences submitted but not yet in the scheduler
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="llmctl-serve-engine", daemon=True)
        self.error_count = 0
        self.log_interval = 10.0  # seconds between speculative-decoding acceptance lines (with a draft)
        self._logged_at, self._logged_drafts = time.monotonic(), 0

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def num_waiting(self) -> int:
        return len(self.core.scheduler.waiting) + self._pending

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        prefix: str = "req",
        constraint=None,
        *,
        prompt_logprobs: int | None = None,
        queue: asyncio.Queue | None = None,
        offset: int = 0,
    ) -> RequestStream:
        if not self.alive:
            raise EngineStoppedError("the server is shutting down")
        self.core.check_prompt(prompt_ids)
        if self.num_waiting() + params.n > self.core.config.max_waiting:
            raise QueueFullError(
                f"the server is busy: {self.num_waiting()} sequences are waiting "
                f"(--max-waiting {self.core.config.max_waiting}); retry later"
            )
        loop = asyncio.get_running_loop()
        stream = RequestStream(f"{prefix}-{next(self._ids)}", params.n, loop, queue, offset)
        with self._lock:
            self._pending += params.n
            self._inbox.append(("add", stream, prompt_ids, params, constraint, prompt_logprobs))
        self._wake.set()
        return stream

    def abort(self, stream: RequestStream) -> None:
        with self._lock:
            self._inbox.append(("abort", stream))
        self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let running ones finish for up to ``timeout`` s, then abort the rest."""
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self.core.has_work() and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        with self._lock:
            self._inbox.append(("abort_all",))
            self._inbox.append(("exit",))
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._lock:
                ops, self._inbox = self._inbox, []
            for op in ops:
                if op[0] == "exit":
                    self._stopped.set()
                    return
                self._apply(op)
            if not self.core.has_work():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                self.core.step()
                if self.core.drafter is not None:
                    self._log_acceptance()
            except Exception as e:  # a bug must not kill the server: fail what was running, go on
                self.error_count += 1
                self.log(f"engine step failed: {type(e).__name__}: {e}")
                self._fail_all(f"internal error: {type(e).__name__}: {e}")

    def _log_acceptance(self, force: bool = False) -> None:
        stats = self.core.drafter.stats
        now = time.monotonic()
        if stats.num_drafts == self._logged_drafts or (
            not force and now - self._logged_at < self.log_interval
        ):
            return
        self._logged_at, self._logged_drafts = now, stats.num_drafts
        self.info(acceptance_line(stats))

    def _apply(self, op: tuple) -> None:
        kind = op[0]
        if kind == "add":
            _, stream, prompt_ids, params, constraint, prompt_logprobs = op
            with self._lock:
                self._pending -= params.n
            try:
                stream.sequences = self.core.add_request(
                    stream.request_id,
                    prompt_ids,
                    params,
                    user=stream,
                    constraint=constraint,
                    prompt_logprobs=prompt_logprobs,
                )
            except LlmctlError as e:
                stream.push(("error", None, str(e)))
        elif kind == "abort":
            self.core.abort(op[1].request_id)
        elif kind == "abort_all":
            for rid in list(self.core.requests):
                for seq in self.core.requests.get(rid, []):
                    seq.user.push(("error", None, "the server shut down before the request finished"))
                self.core.abort(rid)

    def _fail_all(self, message: str) -> None:
        for rid in list(self.core.requests):
            seqs = self.core.requests.get(rid, [])
            if seqs:
                seqs[0].user.push(("error", None, message))
            self.core.abort(rid)
