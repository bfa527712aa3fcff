"""llmctl tokenize-train: train a BPE, WordPiece or Unigram tokenizer into a Hugging Face directory."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from llmctl.core.command import cli_command
from llmctl.core.console import ui
from llmctl.core.io import ReadStats, atomic_output, resolve_input
from llmctl.core.options import (
    ConfigOpt,
    DebugOpt,
    ForceOpt,
    JsonOpt,
    OutputDirOpt,
    QuietOpt,
    SeedOpt,
    SkipBadLinesOpt,
    TextFieldOpt,
    WholeFileOpt,
)
from llmctl.core.provenance import now, write_provenance
from llmctl.core.tokenize.train import (
    ALGORITHMS,
    ENGINES,
    PRE_TOKENIZERS,
    Corpus,
    TrainOptions,
    chat_template_text,
    save_tokenizer,
    train_tokenizer,
)

Algo = StrEnum("Algo", {name: name for name in ALGORITHMS})
PreTokenizer = StrEnum("PreTokenizer", {name: name for name in PRE_TOKENIZERS})
Engine = StrEnum("Engine", {name: name for name in ENGINES})

HELP = """Train a tokenizer (BPE, WordPiece or Unigram) on JSONL or text corpora.

Writes a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
llmctl.json) that tokenizers, transformers, 'llmctl tokenize' and 'llmctl init --vocab-from' load.
The default engine is Hugging Face tokenizers (Rust); --engine reference runs llmctl's readable trainers
(BPE and WordPiece learn the same vocabulary). One record in 100 is held out to measure compression
(bytes/token, tokens/word, unknown-token rate), reported on stderr or with --json."""

EPILOG = """Examples:

  llmctl tokenize-train corpus.txt --algo bpe --vocab-size 8192 -o my-tokenizer

  llmctl tokenize-train data.jsonl --algo unigram --vocab-size 4000 --byte-fallback -o uni"""


@cli_command("tokenize-train")
def main(
    output: OutputDirOpt,
    corpus: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="CORPUS",
            help="JSONL/text files (.gz/.zst too), or - for stdin (the default when stdin is piped).",
            show_default=False,
        ),
    ] = None,
    algo: Annotated[Algo, typer.Option("--algo", help="Subword algorithm.")] = Algo("bpe"),
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", min=1, help="Total tokens, special and byte tokens included.")
    ] = 8192,
    pre_tokenizer: Annotated[
        PreTokenizer | None,
        typer.Option(
            "--pre-tokenizer",
            help="How text is cut into words [default: gpt2 for bpe, whitespace for wordpiece, "
            "metaspace for unigram].",
            show_default=False,
        ),
    ] = None,
    byte_level: Annotated[
        bool | None,
        typer.Option(
            "--byte-level/--no-byte-level",
            help="Symbols are the 256 UTF-8 bytes, so nothing is unknown [default: on for bpe].",
            show_default=False,
        ),
    ] = None,
    byte_fallback: Annotated[
        bool,
        typer.Option("--byte-fallback", help="Characters outside the vocabulary become <0xXX> byte tokens."),
    ] = False,
    special_tokens: Annotated[
        str, typer.Option("--special-tokens", help="Comma-separated special tokens, given the first ids.")
    ] = "<|endoftext|>",
    min_frequency: Annotated[
        int,
        typer.Option("--min-frequency", min=0, help="Do not merge pairs seen fewer times (bpe, wordpiece)."),
    ] = 0,
    character_coverage: Annotated[
        float,
        typer.Option(
            "--character-coverage",
            min=0.0,
            max=1.0,
            help="Keep the most frequent characters covering this share (character-level vocabularies).",
        ),
    ] = 1.0,
    sample_lines: Annotated[
        int | None,
        typer.Option("--sample-lines", min=1, help="Train on a uniform sample of N records (seeded)."),
    ] = None,
    chat_template: Annotated[
        str | None,
        typer.Option("--chat-template", help="'chatml' (adds its special tokens) or a Jinja template file."),
    ] = None,
    engine: Annotated[
        Engine, typer.Option("--engine", help="hf (Rust, fast) or reference (llmctl's Python trainers).")
    ] = Engine("hf"),
    text_field: TextFieldOpt = "text",
    skip_bad_lines: SkipBadLinesOpt = False,
    whole_file: WholeFileOpt = False,
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    config: ConfigOpt = None,
) -> None:
    options = TrainOptions(
        algo=algo.value,
        vocab_size=vocab_size,
        pre_tokenizer=pre_tokenizer.value if pre_tokenizer else None,
        byte_level=byte_level,
        byte_fallback=byte_fallback,
        special_tokens=[t.strip() for t in special_tokens.split(",") if t.strip()],
        min_frequency=min_frequency,
        character_coverage=character_coverage,
        sample_lines=sample_lines,
        chat_template=chat_template,
        engine=engine.value,
        seed=seed,
    ).resolved()
    template = chat_template_text(chat_template)
    inputs = list(corpus) if corpus else [resolve_input(None)]
    read_stats = ReadStats()
    source = Corpus(
        inputs, text_field=text_field, skip_bad_lines=skip_bad_lines, whole_file=whole_file,
        sample_lines=sample_lines, seed=seed, read_stats=read_stats,
    )  # fmt: skip
    started = now()
    with atomic_output(output, force=force) as tmp:
        tokenizer, summary = train_tokenizer(source, options)
        save_tokenizer(tokenizer, tmp, options, template)
        summary["output"] = str(output)
        write_provenance(
            Path(tmp), command="tokenize-train", inputs=inputs, started_at=started, seed=seed,
            extra={"summary": summary},
        )  # fmt: skip
    read_stats.report(ui.warn)
    if as_json:
        ui.print_json(summary)
    else:
        s = summary
        ui.info(
            f"wrote {output} ({s['algo']}, {s['vocab_size']:,} tokens, {s['engine']} engine, "
            f"{s['train_seconds']:.2f} s); on {s['eval_records']} {s['eval_on']} records: "
            f"{s['bytes_per_token']} bytes/token, {s['tokens_per_word']} tokens/word, unknown {s['unk_rate']}"
        )
