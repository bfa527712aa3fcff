"""llmctl serve: an OpenAI-compatible HTTP server over llmctl's continuous-batching engine."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.core.command import cli_command
from llmctl.core.console import ui
from llmctl.core.errors import UsageError
from llmctl.core.options import (
    ConfigOpt,
    DebugOpt,
    DeviceOpt,
    DraftConfidenceOpt,
    DraftVocabOpt,
    DtypeOpt,
    QuietOpt,
)

HELP = """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics, /tokenize, /detokenize) with continuous batching, a paged KV cache of fixed-size
blocks, automatic prefix caching, chunked prefill and optional speculative decoding with a draft model
(--draft). Stops cleanly (exit 0) on Ctrl-C or SIGTERM."""

EPILOG = """Examples:

  llmctl serve ./smollm2 --port 8000 --served-model-name smollm2

  curl -s localhost:8000/v1/completions -d '{"prompt": "The capital of France is", "max_tokens": 8}'"""


@cli_command("serve")
def main(
    model: Annotated[str, typer.Argument(help="A Hugging Face model directory or a .gguf file.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: pick a free one).")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="LLMCTL_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    ] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option("--served-model-name", help="Model id in the API (default: the directory name)."),
    ] = None,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", min=1, help="Most sequences per step.")] = 64,
    max_num_batched_tokens: Annotated[
        int, typer.Option("--max-num-batched-tokens", min=1, help="Token budget per step (prefill chunks).")
    ] = 512,
    block_size: Annotated[int, typer.Option("--block-size", min=1, help="Tokens per KV-cache block.")] = 16,
    kv_cache_memory: Annotated[
        float, typer.Option("--kv-cache-memory", min=0.0, help="KV-cache size in GiB (unless --num-blocks).")
    ] = 1.0,
    num_blocks: Annotated[
        int | None, typer.Option("--num-blocks", min=1, help="KV-cache size in blocks.")
    ] = None,
    no_prefix_caching: Annotated[
        bool, typer.Option("--no-prefix-caching", help="Do not reuse cached blocks of shared prefixes.")
    ] = False,
    max_waiting: Annotated[
        int, typer.Option("--max-waiting", min=1, help="Queued sequences beyond this get HTTP 429.")
    ] = 512,
    shutdown_timeout: Annotated[
        float, typer.Option("--shutdown-timeout", min=0.0, help="Seconds to finish requests on shutdown.")
    ] = 30.0,
    draft: Annotated[
        str | None,
        typer.Option("--draft", help="Draft model (same tokenizer) for speculative decoding."),
    ] = None,
    num_draft_tokens: Annotated[
        int,
        typer.Option("--num-draft-tokens", min=1, help="Tokens the draft proposes per step (with --draft)."),
    ] = 4,
    draft_vocab: DraftVocabOpt = 0,
    draft_confidence: DraftConfidenceOpt = 0.0,
    prompt_lookup: Annotated[
        int,
        typer.Option(
            "--prompt-lookup",
            min=0,
            help="Speculative decoding without a draft: up to K tokens by prompt lookup.",
        ),
    ] = 0,
    lookup_ngram: Annotated[
        int, typer.Option("--lookup-ngram", min=1, help="Longest n-gram matched for --prompt-lookup.")
    ] = 3,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    config: ConfigOpt = None,
) -> None:
    from pathlib import Path

    from llmctl.core.generate.run import load_engine
    from llmctl.core.serve.engine import ServeConfig, acceptance_line
    from llmctl.core.serve.server import create_server, serve_forever

    if draft is not None and prompt_lookup:
        raise UsageError("choose one of --draft and --prompt-lookup")
    if (draft_vocab or draft_confidence) and draft is None:
        raise UsageError("--draft-vocab and --draft-confidence go with --draft")
    if kv_cache_memory <= 0 and num_blocks is None:
        raise UsageError("--kv-cache-memory must be above 0 (or give --num-blocks)")
    name = served_model_name or Path(model).name
    engine = load_engine(model, device=device, dtype=dtype.value)
    draft_engine = load_engine(draft, device=device, dtype=dtype.value) if draft is not None else None
    settings = ServeConfig(
        block_size=block_size, num_blocks=num_blocks, kv_cache_memory=kv_cache_memory,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        prefix_caching=not no_prefix_caching, max_waiting=max_waiting, num_draft_tokens=num_draft_tokens,
        draft_vocab=draft_vocab, draft_confidence=draft_confidence, prompt_lookup=prompt_lookup,
        lookup_ngram=lookup_ngram,
    )  # fmt: skip
    server = create_server(
        engine, settings, host=host, port=port, model_name=name, api_key=api_key, log=ui.warn,
        draft=draft_engine, info=ui.info,
    )  # fmt: skip
    core = server.core
    spec = f", speculative decoding with {draft} ({num_draft_tokens} draft tokens)" if draft else ""
    if prompt_lookup:
        spec = f", speculative decoding by prompt lookup (up to {prompt_lookup} tokens)"
    ui.info(
        f"serving {name!r} on {server.url}/v1 (KV cache {core.allocator.num_blocks} blocks of {block_size} "
        f"tokens, prefix caching {'off' if no_prefix_caching else 'on'}{spec})"
    )
    ui.info(f"listening on port {server.port}")
    serve_forever(server, shutdown_timeout)
    if core.drafter is not None:
        ui.info(acceptance_line(core.drafter.stats))
    ui.info("stopped")
