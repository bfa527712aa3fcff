"""Training objectives: what a batch's loss is. A registry, one entry per objective.

Every objective returns the *sum* of its per-item losses plus the item count, so that gradient
accumulation (and data parallelism) normalise once, by the total over the whole optimizer step:

- ``sft``: summed token cross-entropy over trained tokens; the item is a token. Dividing the step's sum by
  the step's trained-token count gives exactly the loss of one big batch, whatever the micro-batching.
- ``dpo``, ``orpo``, ``simpo``: one loss per preference pair; the item is a pair.

The preference losses are written as pure functions of per-sequence log-probabilities, following TRL's
definitions (``DPOTrainer`` sigmoid loss, ``ORPOTrainer.odds_ratio_loss``, ``CPOTrainer`` with
``loss_type="simpo"``), so the tests can check them against hand-computed values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmctl.core.errors import UsageError
from llmctl.core.finetune.data import IGNORE


# -- pure losses on log-probabilities ---------------------------------------------------------------------
def dpo_loss(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0
):
    """Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290).

    ``logits = (log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r))`` over summed sequence
    log-probs; ``loss = −(1−ε)·logσ(β·logits) − ε·logσ(−β·logits)`` (ε: conservative DPO label smoothing).
    Returns per-pair losses and the implicit rewards ``β·(log π − log π_ref)`` of each side."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    )
    return (
        losses,
        beta * (policy_chosen - ref_chosen).detach(),
        beta * (policy_rejected - ref_rejected).detach(),
    )


def orpo_loss(avg_chosen, avg_rejected, nll_chosen, beta: float):
    """ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691) on *average* token log-probs.

    ``log odds(y) = log p − log(1 − p)`` with ``log p`` the mean token log-prob;
    ``loss = NLL(y_c) − β·logσ(log odds(y_c) − log odds(y_r))`` (β is the paper's λ)."""
    log_odds = (avg_chosen - avg_rejected) - (
        torch.log1p(-torch.exp(avg_chosen)) - torch.log1p(-torch.exp(avg_rejected))
    )
    ratio = F.logsigmoid(log_odds)
    return nll_chosen - beta * ratio, beta * avg_chosen.detach(), beta * avg_rejected.detach()


def simpo_loss(avg_chosen, avg_rejected, beta: float, gamma: float, label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734): reference-free, length-normalised.

    ``loss = −logσ(β·(avg log π(y_c) − avg log π(y_r)) − γ)``, written as TRL does with
    ``logits = Δavg − γ/β`` and ``−(1−ε)·logσ(β·logits) − ε·logσ(−β·logits)``."""
    logits = (avg_chosen - avg_rejected) - gamma / beta
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    )
    return losses, beta * avg_chosen.detach(), beta * avg_rejected.detach()


# -- from model outputs -----------------------------------------------------------------------------------
def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of target log-probs and count of trained tokens. ``logits``: [rows, seq, vocab]."""
    mask = targets != IGNORE  # [rows, seq]
    safe = targets.masked_fill(~mask, 0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # [rows, seq]
    return (logp * mask).sum(-1), mask.sum(-1)


def sft_sum(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over trained tokens, and their count."""
    vocab = logits.shape[-1]
    loss = F.cross_entropy(
        logits.float().reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE,
        reduction="sum", label_smoothing=label_smoothing,
    )  # fmt: skip
    return loss, int((targets != IGNORE).sum())


@dataclass
class Objective:
    name: str
    reference: str  # paper or definition
    preference: bool  # needs prompt/chosen/rejected data
    needs_ref_model: bool
    default_beta: float | None = None


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective("sft", "next-token cross-entropy on trained tokens", False, False),
    "dpo": Objective("dpo", "https://arxiv.org/abs/2305.18290", True, True, 0.1),
    "orpo": Objective("orpo", "https://arxiv.org/abs/2403.07691", True, False, 0.1),
    "simpo": Objective("simpo", "https://arxiv.org/abs/2405.14734", True, False, 2.0),
}


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise UsageError(f"unknown --objective {name!r}; choose one of {', '.join(OBJECTIVES)}") from None


def _model_kwargs(batch: dict) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    return kwargs


def forward_logits(model, batch: dict) -> torch.Tensor:
    """Logits at every position, ``[rows, seq, vocab]``: the reference path."""
    return model(**_model_kwargs(batch)).logits


def _decoder_and_head(model):
    """The decoder stack and LM head of a causal LM (or of a LoRA/DoRA PeftModel around one), or None where
    the logits are more than ``head(hidden)`` (soft-capping, logit scales, prompt-learning adapters)."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    decoder = getattr(base, getattr(base, "base_model_prefix", "") or "", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or head is None or decoder is base or not isinstance(head, torch.nn.Linear):
        return None
    return decoder, head


def trained_logits(model, batch: dict, *, reference: bool = False):
    """Logits at the trained positions only: ``([n, vocab], targets [n], row of each [n])``.

    The LM head (vocab × hidden: a fifth of SmolLM2-135M's weights) runs on the ``n`` trained tokens instead
    of every position, and the ``[rows, seq, vocab]`` logits never exist, which saves time and memory when
    prompts are masked. ``reference=True`` (or a model this does not apply to) computes the full logits and
    selects from them; the tests hold both paths equal.
    """
    targets = batch["targets"]
    mask = targets != IGNORE  # [rows, seq]
    rows = mask.nonzero()[:, 0]
    parts = None if reference else _decoder_and_head(model)
    if parts is None:
        return forward_logits(model, batch)[mask], targets[mask], rows
    decoder, head = parts
    hidden = decoder(**_model_kwargs(batch)).last_hidden_state  # [rows, seq, hidden]
    return head(hidden[mask]), targets[mask], rows


def fused_sft_sum(model, batch: dict, label_smoothing: float):
    """The SFT loss sum through :func:`llmctl.kernels.fused_linear_ce.fused_linear_cross_entropy` (Triton on
    CUDA, its torch reference elsewhere), or None for a model whose logits are more than ``head(hidden)``."""
    parts = _decoder_and_head(model)
    if parts is None:
        return None
    from llmctl.kernels.fused_linear_ce import fused_linear_cross_entropy

    decoder, head = parts
    targets = batch["targets"]
    mask = targets != IGNORE
    hidden = decoder(**_model_kwargs(batch)).last_hidden_state[mask]
    loss = fused_linear_cross_entropy(
        hidden, head.weight, targets[mask], bias=head.bias, reduction="sum", label_smoothing=label_smoothing
    )
    return loss, int(mask.sum()), {}


def selected_logps(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int):
    """Per-row sums of target log-probs and trained-token counts from selected logits."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [n]
    sums = torch.zeros(n_rows, dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
    return sums, torch.bincount(rows, minlength=n_rows)


def batch_loss(
    objective: Objective,
    model,
    batch: dict,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float,
    ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
    reference: bool = False,
    fused_ce: bool = False,
) -> tuple[torch.Tensor, int, dict]:
    """``(sum of per-item losses, item count, extra metrics)`` for one micro-batch. ``fused_ce`` (SFT, with
    ``--kernels``) takes the loss from llmctl's fused linear + cross-entropy kernel: the LM head and the loss
    run in chunks of tokens, so not even the trained positions' logits exist at once."""
    if fused_ce and objective.name == "sft" and not reference:
        loss = fused_sft_sum(model, batch, label_smoothing)
        if loss is not None:
            return loss
    logits, targets, rows = trained_logits(model, batch, reference=reference)
    if objective.name == "sft":
        loss = F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=label_smoothing)
        return loss, int(targets.numel()), {}
    n_rows = batch["input_ids"].shape[0]
    sums, counts = selected_logps(logits, targets, rows, n_rows)
    pairs = n_rows // 2
    chosen, rejected = sums[:pairs], sums[pairs:]
    avg = sums / counts.clamp(min=1)
    if objective.name == "dpo":
        assert ref_logps is not None
        losses, rc, rr = dpo_loss(chosen, rejected, ref_logps[0], ref_logps[1], beta, label_smoothing)
    elif objective.name == "orpo":
        nll = -avg[:pairs]
        losses, rc, rr = orpo_loss(avg[:pairs], avg[pairs:], nll, beta)
    elif objective.name == "simpo":
        losses, rc, rr = simpo_loss(avg[:pairs], avg[pairs:], beta, gamma, label_smoothing)
    else:  # pragma: no cover - registry and dispatch out of step
        raise UsageError(f"objective {objective.name} has no loss")
    extra = {
        "reward_margin_sum": float((rc - rr).sum()),
        "reward_accuracy_sum": float((rc > rr).float().sum()),
    }
    return losses.sum(), pairs, extra


@torch.no_grad()
def reference_logps(ref_model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the chosen and rejected rows under the frozen reference model."""
    n_rows = batch["input_ids"].shape[0]
    sums, _ = selected_logps(*trained_logits(ref_model, batch), n_rows)
    pairs = n_rows // 2
    return sums[:pairs], sums[pairs:]
