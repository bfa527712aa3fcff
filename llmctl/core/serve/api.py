"""The OpenAI-compatible HTTP API (FastAPI) over an :class:`~llmctl.core.serve.engine.AsyncEngine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream as server-sent events ending
with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus),
``POST /tokenize``, ``POST /detokenize``. Errors use OpenAI's body
``{"error": {"message", "type", "param", "code"}}``: 400 invalid request (bad JSON, wrong types, a prompt
that does not fit), 401 bad or missing API key (when one is set), 404 unknown model or route, 429 waiting
queue full, 503 shutting down, 500 anything unexpected. Every handler catches what it raises, so no
request can take the server down.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmctl.core.errors import InputDataError
from llmctl.core.generate.constrained import Constraint, compiler_for
from llmctl.core.generate.engine import Completion, Engine
from llmctl.core.generate.sampling import SamplingParams
from llmctl.core.serve.engine import AsyncEngine, EngineStoppedError, QueueFullError, RequestError
from llmctl.core.serve.metrics import ServeMetrics
from llmctl.core.serve.tools import (
    check_tools,
    parse_tool_calls,
    select_tools,
    template_takes_tools,
    with_tool_system_prompt,
)


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- request bodies (unknown fields are ignored, as OpenAI's own server does for forward compatibility) --
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo: score the prompt
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None


class _AuthMiddleware:
    """401 unless ``Authorization: Bearer KEY`` matches (when a key is set) on /v1, /tokenize, /detokenize.

    A plain ASGI middleware: unlike ``@app.middleware("http")`` it does not wrap streamed responses, so a
    client disconnect still reaches (and cancels) the stream."""

    PROTECTED = ("/v1", "/tokenize", "/detokenize")

    def __init__(self, app, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if self.api_key and scope["type"] == "http" and scope["path"].startswith(self.PROTECTED):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), self.api_key.encode()):
                message = "invalid API key" if given else "missing API key (send 'Authorization: Bearer KEY')"
                error = APIError(401, message, "authentication_error", code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class StreamGroup:
    """The engine requests of one API request (one per prompt), their events on one queue, choices
    numbered prompt-major: prompt i's j-th sample is choice ``i * n + j``."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.streams: list = []

    @property
    def n(self) -> int:
        return sum(s.n for s in self.streams)


@dataclass
class ServerState:
    engine: Engine  # model + tokenizer (for prompts and /tokenize)
    async_engine: AsyncEngine
    metrics: ServeMetrics
    model_name: str
    api_key: str | None = None
    created: int = 0


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg')}" if where else str(err.get("msg")), where or None


def _sampling_params(
    body: _Sampling, *, max_tokens: int | None, top_logprobs: int, logprobs: bool
) -> SamplingParams:
    stop = body.stop
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    try:
        bias = {int(k): float(v) for k, v in (body.logit_bias or {}).items()}
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
    if any(k < 0 for k in bias):
        raise APIError(400, "logit_bias keys must be token ids (>= 0)", param="logit_bias")
    if any(not -100 <= v <= 100 for v in bias.values()):
        raise APIError(400, "logit_bias values must be in [-100, 100]", param="logit_bias")
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 1 << 30,
        temperature=body.temperature,
        top_k=max(body.top_k, 0),
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        logit_bias=bias,
        stop=stop,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        n=body.n,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def build_app(state: ServerState):
    app = FastAPI(title="llmctl serve", docs_url=None, redoc_url=None, openapi_url=None)
    state.created = int(time.time())
    tok = state.engine.tokenizer

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, e: RequestValidationError):
        return error_response(APIError(400, str(e.errors()[:1])))

    @app.exception_handler(Exception)
    async def _internal_error(_request, e: Exception):
        return error_response(
            APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_server_error")
        )

    app.add_middleware(_AuthMiddleware, api_key=state.api_key)

    async def parse(request: Request, model_cls):
        try:
            raw = await request.body()
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            body = model_cls.model_validate(data)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(400, message, param=param) from None
        if body.model is not None and body.model != state.model_name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server has {state.model_name!r}",
                "not_found_error",
                param="model",
                code="model_not_found",
            )
        return body

    def check_room(prompt_ids: list[int], max_tokens: int | None) -> None:
        core = state.async_engine.core
        try:
            core.check_prompt(prompt_ids)
        except RequestError as e:
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None

    def response_constraint(response_format) -> Constraint | None:
        """OpenAI's response_format as a grammar constraint, compiled now so a bad schema is a 400."""
        try:
            constraint = Constraint.from_response_format(response_format)
            if constraint is not None:
                compiler_for(state.async_engine.core.engine).compile(constraint)
        except (ValueError, InputDataError) as e:
            message = e.message if isinstance(e, InputDataError) else str(e)
            raise APIError(400, message, param="response_format") from None
        return constraint

    def submit(
        prompt_ids: list[int],
        params: SamplingParams,
        prefix: str,
        constraint=None,
        *,
        group: StreamGroup | None = None,
        prompt_logprobs: int | None = None,
    ) -> StreamGroup:
        group = group if group is not None else StreamGroup()
        try:
            stream = state.async_engine.submit(
                prompt_ids,
                params,
                prefix,
                constraint,
                prompt_logprobs=prompt_logprobs,
                queue=group.queue,
                offset=group.n,
            )
            group.streams.append(stream)
            return group
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full") from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), "service_unavailable") from None
        except RequestError as e:
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None

    def abort(group: StreamGroup) -> None:
        for stream in group.streams:
            state.async_engine.abort(stream)

    async def collect(group: StreamGroup, request: Request) -> list:
        """Wait for every sequence of the group; abort them all if the client goes away (or on an
        error). Returns the finished sequences in choice order."""
        done: dict[int, Any] = {}
        try:
            while len(done) < group.n:
                try:
                    kind, index, payload = await asyncio.wait_for(group.queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise APIError(499, "client disconnected") from None
                    continue
                if kind == "error":
                    raise APIError(500, payload, "internal_server_error")
                if kind == "finish":
                    done[index] = payload
        finally:
            if len(done) < group.n:
                abort(group)
        return [done[i] for i in range(group.n)]

    def usage(prompt_tokens: int, completions: list[Completion]) -> dict:
        gen = sum(len(c.token_ids) for c in completions)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": gen, "total_tokens": prompt_tokens + gen}

    def token_str(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def completion_logprobs(
        token_ids: list[int],
        logprobs: list[float | None],
        top: list[dict[int, float] | None],
        k: int,
        offset: int = 0,
    ) -> dict:
        """OpenAI's legacy ``logprobs`` object; ``offset``: where the first token's text starts."""
        tokens = [token_str(t) for t in token_ids]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        out = {"tokens": tokens, "token_logprobs": logprobs[: len(tokens)], "text_offset": offsets}
        out["top_logprobs"] = (
            [None if d is None else {token_str(t): v for t, v in d.items()} for d in top[: len(tokens)]]
            if k
            else None
        )
        return out

    def chat_logprobs(token_ids: list[int], logprobs: list[float], top: list[dict[int, float]]) -> dict:
        content = []
        for i, t in enumerate(token_ids):
            s = token_str(t)
            alternatives = top[i] if i < len(top) else {}
            content.append(
                {
                    "token": s,
                    "logprob": logprobs[i] if i < len(logprobs) else None,
                    "bytes": list(s.encode()),
                    "top_logprobs": [
                        {"token": token_str(a), "logprob": v, "bytes": list(token_str(a).encode())}
                        for a, v in alternatives.items()
                    ],
                }
            )
        return {"content": content}

    def max_tokens_for(requested: int | None, prompt_ids: list[int], default: int | None) -> int:
        room = state.async_engine.core.max_prompt_tokens + 1 - len(prompt_ids)
        return min(requested if requested is not None else (default or room), room)

    # -- routes ---------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not state.async_engine.alive:
            raise APIError(503, "the engine is not running", "service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "llmctl",
                    "max_model_len": state.engine.context_length,
                }
            ],
        }

    @app.post("/tokenize")
    async def tokenize(request: Request):
        data = await _json_object(request)
        if isinstance(data.get("prompt"), str):
            ids = tok(data["prompt"], add_special_tokens=bool(data.get("add_special_tokens", True)))[
                "input_ids"
            ]
        elif isinstance(data.get("messages"), list):
            try:
                body = ChatBody.model_validate({"messages": data["messages"]})
            except ValidationError as e:
                message, param = _validation_message(e)
                raise APIError(400, message, param=param) from None
            ids = _chat_ids(body)
        else:
            raise APIError(400, "send a string 'prompt' or a 'messages' list", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        data = await _json_object(request)
        ids = data.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise APIError(400, "'tokens' must be a list of token ids", param="tokens")
        if any(not 0 <= t < len(tok) for t in ids):
            raise APIError(400, f"token ids must be in [0, {len(tok)})", param="tokens")
        return {"prompt": tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)}

    async def _json_object(request: Request) -> dict:
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        return data

    def _chat_ids(body: ChatBody, tools: list[dict] | None = None) -> list[int]:
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions")
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, "only text content parts are supported", param="messages")
                    parts.append(part["text"])
                content = "".join(parts)
            message = {"role": m.role, "content": content or ""}
            message |= {
                k: v for k in ("name", "tool_calls", "tool_call_id") if (v := getattr(m, k)) is not None
            }
            messages.append(message)
        extra = {}
        if tools and template_takes_tools(tok):
            extra["tools"] = tools
        elif tools:
            messages = with_tool_system_prompt(messages, tools)
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        return tok(text, add_special_tokens=False)["input_ids"]

    def prompt_list(prompt) -> list[tuple[str | None, list[int]]]:
        """``(text or None, token ids)`` of each prompt: a string, token ids, or a list of either."""
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and isinstance(prompt[0], str | list):
            prompts = list(prompt)
        else:
            prompts = [prompt]  # one prompt of token ids
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append((p, tok(p)["input_ids"]))
                continue
            if any(not 0 <= t < len(tok) for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {len(tok)})", param="prompt")
            out.append((None, list(p)))
        return out

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionBody = await parse(request, CompletionBody)
        prompts = prompt_list(body.prompt)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
        k = body.logprobs or 0
        want_logprobs = body.logprobs is not None
        plans = []
        for _text, ids in prompts:
            check_room(ids, body.max_tokens)
            max_tokens = max_tokens_for(body.max_tokens, ids, 16)
            plans.append(
                _sampling_params(body, max_tokens=max_tokens, top_logprobs=k, logprobs=want_logprobs)
            )
        rid = f"cmpl-{uuid.uuid4().hex}"
        group = StreamGroup()
        prompt_logprobs = k if body.echo and want_logprobs else None
        try:
            for (_text, ids), params in zip(prompts, plans, strict=True):
                submit(ids, params, rid, group=group, prompt_logprobs=prompt_logprobs)
        except APIError:
            abort(group)
            raise
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        echoed = [
            (text if text is not None else tok.decode(ids, skip_special_tokens=False)) if body.echo else ""
            for text, ids in prompts
        ]

        def prompt_of(index: int) -> tuple[str, list[int]]:
            i = index // body.n
            return echoed[i], prompts[i][1]

        def prompt_part(index: int, seq) -> tuple[list[int], list, list]:
            """The echoed prompt's tokens, log-probabilities and top alternatives (None for the first)."""
            ids = prompt_of(index)[1]
            return ids, [None, *seq.prompt_token_logprobs], [None, *seq.prompt_top_logprobs]

        created = int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            reported: dict[int, int] = {}  # completion tokens whose logprobs were sent, per choice
            offsets: dict[int, int] = {}  # text offset of the next token, per choice

            def chunk(index, text, finish, logprobs=None):
                return base | {
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]
                }

            def logprobs_of(index, ids, lps, top):
                out = completion_logprobs(ids, lps, top, k, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + sum(len(t) for t in out["tokens"])
                return out

            def start(index, seq) -> list[dict]:
                """The echo: the prompt (and its logprobs) before the choice's first token."""
                if index in reported:
                    return []
                reported[index] = 0
                if not body.echo:
                    return []
                lp = logprobs_of(index, *prompt_part(index, seq)) if want_logprobs else None
                return [chunk(index, prompt_of(index)[0], None, lp)]

            def on_token(index, delta) -> list[dict]:
                out = start(index, delta.seq)
                if not delta.text and not delta.token_ids:
                    return out
                reported[index] += len(delta.token_ids)
                lp = None
                if want_logprobs:
                    lp = logprobs_of(index, delta.token_ids, delta.logprobs, delta.top_logprobs)
                return [*out, chunk(index, delta.text, None, lp)]

            def on_finish(index, seq) -> list[dict]:
                out = start(index, seq)
                c, r = seq.completion, reported[index]
                lp = None
                if want_logprobs and c.token_ids[r:]:
                    lp = logprobs_of(index, c.token_ids[r:], c.logprobs[r:], c.top_logprobs[r:])
                return [*out, chunk(index, "", c.finish_reason, lp)]

            return StreamingResponse(
                _sse(group, on_token, on_finish, None, include_usage, base, prompt_tokens),
                media_type="text/event-stream",
            )
        seqs = await collect(group, request)
        choices = []
        for index, seq in enumerate(seqs):
            c = seq.completion
            logprobs = None
            if want_logprobs and body.echo:
                ids, lps, top = prompt_part(index, seq)
                logprobs = completion_logprobs(ids + c.token_ids, lps + c.logprobs, top + c.top_logprobs, k)
            elif want_logprobs:
                logprobs = completion_logprobs(c.token_ids, c.logprobs, c.top_logprobs, k)
            text = prompt_of(index)[0] + c.text
            choices.append(
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}
            )
        return base | {"choices": choices, "usage": usage(prompt_tokens, [s.completion for s in seqs])}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body: ChatBody = await parse(request, ChatBody)
        try:
            check_tools(body.tools or [])
            offered = select_tools(body.tools, body.tool_choice)
        except (ValueError, AttributeError) as e:
            raise APIError(
                400, str(e) if isinstance(e, ValueError) else "malformed tools", param="tools"
            ) from None
        names = {t["function"]["name"] for t in offered}
        constraint = response_constraint(body.response_format)
        prompt_ids = _chat_ids(body, offered)
        check_room(prompt_ids, body.max_tokens)
        requested = body.max_completion_tokens or body.max_tokens
        k = body.top_logprobs or 0
        params = _sampling_params(
            body,
            max_tokens=max_tokens_for(requested, prompt_ids, None),
            top_logprobs=k,
            logprobs=body.logprobs,
        )

        def reply(c: Completion) -> tuple[dict, str]:
            """The assistant message and finish reason: tool calls parsed out when tools were offered."""
            if offered:
                content, calls = parse_tool_calls(c.text, names)
                if calls:
                    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
            return {"role": "assistant", "content": c.text}, c.finish_reason

        rid = f"chatcmpl-{uuid.uuid4().hex}"
        group = submit(prompt_ids, params, rid, constraint)
        created = int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            cbase = base | {"object": "chat.completion.chunk"}
            reported: dict[int, int] = {}  # completion tokens whose logprobs were sent, per choice

            def chunk(index, text, finish, logprobs=None, delta=None):
                if delta is None:
                    delta = {"content": text} if text or finish is None else {}
                return cbase | {
                    "choices": [
                        {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                    ]
                }

            def first(index):
                return chunk(index, "", None, delta={"role": "assistant", "content": ""})

            def on_token(index, delta) -> list[dict]:
                if offered or (not delta.text and not delta.token_ids):
                    return []  # with tools the reply is held back: text or tool calls, known at the end
                reported[index] = reported.get(index, 0) + len(delta.token_ids)
                lp = None
                if body.logprobs:
                    lp = chat_logprobs(delta.token_ids, delta.logprobs, delta.top_logprobs)
                return [chunk(index, delta.text, None, lp)]

            def on_finish(index, seq) -> list[dict]:
                c, r = seq.completion, reported.get(index, 0)
                lp = None
                if body.logprobs and c.token_ids[r:]:
                    lp = chat_logprobs(c.token_ids[r:], c.logprobs[r:], c.top_logprobs[r:])
                if not offered:
                    return [chunk(index, "", c.finish_reason, lp)]
                message, finish = reply(c)
                delta = {k: v for k, v in message.items() if k != "role" and v is not None}
                if "tool_calls" in delta:
                    delta["tool_calls"] = [call | {"index": j} for j, call in enumerate(delta["tool_calls"])]
                return [chunk(index, "", finish, lp, delta=delta)]

            return StreamingResponse(
                _sse(group, on_token, on_finish, first, include_usage, cbase, len(prompt_ids)),
                media_type="text/event-stream",
            )
        seqs = await collect(group, request)
        choices = []
        for i, seq in enumerate(seqs):
            c = seq.completion
            message, finish = reply(c)
            logprobs = chat_logprobs(c.token_ids, c.logprobs, c.top_logprobs) if body.logprobs else None
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
        return base | {"choices": choices, "usage": usage(len(prompt_ids), [s.completion for s in seqs])}

    async def _sse(group: StreamGroup, on_token, on_finish, first, include_usage, base, prompt_tokens):
        """Server-sent events: ``first(index)`` for each choice, then ``on_token(index, delta)`` /
        ``on_finish(index, seq)`` chunks as the engine's events arrive, the usage chunk when asked, and
        ``data: [DONE]``. A client that goes away (or an error) aborts every sequence of the group."""
        finished: dict[int, Completion] = {}

        def event(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            if first is not None:
                for i in range(group.n):
                    yield event(first(i))
            while len(finished) < group.n:
                kind, index, payload = await group.queue.get()
                if kind == "token":
                    for obj in on_token(index, payload):
                        yield event(obj)
                elif kind == "finish":
                    finished[index] = payload.completion
                    for obj in on_finish(index, payload):
                        yield event(obj)
                else:
                    yield event(APIError(500, payload, "internal_server_error").body())
                    break
            if include_usage and len(finished) == group.n:
                yield event(base | {"choices": [], "usage": usage(prompt_tokens, list(finished.values()))})
            yield "data: [DONE]\n\n"
        finally:
            if len(finished) < group.n:  # the client went away (or an error): free the sequences
                abort(group)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def _unknown(path: str):
        raise APIError(404, f"no route /{path}", "not_found_error")

    return app
