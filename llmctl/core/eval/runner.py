"""Documents → requests → scores → lm-eval-shaped results.

Few-shot examples come from the task's few-shot split with ``random.Random(seed)`` drawing
``num_fewshot`` documents per evaluated document, in document order, as lm-eval's ContextSampler does
(when the few-shot pool is the evaluated file itself, the document is excluded from its own examples).
"""

from __future__ import annotations

import math
import platform
import random
import time
from dataclasses import dataclass
from typing import Any

from llmctl import __version__
from llmctl.core.errors import UsageError
from llmctl.core.eval import metrics as M
from llmctl.core.eval.tasks import Task, doc_choices, doc_target, doc_text, read_split


@dataclass
class EvalOptions:
    data: str | None = None
    fewshot_data: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    seed: int = 1234
    batch_size: int = 8
    max_length: int | None = None
    stride: int | None = None
    device: str = "auto"
    dtype: str = "auto"


def target_text(task: Task, doc: dict) -> str:
    target = doc_target(task, doc)
    if task.output_type == "multiple_choice":
        return doc_choices(task, doc)[target]
    return str(target)


def fewshot_contexts(task: Task, docs: list[dict], opts: EvalOptions) -> list[str]:
    """The prompt of every document: few-shot examples (if any) then its own text."""
    k = task.num_fewshot if opts.num_fewshot is None else opts.num_fewshot
    if k <= 0:
        return [doc_text(task, d) for d in docs]
    pool_path = opts.fewshot_data or task.data_files.get(task.fewshot_split or "")
    if pool_path is None:
        raise UsageError(f"--num-fewshot {k} needs few-shot examples: pass --fewshot-data FILE")
    pool = read_split(task, task.fewshot_split, pool_path)
    same = pool_path == (opts.data or task.data_files.get(task.test_split or ""))
    if len(pool) < k + (1 if same else 0):
        raise UsageError(f"the few-shot file has {len(pool)} documents, fewer than --num-fewshot {k}")
    rnd = random.Random(opts.seed)
    contexts = []
    for doc in docs:
        examples = rnd.sample(pool, k + 1) if same else rnd.sample(pool, k)
        if same:
            examples = [e for e in examples if e is not doc and e != doc][:k]
        shots = task.fewshot_delimiter.join(
            doc_text(task, e) + task.target_delimiter + target_text(task, e) for e in examples
        )
        contexts.append(shots + task.fewshot_delimiter + doc_text(task, doc))
    return contexts


def evaluate(
    task: Task, model_path: str, opts: EvalOptions, progress=None
) -> tuple[dict[str, Any], list[dict]]:
    started = time.time()
    docs = read_split(task, task.test_split, opts.data)
    original = len(docs)
    if opts.limit is not None:
        docs = docs[: opts.limit]
    contexts = fewshot_contexts(task, docs, opts) if task.output_type != "loglikelihood_rolling" else []
    if task.output_type == "generate_until":
        metrics, samples, max_length = _run_generate(task, model_path, docs, contexts, opts, progress)
    else:
        scorer = _scorer(model_path, opts)
        max_length = scorer.max_length
        if task.output_type == "multiple_choice":
            metrics, samples = _run_multiple_choice(task, scorer, docs, contexts, progress)
        else:
            metrics, samples = _run_rolling(task, scorer, docs, opts)
    results = {
        "results": {task.name: {"alias": task.name, **metrics}},
        "configs": {task.name: task.config},
        "n-samples": {task.name: {"original": original, "effective": len(docs)}},
        "config": {
            "model": model_path,
            "batch_size": opts.batch_size,
            "max_length": max_length,
            "num_fewshot": task.num_fewshot if opts.num_fewshot is None else opts.num_fewshot,
            "limit": opts.limit,
            "seed": opts.seed,
            "stride": opts.stride,
            "device": opts.device,
            "dtype": opts.dtype,
        },
        "versions": {"llmctl": __version__, "python": platform.python_version(), **_lib_versions()},
        "total_evaluation_time_seconds": round(time.time() - started, 3),
    }
    return results, samples


def _lib_versions() -> dict[str, str]:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _scorer(model_path: str, opts: EvalOptions):
    from llmctl.core.eval.scoring import Scorer
    from llmctl.core.models.hf import load_model, load_tokenizer, resolve_model

    ref = resolve_model(model_path)
    model = load_model(ref, device=opts.device, dtype=opts.dtype)
    tokenizer = load_tokenizer(ref)
    max_length = opts.max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    return Scorer(model, tokenizer, int(max_length), opts.batch_size)


def _with_stderr(name: str, values: list[float], filter_name: str = "none") -> dict[str, float]:
    return {f"{name},{filter_name}": M.mean(values), f"{name}_stderr,{filter_name}": M.mean_stderr(values)}


def _run_multiple_choice(task, scorer, docs, contexts, progress):
    per_metric: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    confidences, samples = [], []
    for i, (doc, context) in enumerate(zip(docs, contexts, strict=True)):
        choices = doc_choices(task, doc)
        gold = doc_target(task, doc)
        scored = scorer.choice_loglikelihoods(context, [task.target_delimiter + c for c in choices])
        lls = [ll for ll, _ in scored]
        result = M.multiple_choice(lls, choices, gold)
        for key in per_metric:
            per_metric[key].append(result[key])
        top = max(lls)
        probs = [math.exp(ll - top) for ll in lls]
        confidences.append(max(probs) / sum(probs))
        samples.append({"doc_id": i, "doc": doc, "context": context, "target": gold, "choices": choices,
                        "loglikelihoods": lls, "is_greedy": [g for _, g in scored], **result})  # fmt: skip
        if progress:
            progress()
    wanted = {m["metric"] for m in task.metrics}
    out: dict[str, float] = {}
    for key in ("acc", "acc_norm"):
        if key in wanted or not wanted & {"acc", "acc_norm"}:
            out.update(_with_stderr(key, per_metric[key]))
    out["ece,none"] = M.expected_calibration_error(confidences, per_metric["acc"])
    return out, samples


def _run_rolling(task, scorer, docs, opts):
    texts = [target_text(task, d) for d in docs]
    if not any(texts):
        raise UsageError("every document is empty: nothing to score")
    scored = scorer.rolling_loglikelihoods(texts, stride=opts.stride)
    lls = [ll for ll, _ in scored]
    words = [M.words_of(t) for t in texts]
    nbytes = [len(t.encode("utf-8")) for t in texts]
    ntokens = [n for _, n in scored]
    out = {
        "word_perplexity,none": M.weighted_perplexity(list(zip(lls, words, strict=True))),
        "word_perplexity_stderr,none": "N/A",
        "byte_perplexity,none": M.weighted_perplexity(list(zip(lls, nbytes, strict=True))),
        "byte_perplexity_stderr,none": "N/A",
        "bits_per_byte,none": M.bits_per_byte(list(zip(lls, nbytes, strict=True))),
        "bits_per_byte_stderr,none": "N/A",
        "token_perplexity,none": M.weighted_perplexity(list(zip(lls, ntokens, strict=True))),
        "token_perplexity_stderr,none": "N/A",
    }
    samples = [{"doc_id": i, "loglikelihood": ll, "tokens": n, "words": w, "bytes": b}
               for i, (ll, n, w, b) in enumerate(zip(lls, ntokens, words, nbytes, strict=True))]  # fmt: skip
    return out, samples


def _run_generate(task, model_path, docs, contexts, opts, progress):
    from llmctl.core.generate.engine import Request, generate
    from llmctl.core.generate.run import load_engine
    from llmctl.core.generate.sampling import SamplingParams

    engine = load_engine(model_path, device=opts.device, dtype=opts.dtype)
    max_length = opts.max_length or engine.context_length
    params = SamplingParams(max_tokens=task.max_gen_toks, stop=tuple(task.until))
    keep = max(max_length - task.max_gen_toks, 1)  # lm-eval: left-truncate the context to fit
    requests = [
        Request(engine.tokenizer(c, add_special_tokens=False)["input_ids"][-keep:], params, f"doc {i}")
        for i, c in enumerate(contexts)
    ]
    responses: list[str] = []
    for b in range(0, len(requests), opts.batch_size):
        responses += [c.text for c in generate(engine, requests[b : b + opts.batch_size])]
        if progress:
            progress(len(requests[b : b + opts.batch_size]))
    pipelines = [(f.get("name", "none"), f.get("filter", [])) for f in task.filters] or [("none", [])]
    metric_cfgs = [m for m in task.metrics if m.get("metric") == "exact_match"] or [{"metric": "exact_match"}]
    cfg = metric_cfgs[0]
    out: dict[str, float] = {}
    samples = [
        {"doc_id": i, "doc": d, "context": c, "target": target_text(task, d), "response": r, "filtered": {}}
        for i, (d, c, r) in enumerate(zip(docs, contexts, responses, strict=True))
    ]
    for name, steps in pipelines:
        scores = []
        for s in samples:
            filtered = M.apply_filters(s["response"], steps)
            s["filtered"][name] = filtered
            score = M.exact_match(
                filtered,
                s["target"],
                regexes_to_ignore=cfg.get("regexes_to_ignore", []),
                ignore_case=bool(cfg.get("ignore_case", False)),
                ignore_punctuation=bool(cfg.get("ignore_punctuation", False)),
            )
            s[f"exact_match,{name}"] = score
            scores.append(score)
        out.update(_with_stderr("exact_match", scores, name))
    return out, samples, max_length
