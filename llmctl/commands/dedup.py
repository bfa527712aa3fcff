"""llmctl dedup: remove exact and near duplicates (MinHash + LSH), or decontaminate against eval sets."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from llmctl.core.command import cli_command
from llmctl.core.console import ui
from llmctl.core.dedup import (
    DecontamStats,
    DedupIndex,
    DedupParams,
    DedupStats,
    apply_clustering,
    build_eval_grams,
    cluster_records,
    decontaminate,
    kept_line_numbers,
    run_dedup,
)
from llmctl.core.dedup.source import TwoPassInput, nonempty_text
from llmctl.core.dedup.text import parse_normalize
from llmctl.core.errors import UsageError
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


class Method(StrEnum):
    exact = "exact"
    minhash = "minhash"


class Shingle(StrEnum):
    word = "word"
    char = "char"


class Keep(StrEnum):
    first = "first"
    longest = "longest"


class HashScheme(StrEnum):
    fast = "fast"
    datasketch = "datasketch"


class Engine(StrEnum):
    local = "local"
    ray = "ray"


HELP = """Remove exact or near-duplicate records from a JSONL corpus, or training records that overlap
evaluation sets.

--method exact drops records whose normalised text was seen before. --method minhash (the default)
finds near duplicates: word (or character) n-gram shingles, MinHash signatures (datasketch's
permutations; --hash datasketch also hashes shingles as datasketch does, bit for bit, but slower), LSH
bands from --threshold (datasketch's optimal (b, r)) or --bands/--rows, union-find clusters, one record
kept per cluster (--keep). --verify-jaccard joins a candidate pair only when its true Jaccard
similarity reaches the threshold (and then weighs the (b, r) choice 9:1 towards recall). --mark keeps
every record and adds dup_cluster and is_duplicate; --clusters writes the clusters for audit; --index
DIR remembers every document for later runs.

--against EVAL.jsonl (repeatable) switches to decontamination: records sharing any --ngram-word
sequence (13 by default) with an evaluation item are removed (or marked with contaminated_by)."""

EPILOG = """Examples:

  llmctl dedup data.jsonl --threshold 0.8 --workers 2 --clusters clusters.jsonl -o deduped.jsonl

  llmctl dedup train.jsonl --against test.jsonl --mark | jq -c 'select(.contaminated_by != [])'"""


@cli_command("dedup")
def main(
    input: InputArg = None,
    method: Annotated[
        Method, typer.Option("--method", help="exact or minhash (near duplicates).")
    ] = Method.minhash,
    text_field: TextFieldOpt = "text",
    normalize: Annotated[
        str, typer.Option("--normalize", help="Comma-separated: nfkc, lower, whitespace, punct (or none).")
    ] = "nfkc,lower,whitespace",
    ngram: Annotated[
        int | None,
        typer.Option(
            "--ngram", min=1, help="Shingle size (default 5; 13 words with --against).", show_default=False
        ),
    ] = None,
    shingle: Annotated[
        Shingle, typer.Option("--shingle", help="Shingles of words or characters.")
    ] = Shingle.word,
    num_perm: Annotated[int, typer.Option("--num-perm", min=1, help="MinHash permutations.")] = 128,
    threshold: Annotated[
        float,
        typer.Option("--threshold", min=0.0, max=1.0, help="Jaccard similarity that counts as duplicate."),
    ] = 0.8,
    bands: Annotated[int | None, typer.Option("--bands", min=1, help="LSH bands (with --rows).")] = None,
    rows: Annotated[
        int | None, typer.Option("--rows", min=1, help="Rows per LSH band (with --bands).")
    ] = None,
    hash_scheme: Annotated[
        HashScheme,
        typer.Option(
            "--hash", help="Shingle hashing: fast, or datasketch (SHA-1 per shingle, bit-compatible)."
        ),
    ] = HashScheme.fast,
    verify_jaccard: Annotated[
        bool,
        typer.Option(
            "--verify-jaccard", help="Join candidates only if their true Jaccard reaches the threshold."
        ),
    ] = False,
    keep: Annotated[Keep, typer.Option("--keep", help="Which record of a cluster to keep.")] = Keep.first,
    mark: Annotated[
        bool,
        typer.Option(
            "--mark", help="Keep all records; add dup_cluster and is_duplicate (or contaminated_by)."
        ),
    ] = False,
    clusters: Annotated[
        Path | None,
        typer.Option("--clusters", help="Write clusters of 2+ records (file:line members) as JSONL."),
    ] = None,
    index: Annotated[
        Path | None,
        typer.Option(
            "--index", help="Index directory: dedup against every earlier run's documents, then add these."
        ),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Processes computing signatures.")] = 1,
    engine: Annotated[Engine, typer.Option("--engine", help="local (this machine) or ray.")] = Engine.local,
    against: Annotated[
        list[Path] | None,
        typer.Option(
            "--against", help="Evaluation JSONL to decontaminate against (repeatable).", show_default=False
        ),
    ] = None,
    against_field: Annotated[
        str | None,
        typer.Option(
            "--against-field",
            help="Text field of the --against files (default: --text-field).",
            show_default=False,
        ),
    ] = None,
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
    if output is not None and str(output) != "-":
        check_output(output, force=force)
    if clusters is not None:
        check_output(clusters, force=force)
    source = TwoPassInput(resolve_input(input), text_field, skip_bad_lines, whole_file)
    if against:
        if index is not None or clusters is not None or verify_jaccard:
            raise UsageError("--against cannot be combined with --index, --clusters or --verify-jaccard")
        summary = _decontaminate(
            source, against, against_field or text_field, ngram or 13, mark, output, force
        )
    else:
        params = DedupParams(
            method=method.value, normalize=parse_normalize(normalize), ngram=ngram or 5,
            shingle=shingle.value, num_perm=num_perm, threshold=threshold, bands=bands or 0, rows=rows or 0,
            hash=hash_scheme.value,
        ).resolved(verify=verify_jaccard)  # fmt: skip
        if verify_jaccard and params.method != "minhash":
            raise UsageError("--verify-jaccard applies to --method minhash only")
        if index is not None and verify_jaccard:
            raise UsageError("--verify-jaccard cannot be combined with --index (the index keeps no shingles)")
        stats = DedupStats()
        if engine == Engine.ray:
            if verify_jaccard or index is not None:
                raise UsageError("--engine ray does not support --verify-jaccard or --index yet (use local)")
            from llmctl.core.dedup.ray_engine import run_dedup_ray

            store = None
            clustering = run_dedup_ray(
                source.first_pass(), params, keep=keep.value, workers=max(workers, 1), stats=stats
            )
        else:
            store = DedupIndex.open(index, params.as_dict(), params.bands or 1) if index is not None else None
            clustering = run_dedup(
                source.first_pass(), params, keep=keep.value, verify_jaccard=verify_jaccard, workers=workers,
                index=store, stats=stats,
            )  # fmt: skip
        with open_writer(output, force=force) as writer:
            if not mark and source.lines_pass_through:  # kept lines copied as they are: no JSON round trip
                for line in source.kept_lines(kept_line_numbers(clustering)):
                    writer.write_line(line)
            else:
                for record in apply_clustering(source.second_pass(), clustering, mark=mark):
                    writer.write(record)
        if clusters is not None:
            with open_writer(clusters, force=force) as writer:
                for record in cluster_records(clustering):
                    writer.write(record)
        if store is not None:
            store.save()
        verb = "marked" if mark else "removed"
        ui.info(
            f"dedup ({params.method}): {stats.documents} documents, {stats.duplicates} duplicates {verb} "
            f"in {stats.clusters} clusters, {stats.kept} kept ({stats.seconds:.2f}s"
            + (f"; bands x rows {stats.bands} x {stats.rows}" if params.method == "minhash" else "")
            + (f"; {stats.indexed_before} indexed before" if store is not None else "")
            + ")"
        )
        summary = {**stats.as_dict(), "skipped": source.stats.skipped, "params": params.as_dict()}
    source.stats.report(ui.warn)
    if as_json:
        ui.print_json(summary)


def _decontaminate(source, against, against_field, n, mark, output, force) -> dict:
    table = None
    eval_stats = ReadStats()
    for path in against:
        records = read_records(str(path), extract=nonempty_text(against_field), stats=eval_stats)
        if table is None:
            table = build_eval_grams(records, n)
        else:
            for record in records:
                table.add(record.where, record.text)
    stats = DecontamStats()
    with open_writer(output, force=force) as writer:
        for record in decontaminate(source.first_pass(), table, mark=mark, stats=stats):
            writer.write(record)
    verb = "marked" if mark else "removed"
    ui.info(
        f"decontaminate ({n}-grams): {stats.documents} documents, {stats.contaminated} contaminated {verb}; "
        f"{len(stats.eval_items_hit)} of {stats.eval_items} eval items found in the training data"
    )
    for item, count in list(stats.eval_items_hit.items())[:20]:
        ui.info(f"  {item}: {count} training document(s)")
    return {**stats.as_dict(), "ngram": n, "skipped": source.stats.skipped}
