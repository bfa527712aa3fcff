"""Documents → requests → per-document scores → lm-eval-shaped results.

Few-shot examples come from the task's few-shot split with ``random.Random(seed)`` drawing
``num_fewshot`` documents per evaluated document, in document order, as lm-eval's ContextSampler does
(when the few-shot pool is the evaluated file itself, the document is excluded from its own examples).

Every run keeps one small record of numbers per document (``per_doc``); the task's metrics are
aggregated from those alone (:func:`aggregate`). That is what makes ``--shard i/n`` exact: each shard
stores its ``per_doc`` records, and :func:`merge_shards` puts them back in document order and aggregates
them the same way, giving the numbers of a single run.
"""

from __future__ import annotations

import math
import platform
import random
import time
from dataclasses import dataclass
from typing import Any

from llmctl import __version__
from llmctl.core.errors import InputDataError, UsageError
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
    shard: tuple[int, int] | None = None  # (index, count), index from 0
    fit_temperature: str | None = None  # validation file for temperature scaling (multiple choice)


def parse_shard(value: str) -> tuple[int, int]:
    """``"i/n"`` with 0 <= i < n."""
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError:
        raise UsageError(f"--shard {value!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise UsageError(f"--shard {value!r}: i must be in 0..n-1")
    return index, count


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
    # Few-shot contexts are drawn for all documents before sharding, so a shard sees the same examples.
    contexts = fewshot_contexts(task, docs, opts) if task.output_type != "loglikelihood_rolling" else []
    doc_ids = list(range(len(docs)))
    if opts.shard is not None:
        index, count = opts.shard
        doc_ids = doc_ids[index::count]
        docs = [docs[i] for i in doc_ids]
        contexts = [contexts[i] for i in doc_ids] if contexts else []
    extra: dict[str, Any] = {}
    if task.output_type == "generate_until":
        per_doc, samples, max_length = _run_generate(task, model_path, docs, contexts, opts, progress)
    else:
        scorer = _scorer(model_path, opts)
        max_length = scorer.max_length
        if task.output_type == "multiple_choice":
            per_doc, samples = _run_multiple_choice(task, scorer, docs, contexts, progress)
            if opts.fit_temperature:
                extra = _temperature_scaling(task, scorer, opts, per_doc)
        else:
            per_doc, samples = _run_rolling(task, scorer, docs, opts)
    for doc_id, sample in zip(doc_ids, samples, strict=True):
        sample["doc_id"] = doc_id
    metrics = aggregate(task, per_doc) | extra
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
        "model_provenance": model_provenance(model_path),
        "versions": {"llmctl": __version__, "python": platform.python_version(), **_lib_versions()},
        "total_evaluation_time_seconds": round(time.time() - started, 3),
    }
    if opts.shard is not None:
        results["shard"] = {
            "index": opts.shard[0],
            "count": opts.shard[1],
            "doc_ids": doc_ids,
            "per_doc": per_doc,
            "task": task.config,
        }
    return results, samples


def aggregate(task: Task, per_doc: list[dict[str, float]]) -> dict[str, Any]:
    """The task's metrics from the per-document numbers, as lm-eval aggregates them."""
    if not per_doc:
        raise InputDataError("no documents to evaluate")
    if task.output_type == "multiple_choice":
        out: dict[str, Any] = {}
        for key in ("acc", "acc_norm"):
            values = [d[key] for d in per_doc]
            out[f"{key},none"], out[f"{key}_stderr,none"] = M.mean(values), M.mean_stderr(values)
        out["ece,none"] = M.expected_calibration_error(
            [d["confidence"] for d in per_doc], [d["acc"] for d in per_doc]
        )
        return out
    if task.output_type == "loglikelihood_rolling":
        lls = [d["ll"] for d in per_doc]

        def pairs(key):
            return list(zip(lls, [d[key] for d in per_doc], strict=True))

        return {
            "word_perplexity,none": M.weighted_perplexity(pairs("words")),
            "word_perplexity_stderr,none": "N/A",
            "byte_perplexity,none": M.weighted_perplexity(pairs("bytes")),
            "byte_perplexity_stderr,none": "N/A",
            "bits_per_byte,none": M.bits_per_byte(pairs("bytes")),
            "bits_per_byte_stderr,none": "N/A",
            "token_perplexity,none": M.weighted_perplexity(pairs("tokens")),
            "token_perplexity_stderr,none": "N/A",
        }
    out = {}
    for key in per_doc[0]:
        metric, _, name = key.partition(",")
        values = [d[key] for d in per_doc]
        out[f"{metric},{name}"], out[f"{metric}_stderr,{name}"] = M.mean(values), M.mean_stderr(values)
    return out


def merge_shards(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Results of ``--shard`` runs → the results of one run over all their documents."""
    if not shards:
        raise UsageError("--merge-shards needs at least one shard results file")
    infos = [s.get("shard") for s in shards]
    if any(i is None for i in infos):
        raise InputDataError("a file given to --merge-shards was not written by an `llmctl eval --shard` run")
    counts = {i["count"] for i in infos}
    indexes = sorted(i["index"] for i in infos)
    if len(counts) != 1 or indexes != list(range(counts.pop())):
        raise InputDataError(f"--merge-shards needs every shard 0..n-1 exactly once; got indexes {indexes}")
    names = {next(iter(s["results"])) for s in shards}
    if len(names) != 1:
        raise InputDataError(f"shards of different tasks: {sorted(names)}")
    per_doc = sorted(
        (
            (doc_id, record)
            for info in infos
            for doc_id, record in zip(info["doc_ids"], info["per_doc"], strict=True)
        ),
        key=lambda pair: pair[0],
    )
    task_config = infos[0]["task"]
    task = Task(**{k: v for k, v in task_config.items() if k in Task.__dataclass_fields__})
    merged = {k: v for k, v in shards[0].items() if k != "shard"}
    merged["results"] = {task.name: {"alias": task.name, **aggregate(task, [r for _, r in per_doc])}}
    merged["n-samples"] = {task.name: {"original": shards[0]["n-samples"][task.name]["original"],
                                       "effective": len(per_doc)}}  # fmt: skip
    merged["total_evaluation_time_seconds"] = round(
        sum(s["total_evaluation_time_seconds"] for s in shards), 3
    )
    merged["config"] = {**shards[0]["config"], "merged_shards": len(shards)}
    return merged


def model_provenance(model_path: str) -> dict[str, Any]:
    """Which model was evaluated: its path, the sha256 of its config (or of the GGUF file), and the
    ``llmctl.json`` of the command that made it, when llmctl made it."""
    import json
    from pathlib import Path

    from llmctl.core.provenance import PROVENANCE_FILE, sha256_file

    path = Path(model_path).resolve()
    out: dict[str, Any] = {"path": str(path)}
    if path.is_file():
        out["sha256"] = sha256_file(path)
        return out
    if (path / "config.json").is_file():
        out["config_sha256"] = sha256_file(path / "config.json")
    made_by = path / PROVENANCE_FILE
    if made_by.is_file():
        try:
            out["made_by"] = json.loads(made_by.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            out["made_by"] = None
    return out


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


def _choice_scores(task, scorer, docs, contexts, progress=None):
    """For each document: (log-likelihood of each choice, is_greedy of each choice, choices, gold)."""
    out = []
    for doc, context in zip(docs, contexts, strict=True):
        choices = doc_choices(task, doc)
        gold = doc_target(task, doc)
        scored = scorer.choice_loglikelihoods(context, [task.target_delimiter + c for c in choices])
        out.append(([ll for ll, _ in scored], [g for _, g in scored], choices, gold))
        if progress:
            progress()
    return out


def _softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    top = max(values)
    exps = [math.exp((v - top) / temperature) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _run_multiple_choice(task, scorer, docs, contexts, progress):
    per_doc, samples = [], []
    for doc, context, (lls, greedy, choices, gold) in zip(
        docs, contexts, _choice_scores(task, scorer, docs, contexts, progress), strict=True
    ):
        result = M.multiple_choice(lls, choices, gold)
        confidence = max(_softmax(lls))
        per_doc.append({**result, "confidence": confidence, "lls": lls, "gold": gold})
        samples.append({"doc": doc, "context": context, "target": gold, "choices": choices,
                        "loglikelihoods": lls, "is_greedy": greedy, **result})  # fmt: skip
    return per_doc, samples


def fit_temperature(lls: list[list[float]], golds: list[int]) -> float:
    """The temperature T minimising the negative log-likelihood of the gold choices under softmax(ll / T)
    (Guo et al. 2017), by golden-section search over log T in [-4, 4] (the NLL is unimodal in T)."""

    def nll(log_t: float) -> float:
        t = math.exp(log_t)
        return -sum(math.log(max(_softmax(row, t)[g], 1e-300)) for row, g in zip(lls, golds, strict=True))

    lo, hi = -4.0, 4.0
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def _temperature_scaling(task, scorer, opts, per_doc) -> dict[str, float]:
    val_docs = read_split(task, None, opts.fit_temperature)
    val_contexts = fewshot_contexts(task, val_docs, opts)
    scores = _choice_scores(task, scorer, val_docs, val_contexts)
    temperature = fit_temperature([s[0] for s in scores], [s[3] for s in scores])
    confidences = [max(_softmax(d["lls"], temperature)) for d in per_doc]
    return {
        "temperature,none": temperature,
        "ece_calibrated,none": M.expected_calibration_error(confidences, [d["acc"] for d in per_doc]),
    }


def _run_rolling(task, scorer, docs, opts):
    texts = [target_text(task, d) for d in docs]
    if not any(texts):
        raise InputDataError("every document is empty: nothing to score")
    scored = scorer.rolling_loglikelihoods(texts, stride=opts.stride)
    per_doc = [
        {"ll": ll, "words": M.words_of(t), "bytes": len(t.encode("utf-8")), "tokens": n}
        for (ll, n), t in zip(scored, texts, strict=True)
    ]
    samples = [{"loglikelihood": d["ll"], **{k: d[k] for k in ("tokens", "words", "bytes")}} for d in per_doc]
    return per_doc, samples


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
    cfg = next((m for m in task.metrics if m.get("metric") == "exact_match"), {"metric": "exact_match"})
    per_doc, samples = [], []
    for doc, context, response in zip(docs, contexts, responses, strict=True):
        target = target_text(task, doc)
        record, filtered = {}, {}
        for name, steps in pipelines:
            filtered[name] = M.apply_filters(response, steps)
            record[f"exact_match,{name}"] = M.exact_match(
                filtered[name],
                target,
                regexes_to_ignore=cfg.get("regexes_to_ignore", []),
                ignore_case=bool(cfg.get("ignore_case", False)),
                ignore_punctuation=bool(cfg.get("ignore_punctuation", False)),
            )
        per_doc.append(record)
        samples.append({"doc": doc, "context": context, "target": target, "response": response,
                        "filtered": filtered, **record})  # fmt: skip
    return per_doc, samples, max_length
