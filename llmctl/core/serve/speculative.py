"""Speculative decoding inside the continuous-batching engine (``llmctl serve --draft DIR`` or
``--prompt-lookup K``). Two proposers share the verification half (:class:`Proposer`): a draft model
(:class:`Drafter`, below) and draft-free prompt lookup (:class:`PromptLookup`, at the end).

Every step, each decoding sequence that the scheduler gave lookahead slots (``k <= --num-draft-tokens``,
never past ``max_tokens``) gets ``k`` tokens proposed by the draft model; the target then computes the
sequence's last token and the ``k`` drafts in the same forward as everyone else's tokens (``k + 1``
query tokens over the paged cache: the chunked-prefill attention path), and the drafts are accepted by
Leviathan et al./Chen et al.'s rule, reused from :mod:`llmctl.core.generate.speculative`
(:func:`~llmctl.core.generate.speculative.distribution`,
:func:`~llmctl.core.generate.speculative.accept_or_resample`): greedy keeps the drafts that equal the
target's argmax, sampling accepts with probability ``min(1, p/q)`` and resamples the first rejection from
``norm(max(0, p - q))``; when every draft is accepted a bonus token comes from the target's last position.
Greedy output is therefore token-identical to serving without a draft, and sampled output is distributed
as the target's own sampler (seeded per request: the target side draws from the request's generator,
the draft from its own, seeded ``seed + 0x5EED`` as ``llmctl generate --draft`` does).

The draft's KV cache is a second :class:`~llmctl.core.serve.runner.PagedKVCache` with the same number
and size of blocks, addressed by the *same* block tables: a block holds a token's keys/values in both
caches, so prefix caching, preemption and freeing need no second allocator. The draft's cache is kept
in step with the target's: every prompt chunk the target computes, the draft computes too (in its first
forward of the step), and each sequence tracks ``draft_computed`` (the draft lags the target by at most
the one bonus token it never saw; it catches up in its next forward). A full block is offered to the
prefix cache only once both caches hold it. Rejected drafts' slots are rolled back by simply not counting
them (``num_computed`` moves past the accepted ones only; later tokens overwrite the slots) and blocks
that held nothing but rejected tokens go back to the allocator at once (:meth:`Scheduler.trim`).

Not speculated: a sequence under a grammar constraint (response_format), a sequence's first token (it
comes from the prefill, as in ``generate --draft``) and a step that recomputes a preempted sequence. The
RNG streams after a preemption therefore differ from ``generate --draft``'s (the samples are still
distributed as the target's).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from llmctl.core.errors import UsageError
from llmctl.core.generate.engine import Engine
from llmctl.core.generate.speculative import (
    DRAFT_SEED_OFFSET,
    DraftVocab,
    accept_or_resample,
    check_confidence,
    distribution,
    draft_probability,
    pick,
)
from llmctl.core.serve.runner import PagedKVCache, StepInput, forward_step


@dataclass
class SpecStats:
    num_drafts: int = 0  # verification rounds (sequence-steps that verified at least one draft)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0  # accepted drafts + the replacement/bonus token of each round

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification round (1 = no draft ever accepted; k + 1 = all)."""
        return self.num_emitted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass
class Proposal:
    tokens: list[int]
    q: list[torch.Tensor]  # the draft's processed distribution at each draft position


class Proposer:
    """Proposes draft tokens for the decoding sequences of a step and verifies them against the target's
    logits (the half of the rule shared by every proposer)."""

    def __init__(self, num_draft: int) -> None:
        if num_draft < 1:
            raise UsageError("the number of draft tokens must be at least 1")
        self.num_draft = num_draft
        self.stats = SpecStats()

    def generator(self, seed: int) -> torch.Generator | None:
        return None

    def propose(self, scheduled: list) -> dict:
        raise NotImplementedError

    def _q(self, proposal: Proposal, i: int, p: torch.Tensor) -> torch.Tensor:
        return proposal.q[i].to(p.device)

    def _rolled_back(self, seq, proposal: Proposal, accepted: int) -> None:
        """Keep the proposer's own state (a draft cache) up to the accepted tokens."""

    def verify(self, seq, rows: torch.Tensor, proposal: Proposal) -> tuple[list[int], int]:
        """The target's logits ``rows`` (at the last token and each draft) against the proposal:
        ``(accepted drafts, next token)`` - the replacement of the first rejected draft, or the bonus
        token when all were accepted. Updates the draft's cache count and the statistics."""
        c, p = seq.completion, seq.params
        context = seq.prompt_ids + c.token_ids
        counts = Counter(seq.counts)
        accepted: list[int] = []
        token = None
        for i, d in enumerate(proposal.tokens):
            target = distribution(rows[i], p, context + accepted, counts)
            chosen, ok = accept_or_resample(target, self._q(proposal, i, target), d, seq.generator)
            if not ok:
                token = chosen
                break
            accepted.append(d)
            counts[d] += 1
        if token is None:  # every draft accepted: the bonus token from the last position
            target = distribution(rows[len(proposal.tokens)], p, context + accepted, counts)
            token = pick(target, p, seq.generator)
        self._rolled_back(seq, proposal, len(accepted))
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += len(proposal.tokens)
        s.num_accepted_tokens += len(accepted)
        s.num_emitted_tokens += len(accepted) + 1
        return accepted, token


class Drafter(Proposer):
    """A draft model with its paged cache (proposals sampled from its own processed distribution q)."""

    keeps_cache = True  # the scheduler shares a block only once the draft's cache holds it too

    def __init__(
        self,
        draft: Engine,
        num_blocks: int,
        block_size: int,
        num_draft: int,
        draft_vocab: int = 0,
        min_confidence: float = 0.0,
    ) -> None:
        super().__init__(num_draft)
        check_confidence(min_confidence)
        self.min_confidence = min_confidence  # a sequence stops drafting after a token below this
        self.engine = draft
        self.cache = PagedKVCache(draft.model, num_blocks, block_size, draft.device, draft.dtype)
        # --draft-vocab N: the draft scores the N lowest ids and each sequence's own tokens (DraftVocab)
        self.vocab = DraftVocab(draft, draft_vocab) if draft_vocab else None

    def _rows_head(self, seqs: list):
        """The draft's head for logits rows of ``seqs`` (None: its full ``lm_head``)."""
        if self.vocab is None:
            return None
        for seq in seqs:
            if seq.draft_head is None:
                seq.draft_head = self.vocab.for_request(seq.prompt_ids, seq.params)
            seq.draft_head.follow(seq.completion.token_ids)
        return self.vocab.rows([seq.draft_head for seq in seqs])

    @staticmethod
    def bytes_per_block(draft: Engine, block_size: int) -> int:
        return PagedKVCache.bytes_per_block(draft.model, block_size, draft.dtype)

    def generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.engine.device)
        g.manual_seed(seed + DRAFT_SEED_OFFSET)
        return g

    @torch.inference_mode()
    def propose(self, scheduled: list) -> dict:
        """Bring the draft's cache up to this step's tokens and draft ``seq.lookahead`` tokens for every
        sequence that has lookahead slots; returns ``{seq: Proposal}``.

        The first forward carries every scheduled sequence's new tokens (prompt chunks and the decodes'
        last tokens, plus a token the draft missed last step); each later forward one draft token per
        sequence that wants more."""
        step = StepInput([], [], [], [])
        wanting = []
        for seq, n in scheduled:
            end = seq.num_computed + n
            step.token_ids.append(seq.tokens[seq.draft_computed : end])
            step.starts.append(seq.draft_computed)
            step.tables.append(seq.table)
            step.want_logits.append(seq.lookahead > 0)
            seq.draft_computed = end
            if seq.lookahead > 0:
                wanting.append(seq)
        logits = forward_step(self.engine.model, self.cache, step, self._rows_head(wanting))
        proposals = {seq: Proposal([], []) for seq in wanting}
        counts = {seq: Counter(seq.counts) for seq in wanting}
        while wanting:
            more = []
            for seq, row in zip(wanting, logits, strict=True):
                prop, p = proposals[seq], seq.params
                context = seq.prompt_ids + seq.completion.token_ids + prop.tokens
                q = distribution(row, p, context, counts[seq])
                token = pick(q, p, seq.draft_generator)
                prop.tokens.append(token)
                prop.q.append(q)
                counts[seq][token] += 1
                unsure = self.min_confidence and draft_probability(row, token) < self.min_confidence
                if len(prop.tokens) < seq.lookahead and not unsure:
                    more.append(seq)
            wanting = more
            if wanting:
                step = StepInput(
                    [[proposals[s].tokens[-1]] for s in wanting],
                    [s.draft_computed + len(proposals[s].tokens) - 1 for s in wanting],
                    [s.table for s in wanting],
                    [True] * len(wanting),
                )
                logits = forward_step(self.engine.model, self.cache, step, self._rows_head(wanting))
        return proposals

    def _rolled_back(self, seq, proposal: Proposal, accepted: int) -> None:
        # The draft computed the last token and drafts[:-1]; it keeps its accepted part.
        seq.draft_computed += min(accepted, len(proposal.tokens) - 1)


class PromptLookup(Proposer):
    """Draft-free proposals by prompt lookup (Saxena 2023; ``llmctl generate --prompt-lookup``): the tokens
    that followed the latest earlier occurrence of the sequence's last n-gram (``find_draft``). The
    proposal is deterministic (q is one-hot at the draft token), so the same acceptance rule keeps sampled
    output distributed as the target's: a draft d is kept with probability p(d), a rejection resamples from
    p without d."""

    keeps_cache = False

    def __init__(self, num_draft: int, max_ngram: int = 3) -> None:
        super().__init__(num_draft)
        if max_ngram < 1:
            raise UsageError("the lookup n-gram must be at least 1 token")
        self.max_ngram = max_ngram

    def propose(self, scheduled: list) -> dict:
        from llmctl.core.generate.lookup import find_draft

        proposals = {}
        for seq, n in scheduled:
            seq.draft_computed = seq.num_computed + n
            if seq.lookahead > 0:
                tokens = find_draft(seq.tokens, seq.lookahead, self.max_ngram)
                if tokens:
                    proposals[seq] = Proposal(tokens, [])
        return proposals

    def _q(self, proposal: Proposal, i: int, p: torch.Tensor) -> torch.Tensor:
        q = torch.zeros_like(p)
        q[proposal.tokens[i]] = 1.0
        return q

    def _rolled_back(self, seq, proposal: Proposal, accepted: int) -> None:
        seq.draft_computed += accepted
