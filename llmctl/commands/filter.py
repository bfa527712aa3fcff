"""llmctl filter: quality filtering with the published Gopher, C4 and FineWeb rules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl.core.command import cli_command
from llmctl.core.console import ui
from llmctl.core.dedup.source import nonempty_text
from llmctl.core.errors import UsageError
from llmctl.core.filter import RULES, FilterStats, filter_records, load_thresholds, parse_rules, rule_params
from llmctl.core.io import ReadStats, check_output, open_writer, read_records, resolve_input
from llmctl.core.options import (
    ConfigOpt,
    DebugOpt,
    ForceOpt,
    InputArg,
    JsonOpt,
    OutputFileOpt,
    QuietOpt,
    SkipBadLinesOpt,
    TextFieldOpt,
    WholeFileOpt,
)

HELP = f"""Remove low-quality documents with the published heuristic rules, at their published thresholds.

Rules (--rules, comma-separated, applied in order; a document is removed at the first test it fails):
{", ".join(RULES)}. c4 also cleans the text (drops lines without terminal punctuation, short lines,
javascript and cookie-policy lines). --mark keeps every record and adds filter_reason ("rule:test" or
null). --thresholds FILE.yaml overrides any parameter, e.g. "gopher-quality: {{min_doc_words: 20}}".
Per-rule counts go to stderr (and to stdout with --json and -o)."""

EPILOG = """Examples:

  llmctl filter web.jsonl --rules gopher-quality,gopher-repetition -o clean.jsonl

  llmctl filter web.jsonl --rules c4,fineweb --mark | jq -r '.filter_reason' | sort | uniq -c"""


@cli_command("filter")
def main(
    input: InputArg = None,
    rules: Annotated[
        str, typer.Option("--rules", help=f"Comma-separated rules: {', '.join(RULES)}.")
    ] = "gopher-quality,gopher-repetition,c4,fineweb",
    thresholds: Annotated[
        Path | None,
        typer.Option("--thresholds", help="YAML of {rule: {parameter: value}} overriding the defaults."),
    ] = None,
    mark: Annotated[bool, typer.Option("--mark", help="Keep all records; add filter_reason.")] = False,
    lang_field: Annotated[
        str | None,
        typer.Option("--lang-field", help="Field with a language code; records not in --lang are removed."),
    ] = None,
    lang: Annotated[str, typer.Option("--lang", help="Language kept with --lang-field.")] = "en",
    text_field: TextFieldOpt = "text",
    output: OutputFileOpt = None,
    force: ForceOpt = False,
    skip_bad_lines: SkipBadLinesOpt = False,
    whole_file: WholeFileOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    config: ConfigOpt = None,
) -> None:
    if as_json and (output is None or str(output) == "-"):
        raise UsageError("--json prints the summary on stdout, so the records need -o FILE")
    names = parse_rules(rules)
    params = rule_params(names, load_thresholds(thresholds) if thresholds else None)
    if output is not None and str(output) != "-":
        check_output(output, force=force)
    read_stats, stats = ReadStats(), FilterStats()
    records = read_records(
        resolve_input(input), extract=nonempty_text(text_field), skip_bad_lines=skip_bad_lines,
        whole_file=whole_file, stats=read_stats,
    )  # fmt: skip
    out = filter_records(
        records,
        names,
        params,
        text_field=text_field,
        mark=mark,
        lang_field=lang_field,
        lang=lang,
        stats=stats,
    )
    with open_writer(output, force=force) as writer:
        for record in out:
            writer.write(record)
    read_stats.report(ui.warn)
    removed = stats.documents - stats.kept
    ui.info(
        f"filter: {stats.documents} documents, {stats.kept} kept, {removed} {'marked' if mark else 'removed'}"
    )
    for rule in ["language", *names]:
        if stats.removed.get(rule):
            tests = ", ".join(
                f"{k.split(':', 1)[1]} {v}"
                for k, v in sorted(stats.reasons.items())
                if k.startswith(rule + ":")
            )
            ui.info(f"  {rule}: {stats.removed[rule]} ({tests})")
    if as_json:
        ui.print_json({**stats.as_dict(), "skipped": read_stats.skipped, "rules": names, "params": params})
