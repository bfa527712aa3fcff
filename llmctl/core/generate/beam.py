"""Beam search with Hugging Face's semantics (``generate(num_beams=N, do_sample=False)``).

One request at a time, its ``num_beams`` beams decoded as one batch over a shared prompt prefill. Each
step follows transformers' ``_beam_search``:

1. per beam, log-softmax of the logits, then the processors (repetition/frequency/presence penalties,
   logit bias: HF applies its processors to the log-probabilities in beam search), plus the beam's
   running score;
2. the top ``max(2, 1 + number of EOS ids) * num_beams`` continuations over all beams x vocabulary;
3. a continuation that ends (an EOS or stop token id, or the last allowed token) becomes a finished
   hypothesis if it ranks among the first ``num_beams``; its score is the summed log-probability divided
   by ``generated_length ** length_penalty`` (the length counts the EOS); the best ``num_beams`` finished
   hypotheses are kept;
4. the best ``num_beams`` continuations that did not end become the running beams (the KV cache rows are
   reordered to follow their parents);
5. stop when no running beam can beat the worst finished one (``early_stopping=False``: HF's heuristic on
   the current length; ``"never"``: the bound at the maximum length when ``length_penalty > 0``), or as
   soon as ``num_beams`` hypotheses are finished (``early_stopping=True``), or at ``max_tokens``.

The ``n`` best hypotheses are returned (``n <= num_beams``, HF's ``num_return_sequences``). Stop strings
are not applied inside the search (stop token ids and EOS are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.core.errors import UsageError
from llmctl.core.generate.engine import Completion, Engine, Request, check_rows, finish_text
from llmctl.core.generate.model import KVCache
from llmctl.core.generate.sampling import process_logits

EARLY_STOPPING = ("false", "true", "never")
NEG = -1.0e9  # HF's "impossible" score


@dataclass(frozen=True)
class BeamParams:
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: str = "false"  # "false" (HF default heuristic), "true", "never"

    def validate(self) -> BeamParams:
        if self.num_beams < 1:
            raise UsageError("--num-beams must be at least 1")
        if self.early_stopping not in EARLY_STOPPING:
            raise UsageError(f"--early-stopping must be one of {', '.join(EARLY_STOPPING)}")
        return self

    @property
    def hf_early_stopping(self) -> bool | str:
        return {"false": False, "true": True, "never": "never"}[self.early_stopping]


def generate_beam(engine: Engine, request: Request, beam: BeamParams) -> list[Completion]:
    """The ``request.params.n`` best hypotheses of a beam search, best first."""
    params = request.params
    if not params.greedy:
        raise UsageError("beam search is deterministic: drop --temperature (beam sampling is not supported)")
    if params.n > beam.num_beams:
        raise UsageError(f"n={params.n} is more than --num-beams {beam.num_beams}")
    check_rows(engine, [request])
    return _search(engine, request, beam)


@torch.inference_mode()
def _search(engine: Engine, request: Request, beam: BeamParams) -> list[Completion]:
    model, device = engine.model, engine.device
    params, prompt = request.params, request.prompt_ids
    nb, p, max_new = beam.num_beams, len(prompt), request.params.max_tokens
    lp, early = beam.length_penalty, beam.hf_early_stopping
    enders = set(engine.eos_token_ids if not params.ignore_eos else ()) | set(params.stop_token_ids)
    keep = max(2, 1 + len(enders)) * nb
    total = p + max_new

    # Prefill once, then give every beam a copy of the prompt's keys and values.
    single = KVCache(model.args, 1, total, device, engine.dtype)
    tokens = torch.tensor([prompt], device=device)
    positions = torch.arange(p, device=device)[None]
    mask = torch.ones((p, p), dtype=torch.bool, device=device).tril()[None, None]
    logits = model(tokens, positions, positions[0], mask, single)[:, -1].expand(nb, -1)
    cache = KVCache.__new__(KVCache)
    cache.k = [k.repeat(nb, 1, 1, 1) for k in single.k]
    cache.v = [v.repeat(nb, 1, 1, 1) for v in single.v]
    cache.max_len = total
    del single

    running: list[list[int]] = [[] for _ in range(nb)]
    running_scores = torch.full((nb,), NEG, device=device)
    running_scores[0] = 0.0  # only the first beam is live at the start: no duplicate continuations
    finished: list[tuple[float, list[int], bool]] = []  # (score, tokens incl. the ender, ended by a token)
    improvable = True
    for step in range(max_new):
        log_probs = logits.float().log_softmax(-1)
        for i in range(nb):
            counts: dict[int, int] = {}
            for t in running[i]:
                counts[t] = counts.get(t, 0) + 1
            log_probs[i] = process_logits(log_probs[i], params, prompt + running[i], counts)
        vocab = log_probs.shape[-1]
        flat = (log_probs + running_scores[:, None]).reshape(-1)
        top_scores, top_idx = torch.topk(flat, min(keep, flat.numel()))
        parents = (top_idx // vocab).tolist()
        ids = (top_idx % vocab).tolist()
        last = step == max_new - 1
        hits = [last or t in enders for t in ids]

        # Finished hypotheses: enders among the first num_beams candidates, length-normalised.
        full = len(finished) >= nb and early is True
        if improvable and not full:
            for rank in range(min(nb, len(ids))):
                if hits[rank]:
                    score = float(top_scores[rank]) / ((step + 1) ** lp)
                    ended = ids[rank] in enders
                    finished.append((score, running[parents[rank]] + [ids[rank]], ended))
            finished.sort(key=lambda h: -h[0])  # stable: earlier hypotheses win ties, as topk on [old, new]
            del finished[nb:]

        # Running beams: the best continuations that did not end.
        alive = [r for r in range(len(ids)) if not hits[r]][:nb]
        if len(alive) < nb or last:
            break
        running = [running[parents[r]] + [ids[r]] for r in alive]
        running_scores = top_scores[alive].clone()
        order = torch.tensor([parents[r] for r in alive], device=device)
        for layer in range(len(cache.k)):
            cache.k[layer] = cache.k[layer].index_select(0, order)
            cache.v[layer] = cache.v[layer].index_select(0, order)

        # HF's early-stop heuristic, on the length generated so far.
        length = max_new if (early == "never" and lp > 0) else step + 1
        best_possible = float(running_scores[0]) / (length**lp)
        if len(finished) >= nb:
            improvable = improvable and best_possible > finished[-1][0]
        if not improvable or (len(finished) >= nb and early is True):
            break

        slot = p + step
        step_tokens = torch.tensor([r[-1] for r in running], device=device)[:, None]
        step_pos = torch.full((nb, 1), slot, device=device)
        step_mask = torch.ones((nb, 1, 1, slot + 1), dtype=torch.bool, device=device)
        logits = model(step_tokens, step_pos, torch.tensor([slot], device=device), step_mask, cache)[:, -1]

    if len(finished) < params.n:  # the search ran out of live continuations: fall back on running beams
        length = max(1, len(running[0]))
        extra = [(float(running_scores[i]) / length**lp, running[i], False) for i in range(nb)]
        finished = (finished + extra)[: params.n]
    return [_completion(engine, request, h) for h in finished[: params.n]]


def _completion(engine: Engine, request: Request, hypothesis: tuple[float, list[int], bool]) -> Completion:
    score, tokens, ended = hypothesis
    c = Completion(prompt_tokens=len(request.prompt_ids), score=score)
    if ended:
        c.token_ids = tokens[:-1]
        c.finish_reason = "stop"
    else:
        c.token_ids = tokens
        c.finish_reason = "length"
    c.text = engine.decode(c.token_ids)
    finish_text(engine, c)
    return c
