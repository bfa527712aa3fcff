"""Log-likelihoods from a causal LM, computed the way lm-evaluation-harness's HFLM computes them.

Tokenization: ``add_special_tokens=False``; an empty context is the model's prefix token (BOS, else EOS).
A context's trailing spaces move to the front of the continuation, the pair is encoded whole and split
at the length of the encoded context (``_encode_pair``). Rolling log-likelihood uses lm-eval's disjoint
windows (``get_rolling_token_windows`` with ``context_len=1`` + ``make_disjoint_window``): every token is
scored exactly once; the first window starts with the prefix token. ``stride`` selects the overlapping
sliding-window variant instead (each window of ``max_length`` scores only the tokens not yet scored).

Faster than scoring each pair on its own: the multiple-choice context is run once and its KV cache is
shared by all continuations (one batched forward for all choices), and rolling windows are batched by
length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Scorer:
    model: object
    tokenizer: object
    max_length: int
    batch_size: int = 8

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def _cache_kwarg(self) -> str:
        """transformers 5 renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
        import inspect

        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- multiple choice ------------------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix_token_id], self.encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        context_enc = self.encode(context)
        return context_enc, whole[len(context_enc) :]

    @torch.inference_mode()
    def choice_loglikelihoods(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, whether greedy decoding would produce it) for every continuation."""
        pairs = [self.encode_pair(context, c) for c in continuations]
        # The context encoding depends only on the (space-stripped) context, so it is shared; check anyway.
        ctx = pairs[0][0]
        if any(p[0] != ctx for p in pairs):
            return [self._single(c, x) for c, x in pairs]
        longest = max(len(x) for _, x in pairs)
        keep = self.max_length + 1 - longest  # lm-eval: (ctx + cont)[-(max_length + 1):][:-1]
        ctx = ctx[-keep:] if keep > 0 else ctx[-1:]
        device = self.device
        out = self.model(torch.tensor([ctx], device=device), use_cache=True)
        first = F.log_softmax(out.logits[0, -1].float(), -1)  # predicts each continuation's first token
        cache = out.past_key_values
        n = len(pairs)
        conts = [x for _, x in pairs]
        width = max(len(x) for x in conts) - 1
        results: list[tuple[float, bool]] = []
        if width > 0:
            cache.batch_repeat_interleave(n)
            tokens = torch.zeros((n, width), dtype=torch.long, device=device)
            mask = torch.zeros((n, len(ctx) + width), dtype=torch.long, device=device)
            mask[:, : len(ctx)] = 1
            for i, x in enumerate(conts):
                tokens[i, : len(x) - 1] = torch.tensor(x[:-1])
                mask[i, len(ctx) : len(ctx) + len(x) - 1] = 1
            logits = self.model(
                tokens, attention_mask=mask, **{self._cache_kwarg: cache}, use_cache=True
            ).logits
            rest = F.log_softmax(logits.float(), -1)
        for i, x in enumerate(conts):
            lp = [first] + ([rest[i, j] for j in range(len(x) - 1)] if width > 0 else [])
            total = sum(float(lp[j][t]) for j, t in enumerate(x))
            greedy = all(int(lp[j].argmax()) == t for j, t in enumerate(x))
            results.append((total, greedy))
        return results

    @torch.inference_mode()
    def _single(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        tokens = (ctx + cont)[-(self.max_length + 1) :][:-1]
        logits = self.model(torch.tensor([tokens], device=self.device)).logits[0].float()
        lp = F.log_softmax(logits[-len(cont) :], -1)
        target = torch.tensor(cont, device=self.device)
        return float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())

    # -- rolling perplexity ---------------------------------------------------------------------------------
    def windows(self, tokens: list[int], stride: int | None = None) -> list[tuple[list[int], list[int]]]:
        """(model input, the tokens its last positions predict) for each window of one document.

        ``full = [prefix] + tokens``; an input ``full[start:end]`` predicts ``tokens[start:end]``, of which
        only the ones not scored by an earlier window are kept as targets.
        """
        full = [self.prefix_token_id] + tokens
        n, length = len(tokens), self.max_length
        out: list[tuple[list[int], list[int]]] = []
        scored = 0
        while scored < n:
            if stride is None:  # lm-eval's disjoint windows: each new window predicts max_length new tokens
                end = min(scored + length, n)
                start = max(end - length, 0)
            else:  # sliding windows that advance by `stride`
                start = len(out) * stride
                end = min(start + length, n)
            out.append((full[start:end], tokens[scored:end]))
            scored = end
        return out

    @torch.inference_mode()
    def rolling_loglikelihoods(self, texts: list[str], stride: int | None = None) -> list[tuple[float, int]]:
        """(sum of log-probabilities, tokens scored) per text; every token scored exactly once."""
        jobs: list[tuple[int, list[int], list[int]]] = []  # (document, input, targets)
        counts = []
        for d, text in enumerate(texts):
            tokens = self.encode(text)
            counts.append(len(tokens))
            jobs += [(d, inp, tgt) for inp, tgt in self.windows(tokens, stride)]
        totals = [0.0] * len(texts)
        order = sorted(range(len(jobs)), key=lambda j: -len(jobs[j][1]))  # length-sorted batches
        for b in range(0, len(order), self.batch_size):
            batch = [jobs[j] for j in order[b : b + self.batch_size]]
            width = max(len(inp) for _, inp, _ in batch)
            tokens = torch.zeros((len(batch), width), dtype=torch.long, device=self.device)
            mask = torch.zeros_like(tokens)
            for i, (_, inp, _) in enumerate(batch):
                tokens[i, : len(inp)] = torch.tensor(inp)
                mask[i, : len(inp)] = 1
            logits = self.model(tokens, attention_mask=mask).logits
            for i, (d, inp, tgt) in enumerate(batch):
                # [len(tgt), vocab]: the positions that predict the targets are the last len(tgt) of the input
                logp = F.log_softmax(logits[i, len(inp) - len(tgt) : len(inp)].float(), -1)
                target = torch.tensor(tgt, device=self.device)
                totals[d] += float(logp.gather(-1, target[:, None]).sum())
        return list(zip(totals, counts, strict=True))
