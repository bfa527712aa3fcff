"""``prune_model``: load a model, prune it with one method of the registry, write a Hugging Face directory.

Methods (the registry :data:`METHODS`):

* unstructured — ``magnitude``, ``wanda``, ``sparsegpt`` at ``sparsity`` or an N:M ``pattern``: the same
  architecture with zeros in the decoder linears (:mod:`llmctl.core.prune.unstructured`);
* depth — ``layers`` (one shot, by ``block-influence``, ``angular`` or ``ppl`` score) and
  ``progressive-layers`` (greedy on in-domain text): a physically shallower model
  (:mod:`llmctl.core.prune.depth`);
* width — ``channels`` (MLP) and ``heads`` (GQA head groups) at ``keep_ratio``: a physically narrower
  model (:mod:`llmctl.core.prune.width`);
* low rank — ``lowrank`` at ``rank_ratio`` or ``energy`` (optionally activation-weighted): linears
  factored by a truncated SVD into two thinner ones, written factored (llmctl's runtime loads it) or, with
  ``materialize``, dense (:mod:`llmctl.core.prune.lowrank`).

Depth methods can run a short LoRA recovery fine-tuning (``recover_steps``, TrimLLM-style) on the
calibration / in-domain windows: after each removal for ``progressive-layers``, once after the drop for
``layers`` (:func:`llmctl.core.finetune.steps.train_steps`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from llmctl.core.errors import InputDataError, UsageError
from llmctl.core.prune import depth
from llmctl.core.prune.masks import check_sparsity, parse_pattern
from llmctl.core.prune.unstructured import UNSTRUCTURED, prunable, prune_unstructured
from llmctl.core.quantize.calib import (
    CalibrationSpec,
    calibration_ids,
    decoder_layers,
    read_calibration_texts,
)


@dataclass(frozen=True)
class Method:
    name: str
    url: str
    kind: str  # "unstructured" | "depth"


SHORTGPT = "https://arxiv.org/abs/2403.03853 (ShortGPT), https://arxiv.org/abs/2403.17887 (angular)"
TRIMLLM = "TrimLLM-style greedy dropping on in-domain loss (https://arxiv.org/abs/2412.11242)"
LOWRANK = "truncated SVD; activation-weighted like ASVD (https://arxiv.org/abs/2312.05821)"
WIDTH = "activation-weighted {} importance (Wanda's score, structured)"
METHODS = {
    **{name: Method(name, m.url, "unstructured") for name, m in UNSTRUCTURED.items()},
    "layers": Method("layers", SHORTGPT, "depth"),
    "progressive-layers": Method("progressive-layers", TRIMLLM, "depth"),
    "heads": Method("heads", WIDTH.format("attention head group"), "width"),
    "channels": Method("channels", WIDTH.format("MLP channel"), "width"),
    "lowrank": Method("lowrank", LOWRANK, "lowrank"),
}

DEFAULT_CALIB = CalibrationSpec(samples=32, seq_len=512)


@dataclass
class PruneOptions:
    method: str = "wanda"
    sparsity: float | None = None
    pattern: str | None = None
    score: str = "block-influence"
    drop: int | None = None
    keep_ratio: float | None = None
    domain: Path | None = None
    max_loss_increase: float | None = None
    calib: CalibrationSpec = field(default_factory=lambda: replace(DEFAULT_CALIB))
    eval_path: Path | None = None
    damp: float = 0.01
    skip: tuple[str, ...] = ()
    batch_size: int = 8
    rank_ratio: float | None = None  # lowrank
    energy: float | None = None  # lowrank
    activation_weighted: bool = False  # lowrank
    materialize: bool = False  # lowrank
    recover_steps: int = 0  # depth methods: LoRA recovery steps
    recover_lr: float = 2e-4

    def check(self) -> None:
        """Every usage error that does not need the model, before anything is loaded."""
        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        kind = METHODS[self.method].kind
        if self.recover_steps < 0:
            raise UsageError(f"--recover-steps {self.recover_steps}: must be 0 or more")
        if self.recover_steps and kind != "depth":
            raise UsageError(f"--recover-steps applies to layers/progressive-layers, not {self.method}")
        if self.recover_lr <= 0:
            raise UsageError("--recover-lr must be positive")
        if kind != "lowrank":
            for flag, value in (
                ("--rank-ratio", self.rank_ratio),
                ("--energy", self.energy),
                ("--activation-weighted", self.activation_weighted or None),
                ("--materialize", self.materialize or None),
            ):
                if value is not None:
                    raise UsageError(f"{flag} applies to --method lowrank, not {self.method}")
        else:
            from llmctl.core.prune.lowrank import check_lowrank_options

            check_lowrank_options(self.rank_ratio, self.energy)
            for flag, value in (
                ("--sparsity", self.sparsity),
                ("--pattern", self.pattern),
                ("--drop", self.drop),
                ("--keep-ratio", self.keep_ratio),
                ("--domain", self.domain),
            ):
                if value is not None:
                    raise UsageError(f"{flag} does not apply to --method lowrank")
            return
        if kind == "unstructured":
            if (self.sparsity is None) == (self.pattern is None):
                raise UsageError(f"--method {self.method} needs exactly one of --sparsity S or --pattern N:M")
            if self.sparsity is not None:
                check_sparsity(self.sparsity)
            else:
                parse_pattern(self.pattern)
            for flag, value in (
                ("--drop", self.drop),
                ("--keep-ratio", self.keep_ratio),
                ("--domain", self.domain),
            ):
                if value is not None:
                    raise UsageError(
                        f"{flag} applies to --method layers/progressive-layers, not {self.method}"
                    )
            if self.damp <= 0:
                raise UsageError("--damp must be positive")
            return
        if self.sparsity is not None or self.pattern is not None:
            raise UsageError(f"--sparsity/--pattern apply to unstructured methods, not {self.method}")
        if kind == "width":
            if self.keep_ratio is None:
                raise UsageError(f"--method {self.method} needs --keep-ratio R")
            if self.drop is not None or self.domain is not None:
                raise UsageError(f"--drop/--domain apply to layer methods, not {self.method}")
            if not 0 < self.keep_ratio <= 1:
                raise UsageError(f"--keep-ratio {self.keep_ratio}: must be in (0, 1]")
            return
        if self.method == "layers":
            if self.score not in depth.SCORES:
                raise UsageError(f"unknown --score {self.score!r}; choose one of {', '.join(depth.SCORES)}")
            if self.drop is None and self.keep_ratio is None:
                raise UsageError("--method layers needs --drop K or --keep-ratio R")
        else:
            if self.domain is None:
                raise UsageError("--method progressive-layers needs --domain FILE (in-domain text)")
            if self.drop is None and self.keep_ratio is None and self.max_loss_increase is None:
                raise UsageError(
                    "--method progressive-layers needs --drop, --keep-ratio or --max-loss-increase"
                )
        if self.drop is not None and self.keep_ratio is not None:
            raise UsageError("give only one of --drop K or --keep-ratio R")


def token_windows(tokenizer, spec: CalibrationSpec) -> torch.Tensor:
    """Like :func:`calibration_ids`, but a file with fewer tokens than asked gives as many whole windows
    as it holds (at least one) instead of an error: in-domain sets are often small."""
    if spec.path is None:
        return calibration_ids(tokenizer, spec)
    ids: list[int] = []
    for text in read_calibration_texts(spec):
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    windows = min(spec.samples, len(ids) // spec.seq_len)
    if windows == 0:
        raise InputDataError(
            f"{spec.path} has {len(ids):,} tokens, fewer than one window of --calib-seq-len {spec.seq_len}"
        )
    return torch.tensor(ids[: windows * spec.seq_len], dtype=torch.long).reshape(windows, spec.seq_len)


def count_parameters(model) -> int:
    """Distinct parameters (a tied lm_head counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def perplexity(
    model, tokenizer, texts: list[str], batch_size: int = 8, max_length: int | None = None
) -> float:
    """Token perplexity over ``texts`` with eval's rolling windows (every token scored once)."""
    from llmctl.core.eval.scoring import Scorer

    limit = max_length or min(int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 2048)
    pairs = Scorer(model, tokenizer, limit, batch_size).rolling_loglikelihoods(texts)
    tokens = sum(n for _, n in pairs)
    if tokens == 0:
        raise InputDataError("--eval text has no tokens")
    return math.exp(-sum(ll for ll, _ in pairs) / tokens)


@torch.no_grad()
def prune_loaded(model, tokenizer, opts: PruneOptions, *, warn=None, progress=None) -> dict[str, Any]:
    """Prune ``model`` in place; the report (method, per-layer rows, what was dropped)."""
    opts.check()
    warn = warn or (lambda message: None)
    kind = METHODS[opts.method].kind
    if kind == "unstructured":
        pattern = parse_pattern(opts.pattern) if opts.pattern else None
        ids = calibration_ids(tokenizer, opts.calib) if UNSTRUCTURED[opts.method].stats else None
        rows = prune_unstructured(
            model, opts.method, sparsity=opts.sparsity, pattern=pattern, ids=ids, batch_size=opts.batch_size,
            damp=opts.damp, skip=opts.skip, warn=warn, progress=progress,
        )  # fmt: skip
        total = sum(r["shape"][0] * r["shape"][1] for r in rows)
        zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in rows)
        return {
            "target": opts.pattern or opts.sparsity,
            "sparsity": zeros / total if total else 0.0,
            "layers": rows,
        }
    if kind == "width":
        from llmctl.core.prune.width import check_architecture, prune_width

        check_architecture(model, opts.method)
        ids = calibration_ids(tokenizer, opts.calib)
        return prune_width(
            model, ids, opts.method, opts.keep_ratio, batch_size=opts.batch_size, progress=progress
        )
    if kind == "lowrank":
        from llmctl.core.prune.lowrank import prune_lowrank

        ids = calibration_ids(tokenizer, opts.calib) if opts.activation_weighted else None
        rows = prune_lowrank(
            model, rank_ratio=opts.rank_ratio, energy=opts.energy, ids=ids, batch_size=opts.batch_size,
            skip=opts.skip, progress=progress,
        )  # fmt: skip
        dense = [r["name"] for r in rows if not r["factored"]]
        if dense:
            warn(
                f"{len(dense)} of {len(rows)} linears kept dense: at their rank two factors would not be "
                f"smaller (e.g. {dense[0]})"
            )
        return {
            "target": {"rank_ratio": opts.rank_ratio}
            if opts.rank_ratio is not None
            else {"energy": opts.energy},
            "activation_weighted": opts.activation_weighted,
            "factored": len(rows) - len(dense),
            "kept_dense": dense,
            "ranks": {r["name"]: r["rank"] for r in rows if r["factored"]},
            "layers": rows,
        }
    n = len(decoder_layers(model))
    recover = None
    if opts.recover_steps:
        from llmctl.core.finetune.steps import train_steps

        def recover(m, ids):
            return train_steps(m, ids, steps=opts.recover_steps, lr=opts.recover_lr,
                               batch_size=min(opts.batch_size, 4), seed=0)  # fmt: skip

    if opts.method == "layers":
        k = depth.drop_count(n, opts.drop, opts.keep_ratio)
        ids = calibration_ids(tokenizer, opts.calib)
        plan = depth.plan_one_shot(model, ids, opts.score, k, batch_size=opts.batch_size, progress=progress)
        if recover and plan.drop:
            with depth.without_layers(model, plan.drop):
                before = depth.mean_loss(model, ids, opts.batch_size)
                stats = recover(model, ids)
                after = depth.mean_loss(model, ids, opts.batch_size)
            plan.details["recovery"] = {
                "steps": stats["steps"], "loss_before": before, "loss_after": after, "lr": opts.recover_lr,
            }  # fmt: skip
    else:
        if opts.drop is None and opts.keep_ratio is None:
            k = n - 1
        else:
            k = depth.drop_count(n, opts.drop, opts.keep_ratio)
        ids = token_windows(tokenizer, replace(opts.calib, path=opts.domain))
        plan = depth.progressive_drop(
            model, ids, max_drop=k, max_loss_increase=opts.max_loss_increase, batch_size=opts.batch_size,
            progress=progress, recover=recover,
        )  # fmt: skip
    depth.remove_layers(model, plan.drop)
    return {
        "score": plan.score,
        "num_layers_before": n,
        "num_layers_after": n - len(plan.drop),
        "dropped": plan.drop,
        "layers": [{"index": i, "score": plan.scores[i], "dropped": i in plan.drop} for i in range(n)],
        **plan.details,
    }


def prune_model(
    model_path: str,
    output: Path,
    opts: PruneOptions,
    *,
    force: bool = False,
    warn=None,
    progress=None,
    seed: int = 0,
) -> dict[str, Any]:
    """The whole command: load, prune, (evaluate), write ``output`` atomically with ``llmctl.json``."""
    from llmctl.core.io import atomic_output
    from llmctl.core.io.atomic import check_output
    from llmctl.core.models.hf import load_model, load_tokenizer, resolve_model, save_model
    from llmctl.core.provenance import now, write_provenance

    opts.check()
    check_output(output, force=force)
    started = now()
    ref = resolve_model(model_path)
    torch.manual_seed(seed)
    model = load_model(ref, device="cpu", dtype="float32")
    tokenizer = load_tokenizer(ref)
    decoder_layers(model)  # an unsupported architecture fails before any work
    if METHODS[opts.method].kind == "unstructured" and not prunable(model, opts.skip):
        raise UsageError("no linear layers left to prune (check --skip)")
    eval_texts = (
        read_calibration_texts(CalibrationSpec(opts.eval_path, opts.calib.text_field))
        if opts.eval_path
        else None
    )
    params_before = count_parameters(model)
    ppl_before = perplexity(model, tokenizer, eval_texts, opts.batch_size) if eval_texts else None
    t0 = time.perf_counter()
    report = prune_loaded(model, tokenizer, opts, warn=warn, progress=progress)
    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {"output": str(output), "method": opts.method, **report}
    summary["parameters_before"] = params_before
    summary["parameters_after"] = count_parameters(model)
    spec = None
    if opts.method == "lowrank":
        from llmctl.core.prune.lowrank import CONFIG_KEY, lowrank_spec, materialize

        spec = lowrank_spec(model)
        summary["materialized"] = opts.materialize
    summary["prune_seconds"] = round(seconds, 3)
    if eval_texts:
        summary["perplexity_before"] = ppl_before
        summary["perplexity_after"] = perplexity(model, tokenizer, eval_texts, opts.batch_size)
    if spec is not None:
        if opts.materialize:  # dense B·A: a plain checkpoint any tool loads (as large as the original)
            materialize(model)
            summary["parameters_written"] = count_parameters(model)
        elif spec:  # factored: config.json says which linears are two (see lowrank.py for the format)
            setattr(model.config, CONFIG_KEY, spec)
    c = opts.calib
    if opts.method != "magnitude" and not (opts.method == "lowrank" and not opts.activation_weighted):
        data = opts.domain if opts.method == "progressive-layers" else c.path
        summary["calibration"] = {"samples": c.samples, "seq_len": c.seq_len, "file": data and str(data)}
    inputs = [model_path] + [p for p in (c.path, opts.domain, opts.eval_path) if p]
    with atomic_output(output, force=force) as tmp:
        save_model(model, tokenizer, tmp)
        summary["size_bytes"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        write_provenance(
            tmp, command="prune", inputs=inputs, started_at=started, seed=seed, extra={"summary": summary}
        )
    return summary


def table_lines(summary: dict[str, Any]) -> list[str]:
    """The human report (stderr): one line per layer, then totals."""
    lines = []
    if "sparsity" in summary:
        lines.append(f"{'layer':<44}{'shape':>14}{'sparsity':>10}")
        for r in summary["layers"]:
            shape = "x".join(map(str, r["shape"]))
            lines.append(f"{r['name']:<44}{shape:>14}{r['sparsity']:>10.4f}")
        lines.append(f"{'total':<44}{'':>14}{summary['sparsity']:>10.4f}")
    elif "sizes" in summary:
        lines.append(f"{'layer':<8}{'kept ' + summary['unit'] + 's':>18}{'score kept':>12}")
        for r in summary["layers"]:
            lines.append(f"{r['index']:<8}{len(r['kept']):>18}{r['kept_score_share']:>12.4f}")
        for key, (before, after) in summary["sizes"].items():
            lines.append(f"{key}: {before} -> {after}")
    elif "ranks" in summary:
        lines.append(f"{'layer':<44}{'shape':>14}{'rank':>8}{'energy':>9}  factored")
        for r in summary["layers"]:
            shape = "x".join(map(str, r["shape"]))
            mark = "yes" if r["factored"] else "no (dense is smaller)"
            lines.append(f"{r['name']:<44}{shape:>14}{r['rank']:>8}{r['energy_kept']:>9.4f}  {mark}")
    else:
        lines.append(f"{'layer':<8}{summary['score']:>18}  dropped")
        for r in summary["layers"]:
            score = "-" if r["score"] is None else f"{r['score']:.5f}"
            lines.append(f"{r['index']:<8}{score:>18}  {'yes' if r['dropped'] else ''}")
        lines.append(f"layers: {summary['num_layers_before']} -> {summary['num_layers_after']}")
    lines.append(f"parameters: {summary['parameters_before']:,} -> {summary['parameters_after']:,}")
    if "recovery" in summary:
        rec = summary["recovery"]
        lines.append(
            f"recovery: {rec['steps']} LoRA steps, loss {rec['loss_before']:.4f} -> {rec['loss_after']:.4f}"
        )
    if "final_domain_loss" in summary:
        lines.append(
            f"in-domain loss: {summary['domain_loss']:.4f} -> {summary['final_domain_loss']:.4f} "
            "(after the last recovery)"
        )
    if "perplexity_after" in summary:
        lines.append(f"perplexity: {summary['perplexity_before']:.3f} -> {summary['perplexity_after']:.3f}")
    return lines
