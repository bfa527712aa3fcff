"""llmctl generate: complete prompts and chats with llmctl's own batched decoding engine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from llmctl.core.command import cli_command
from llmctl.core.console import ui
from llmctl.core.errors import InputDataError, UsageError
from llmctl.core.io import ReadStats, open_writer, read_records, resolve_input
from llmctl.core.options import (
    BatchSizeOpt,
    ConfigOpt,
    DebugOpt,
    DeviceOpt,
    DraftConfidenceOpt,
    DraftVocabOpt,
    DtypeOpt,
    ForceOpt,
    InputArg,
    OutputFileOpt,
    QuietOpt,
    SeedOpt,
    SkipBadLinesOpt,
)

HELP = """Generate completions with llmctl's own engine (KV cache, batched, per-request seeds).

Input lines are {"prompt": "..."} or {"messages": [...]} (the chat template is applied), optionally with
an "id" and per-line sampling overrides (temperature, top_p, max_tokens, stop, seed, ...). Each output
line is the input record plus "completion" (or "message" for chats), "finish_reason" and "usage".
Greedy unless --temperature is above 0. --prompt TEXT completes one prompt and prints the text."""

EPILOG = """Examples:

  llmctl generate ./smollm2 --chat --prompt "What is the capital of France?"

  llmctl generate ./model prompts.jsonl --temperature 0.7 --top-p 0.9 --max-tokens 128 --seed 1
  llmctl generate ./model prompts.jsonl --num-beams 4 --n 2 --length-penalty 1.0
  llmctl generate ./smollm2 --chat --prompt "A user record for Ada, 36" --json-schema user.schema.json"""


@cli_command("generate")
def main(
    model: Annotated[str, typer.Argument(help="A Hugging Face model directory or a .gguf file.")],
    input: InputArg = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Complete this text instead of INPUT.")
    ] = None,
    chat: Annotated[bool, typer.Option("--chat", help="With --prompt: send it as a user message.")] = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream", help='Print text as it comes (with INPUT: {"delta": ...} lines before each record).'
        ),
    ] = False,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Most new tokens per completion.")
    ] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Keep the k most likely tokens (0: off).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    min_p: Annotated[
        float, typer.Option("--min-p", help="Drop tokens below min_p x the top probability.")
    ] = 0.0,
    repetition_penalty: Annotated[
        float, typer.Option("--repetition-penalty", help="CTRL/HF penalty on seen tokens (1: off).")
    ] = 1.0,
    frequency_penalty: Annotated[
        float, typer.Option("--frequency-penalty", help="OpenAI's, in [-2, 2].")
    ] = 0.0,
    presence_penalty: Annotated[
        float, typer.Option("--presence-penalty", help="OpenAI's, in [-2, 2].")
    ] = 0.0,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop before this text (repeatable).")
    ] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep going past EOS.")] = False,
    n: Annotated[int, typer.Option("--n", min=1, help="Samples per prompt (seeds seed, seed+1, ...).")] = 1,
    logprobs: Annotated[bool, typer.Option("--logprobs", help="Add each token's log-probability.")] = False,
    top_logprobs: Annotated[
        int, typer.Option("--top-logprobs", min=0, max=20, help="Also the k most likely alternatives.")
    ] = 0,
    prompt_lookup: Annotated[
        int,
        typer.Option(
            "--prompt-lookup", min=0, help="Greedy only: draft up to K tokens by prompt lookup (0: off)."
        ),
    ] = 0,
    lookup_ngram: Annotated[
        int, typer.Option("--lookup-ngram", min=1, help="Longest n-gram matched for --prompt-lookup.")
    ] = 3,
    lookahead: Annotated[
        int,
        typer.Option(
            "--lookahead", min=0, help="Greedy only: lookahead (Jacobi) decoding, window W (0: off)."
        ),
    ] = 0,
    lookahead_ngram: Annotated[
        int, typer.Option("--lookahead-ngram", min=2, help="N-gram length of --lookahead's pool.")
    ] = 4,
    draft: Annotated[
        str | None,
        typer.Option("--draft", help="Speculative decoding with this draft model (same tokenizer)."),
    ] = None,
    num_draft_tokens: Annotated[
        int, typer.Option("--num-draft-tokens", min=1, help="Tokens the draft proposes per round.")
    ] = 4,
    draft_vocab: DraftVocabOpt = 0,
    draft_confidence: DraftConfidenceOpt = 0.0,
    json_schema: Annotated[
        Path | None, typer.Option("--json-schema", help="Outputs valid against this JSON schema file.")
    ] = None,
    any_json: Annotated[bool, typer.Option("--json", help="Outputs are JSON values.")] = False,
    regex: Annotated[
        str | None, typer.Option("--regex", help="Outputs match this regular expression.")
    ] = None,
    grammar: Annotated[
        Path | None, typer.Option("--grammar", help="Outputs in this grammar (GBNF/EBNF, or Lark if *.lark).")
    ] = None,
    num_beams: Annotated[
        int,
        typer.Option("--num-beams", min=0, help="Beam search with this many beams (0: off; HF semantics)."),
    ] = 0,
    length_penalty: Annotated[
        float, typer.Option("--length-penalty", help="Beam score = logprob sum / length**this.")
    ] = 1.0,
    early_stopping: Annotated[
        str, typer.Option("--early-stopping", help="Beam search stop rule: false (HF default), true, never.")
    ] = "false",
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    output: OutputFileOpt = None,
    force: ForceOpt = False,
    skip_bad_lines: SkipBadLinesOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    config: ConfigOpt = None,
) -> None:
    # The engine imports torch: only when the command runs, so that `llmctl --help` stays instant.
    from llmctl.core.generate.constrained import Constraint, compiler_for
    from llmctl.core.generate.engine import Request, generate
    from llmctl.core.generate.run import complete_records, encode_prompt, load_engine, prompt_of
    from llmctl.core.generate.sampling import SamplingParams

    if chat and prompt is None:
        raise UsageError("--chat goes with --prompt")
    if prompt is not None and input is not None:
        raise UsageError("give either INPUT or --prompt, not both")
    defaults = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, stop=tuple(stop or ()), ignore_eos=ignore_eos, seed=seed, n=n,
        logprobs=logprobs, top_logprobs=top_logprobs,
    ).validate()  # fmt: skip
    if sum(map(bool, (num_beams, prompt_lookup, lookahead, draft))) > 1:
        raise UsageError("choose one of --num-beams, --prompt-lookup, --lookahead and --draft")
    if (draft_vocab or draft_confidence) and not draft:
        raise UsageError("--draft-vocab and --draft-confidence go with --draft")
    constraint = Constraint.from_flags(json_schema, any_json, regex, grammar)
    if constraint and (num_beams or prompt_lookup or draft):
        raise UsageError(
            "constrained decoding runs on the batched engine: drop --num-beams/--prompt-lookup/--draft"
        )
    if prompt is not None and n > 1 and stream:
        raise UsageError("--stream prints one completion: drop --n")
    engine = load_engine(model, device=device, dtype=dtype.value)
    if constraint is not None:
        try:
            compiler_for(engine).compile(constraint)
        except InputDataError as e:  # the flag's value is what is wrong
            raise UsageError(e.message) from None
    decoder, report = _decoder(
        engine, defaults, num_beams, length_penalty, early_stopping, prompt_lookup, lookup_ngram, lookahead,
        lookahead_ngram, draft, num_draft_tokens, draft_vocab, draft_confidence, stream, device, dtype.value,
    )  # fmt: skip
    if prompt is not None:
        kind = "chat" if chat else "text"
        value = [{"role": "user", "content": prompt}] if chat else prompt
        request = Request(encode_prompt(engine, kind, value), defaults, "--prompt", constraint)
        on_token = (lambda _row, text: (sys.stdout.write(text), sys.stdout.flush())) if stream else None
        if decoder:
            completions = decoder(request, on_token)
        else:
            completions = generate(engine, [request], on_token=on_token)
        if stream:
            sys.stdout.write("\n")
        else:
            for c in completions:
                sys.stdout.write(c.text + "\n")
        report()
        return
    source = resolve_input(input)
    read_stats = ReadStats()
    records = read_records(source, extract=prompt_of, skip_bad_lines=skip_bad_lines, stats=read_stats)
    count = 0
    with open_writer(output, force=force) as writer, ui.progress("generate") as bar:

        def on_delta(record, index: int, text: str) -> None:
            writer.write({"id": record.data.get("id"), "line": record.line, "index": index, "delta": text})

        results = complete_records(
            engine, records, defaults, batch_size=batch_size, skip_bad_lines=skip_bad_lines,
            read_stats=read_stats, one_at_a_time=decoder, constraint=constraint,
            on_delta=on_delta if stream else None,
        )  # fmt: skip
        for record in results:
            writer.write(record)
            count += 1
            bar.advance()
    read_stats.report(ui.warn)
    ui.info(f"completed {count} records")
    report()


def _decoder(
    engine, defaults, num_beams, length_penalty, early_stopping, prompt_lookup, lookup_ngram, lookahead,
    lookahead_ngram, draft, num_draft_tokens, draft_vocab, draft_confidence, stream, device, dtype,
):  # fmt: skip
    """The per-request decoder chosen by the flags (None: the batched engine) and its stats reporter."""
    from llmctl.core.generate.beam import BeamParams, generate_beam
    from llmctl.core.generate.lookup import LookupStats, generate_lookahead, generate_lookup
    from llmctl.core.generate.run import load_engine
    from llmctl.core.generate.speculative import DraftVocab, check_draft, generate_speculative

    stats = LookupStats()
    if num_beams:
        beam = BeamParams(num_beams, length_penalty, early_stopping).validate()
        if stream:
            raise UsageError("--num-beams cannot stream: drop --stream")
        if not defaults.greedy:
            raise UsageError(
                "beam search is deterministic: drop --temperature (beam sampling is not supported)"
            )
        return (lambda req, _on_token=None: generate_beam(engine, req, beam)), lambda: None
    if prompt_lookup:
        if not defaults.greedy:
            raise UsageError("--prompt-lookup is exact only for greedy decoding: drop --temperature")

        def lookup(req, on_token=None):
            return generate_lookup(
                engine, req, num_draft=prompt_lookup, max_ngram=lookup_ngram, stats=stats, on_token=on_token
            )

        return lookup, lambda: _report(stats, "prompt lookup")
    if lookahead:
        if not defaults.greedy:
            raise UsageError("--lookahead is exact only for greedy decoding: drop --temperature")

        def jacobi(req, on_token=None):
            return generate_lookahead(
                engine, req, window=lookahead, ngram=lookahead_ngram, stats=stats, on_token=on_token
            )

        return jacobi, lambda: _report(stats, "lookahead")
    if draft:
        draft_engine = load_engine(draft, device=device, dtype=dtype)
        check_draft(engine, draft_engine)
        vocab = DraftVocab(draft_engine, draft_vocab) if draft_vocab else None

        def speculative(req, on_token=None):
            return generate_speculative(
                engine, draft_engine, req, num_draft=num_draft_tokens, stats=stats, on_token=on_token,
                draft_vocab=vocab, min_confidence=draft_confidence,
            )  # fmt: skip

        return speculative, lambda: _report(stats, "speculative decoding")
    return None, lambda: None


def _report(stats, what: str) -> None:
    ui.info(
        f"{what}: {stats.accepted}/{stats.drafted} draft tokens accepted "
        f"({stats.acceptance:.0%}) over {stats.steps} verification steps"
    )
