"""From JSONL records to completions: prompts, chat templates, per-record overrides, output records."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from llmctl.core.errors import InputDataError
from llmctl.core.generate.constrained import Constraint, compiler_for
from llmctl.core.generate.engine import Completion, Engine, Request, as_dict, generate
from llmctl.core.generate.model import load_decoder
from llmctl.core.generate.sampling import SAMPLING_KEYS, SamplingParams
from llmctl.core.io.jsonl import ReadStats, Record

CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}


def load_engine(model_path: str, *, device: str = "auto", dtype: str = "auto") -> Engine:
    from llmctl.core.models.hf import load_tokenizer, resolve_model

    ref = resolve_model(model_path)
    model, config = load_decoder(ref, device=device, dtype=dtype)
    tokenizer = load_tokenizer(ref)
    eos = set()
    for source in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, list):
            eos.update(source)
    generation_eos = _generation_config_eos(ref)
    eos.update(generation_eos)
    return Engine(model, tokenizer, sorted(eos))


def _generation_config_eos(ref) -> list[int]:
    import json

    path = ref.path / "generation_config.json" if ref.kind == "hf" else None
    if path is None or not path.is_file():
        return []
    value = json.loads(path.read_text()).get("eos_token_id")
    return [value] if isinstance(value, int) else list(value or [])


def prompt_of(record: dict) -> tuple[Any, str | None]:
    """``extract`` for generate: a ``prompt`` string or a ``messages`` list of {role, content}."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return None, "field 'messages' must be a non-empty list"
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return None, "every message needs a string 'content'"
            if m.get("role") not in CHAT_ROLES:
                return (
                    None,
                    f"unknown chat role {m.get('role')!r} (expected one of {', '.join(sorted(CHAT_ROLES))})",
                )
        return ("chat", messages), None
    if isinstance(record.get("prompt"), str):
        return ("text", record["prompt"]), None
    return None, "needs a string 'prompt' or a 'messages' list"


def encode_prompt(engine: Engine, kind: str, value: Any) -> list[int]:
    tok = engine.tokenizer
    if kind == "chat":
        if not getattr(tok, "chat_template", None):
            raise InputDataError("this model has no chat template; send 'prompt' instead of 'messages'")
        text = tok.apply_chat_template(value, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(value)["input_ids"]


def make_request(
    engine: Engine, record: Record, defaults: SamplingParams, constraint: Constraint | None = None
) -> Request:
    kind, value = record.text
    overrides = {k: record.data[k] for k in SAMPLING_KEYS if k in record.data}
    try:
        params = defaults.with_overrides(overrides).validate()
    except ValueError as e:
        raise InputDataError(f"{record.where}: {e}") from None
    except Exception as e:  # UsageError from validate(): it is this line's value that is wrong
        raise InputDataError(f"{record.where}: {e}") from None
    try:  # a line's own OpenAI-style response_format wins over the command's constraint
        constraint = Constraint.from_response_format(record.data.get("response_format")) or constraint
    except ValueError as e:
        raise InputDataError(f"{record.where}: {e}") from None
    if constraint is not None:
        compiler_for(engine).compile(constraint, record.where)  # a bad schema fails on its own line
    return Request(encode_prompt(engine, kind, value), params, record.where, constraint)


def complete_records(
    engine: Engine,
    records: Iterable[Record],
    defaults: SamplingParams,
    *,
    batch_size: int = 8,
    skip_bad_lines: bool = False,
    read_stats: ReadStats | None = None,
    one_at_a_time: Callable[..., list[Completion]] | None = None,
    constraint: Constraint | None = None,
    on_delta: Callable[[Record, int, str], None] | None = None,
) -> Iterator[dict]:
    """Yield each record with its completion(s) added, in input order.

    ``one_at_a_time(request, on_token)`` replaces the batched engine with a per-request decoder (beam
    search, prompt lookup, lookahead, speculative decoding), returning the request's ``n`` completions.
    ``on_delta(record, sample_index, text)`` is called with each piece of text as it is produced.
    """
    batch: list[tuple[Record, Request]] = []

    def flush() -> Iterator[dict]:
        if one_at_a_time is not None:
            done: list[Completion] = []
            for record, req in batch:
                stream = (lambda row, text, record=record: on_delta(record, row, text)) if on_delta else None
                done += one_at_a_time(req, stream)
            completions = iter(done)
        else:
            owners = [(record, i) for record, req in batch for i in range(req.params.n)]
            stream = (lambda row, text: on_delta(*owners[row], text)) if on_delta else None
            completions = iter(generate(engine, [req for _, req in batch], on_token=stream))
        for record, req in batch:
            samples = [next(completions) for _ in range(req.params.n)]
            yield output_record(engine, record, req, samples)

    for record in records:
        try:
            request = make_request(engine, record, defaults, constraint)
            if len(request.prompt_ids) >= engine.context_length:
                raise InputDataError(
                    f"{record.where}: prompt of {len(request.prompt_ids)} tokens does not fit the context "
                    f"of {engine.context_length}"
                )
        except InputDataError as e:
            if skip_bad_lines and read_stats is not None:
                read_stats.skip(e.message)
                continue
            raise
        batch.append((record, request))
        if len(batch) >= batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def output_record(engine: Engine, record: Record, req: Request, samples: list[Completion]) -> dict:
    out = record.data
    kind, _ = record.text
    want_logprobs = req.params.logprobs or req.params.top_logprobs > 0

    def one(c: Completion) -> dict:
        body = (
            {"message": {"role": "assistant", "content": c.text}}
            if kind == "chat"
            else {"completion": c.text}
        )
        return body | as_dict(c, engine.tokenizer, logprobs=want_logprobs)

    if len(samples) == 1:
        out.update(one(samples[0]))
    else:
        out["choices"] = [one(c) | {"index": i} for i, c in enumerate(samples)]
        out["usage"] = {
            "prompt_tokens": samples[0].prompt_tokens,
            "completion_tokens": sum(len(c.token_ids) for c in samples),
            "total_tokens": samples[0].prompt_tokens + sum(len(c.token_ids) for c in samples),
        }
    return out
