"""llmctl tokenize: add token ids to JSONL records, pack them, or decode them back to text."""

from __future__ import annotations

from typing import Annotated

import typer

from llmctl.core.command import cli_command
from llmctl.core.console import ui
from llmctl.core.errors import UsageError
from llmctl.core.io import ReadStats, open_writer, read_records, resolve_input
from llmctl.core.options import (
    BatchSizeOpt,
    ConfigOpt,
    DebugOpt,
    ForceOpt,
    InputArg,
    OutputFileOpt,
    QuietOpt,
    SkipBadLinesOpt,
    TextFieldOpt,
    WholeFileOpt,
)
from llmctl.core.tokenize.apply import (
    EncodeOptions,
    TokenizeStats,
    decode_records,
    encode_records,
    ids_of,
    messages_of,
    pack_sequences,
)
from llmctl.core.tokenize.backend import open_tokenizer

HELP = """Tokenize JSONL (or text) records with a model's or tokenizer directory's tokenizer.

Adds input_ids (and attention_mask with --attention-mask) to each record, keeping every other field.
--apply-chat-template renders a record's messages with the chat template first. --pack N instead emits
sequences of exactly N tokens, documents joined by EOS. --decode turns input_ids back into text."""

EPILOG = """Examples:

  llmctl tokenize ./tiny data.jsonl --max-length 512 --truncate > tokens.jsonl

  llmctl tokenize ./tiny data.jsonl | llmctl tokenize ./tiny --decode --text-field decoded"""


@cli_command("tokenize")
def main(
    tokenizer_path: Annotated[
        str, typer.Argument(metavar="TOKENIZER_OR_MODEL", help="Model or tokenizer directory, or a .gguf.")
    ],
    input: InputArg = None,
    text_field: TextFieldOpt = "text",
    ids_field: Annotated[str, typer.Option("--ids-field", help="Field for the token ids.")] = "input_ids",
    apply_chat_template: Annotated[
        bool,
        typer.Option("--apply-chat-template", help="Render the record's 'messages' with the chat template."),
    ] = False,
    add_special_tokens: Annotated[
        bool | None,
        typer.Option(
            "--add-special-tokens/--no-add-special-tokens",
            help="Add BOS/EOS as the tokenizer does (default: its own choice; off with a chat template).",
            show_default=False,
        ),
    ] = None,
    attention_mask: Annotated[
        bool, typer.Option("--attention-mask", help="Also add attention_mask.")
    ] = False,
    max_length: Annotated[
        int | None,
        typer.Option("--max-length", min=1, help="Longer records are an error, or cut with --truncate."),
    ] = None,
    truncate: Annotated[bool, typer.Option("--truncate", help="Cut records to --max-length tokens.")] = False,
    pack: Annotated[
        int | None, typer.Option("--pack", min=1, help="Emit sequences of exactly N tokens joined with EOS.")
    ] = None,
    keep_remainder: Annotated[
        bool, typer.Option("--keep-remainder", help="With --pack, also emit the last, shorter sequence.")
    ] = False,
    decode: Annotated[bool, typer.Option("--decode", help="Decode --ids-field into --text-field.")] = False,
    skip_special_tokens: Annotated[
        bool, typer.Option("--skip-special-tokens", help="With --decode, leave special tokens out.")
    ] = False,
    batch_size: BatchSizeOpt = 64,
    output: OutputFileOpt = None,
    force: ForceOpt = False,
    skip_bad_lines: SkipBadLinesOpt = False,
    whole_file: WholeFileOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    config: ConfigOpt = None,
) -> None:
    if decode and (pack or apply_chat_template or max_length):
        raise UsageError("--decode cannot be combined with --pack, --apply-chat-template or --max-length")
    if truncate and max_length is None:
        raise UsageError("--truncate needs --max-length")
    source = resolve_input(input)
    tokenizer = open_tokenizer(tokenizer_path)
    read_stats = ReadStats()
    stats = TokenizeStats()
    if decode:
        extract = ids_of(ids_field)
    elif apply_chat_template:
        extract = messages_of
    else:
        extract = None
    records = read_records(
        source,
        text_field=None if extract else text_field,
        extract=extract,
        skip_bad_lines=skip_bad_lines,
        whole_file=whole_file,
        stats=read_stats,
    )
    if decode:
        out = decode_records(
            tokenizer, records, text_field=text_field, skip_special_tokens=skip_special_tokens,
            batch_size=batch_size, stats=stats,
        )  # fmt: skip
    else:
        options = EncodeOptions(
            ids_field=ids_field,
            attention_mask=attention_mask and not pack,
            add_special_tokens=add_special_tokens,
            max_length=max_length,
            truncate=truncate,
            skip_bad_lines=skip_bad_lines,
        )
        out = encode_records(
            tokenizer, records, options, chat=apply_chat_template, batch_size=batch_size,
            stats=stats, read_stats=read_stats,
        )  # fmt: skip
        if pack:
            out = pack_sequences(
                tokenizer, out, pack, ids_field=ids_field, attention_mask=attention_mask,
                keep_remainder=keep_remainder, stats=stats,
            )  # fmt: skip
    with open_writer(output, force=force) as writer, ui.progress("tokenize") as bar:
        for record in out:
            writer.write(record)
            bar.advance()
    read_stats.report(ui.warn)
    message = f"{'decoded' if decode else 'tokenized'} {stats.records} records, {stats.tokens:,} tokens"
    if stats.truncated:
        message += f", {stats.truncated} truncated"
    if pack:
        message += f"; {stats.sequences} sequences of {pack}, {stats.dropped_tokens} trailing tokens dropped"
    ui.info(message)
