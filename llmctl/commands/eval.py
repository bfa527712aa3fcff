"""llmctl eval: perplexity, multiple-choice and generative benchmarks with lm-eval's definitions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llmctl.core.command import cli_command
from llmctl.core.console import ui
from llmctl.core.errors import InputDataError, UsageError
from llmctl.core.eval.runner import EvalOptions, evaluate, merge_shards, parse_shard
from llmctl.core.eval.tasks import load_task
from llmctl.core.io import atomic_output, check_output, open_writer
from llmctl.core.options import (
    BatchSizeOpt,
    ConfigOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    SeedOpt,
)

HELP = """Evaluate a model on a task: perplexity (rolling windows), multiple choice (acc, acc_norm, ECE) or
generation (exact match after regex extraction), computed as lm-evaluation-harness computes them.

--task is a built-in (gsm8k, arc, arc_mosaic, piqa, perplexity) or an lm-eval-style task YAML file that
reads local JSONL. Results use lm-eval's keys ("acc,none", "acc_stderr,none", "word_perplexity,none", ...).
--shard i/n evaluates every n-th document from the i-th; --merge-shards combines the shards' result
files into exactly the numbers of one run."""

EPILOG = """Examples:

  llmctl eval ./smollm2 --task perplexity --data ../shared/data/wikitext-2/test.txt --max-length 512

  llmctl eval ./smollm2 --task arc_mosaic --data arc_easy.jsonl --limit 100 --output results.json

  llmctl eval --merge-shards shard0.json --merge-shards shard1.json -o results.json"""


@cli_command("eval")
def main(
    model: Annotated[
        str | None, typer.Argument(help="A Hugging Face model directory or a .gguf file.", show_default=False)
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="Built-in task name or a task YAML file.")
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="The documents to evaluate (JSONL or .txt).")
    ] = None,
    fewshot_data: Annotated[
        str | None, typer.Option("--fewshot-data", help="Where few-shot examples come from.")
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option("--num-fewshot", min=0, help="Few-shot examples (default: the task's).")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N documents.")] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", min=2, help="Window length (default: the model's context).")
    ] = None,
    stride: Annotated[
        int | None, typer.Option("--stride", min=1, help="Perplexity: overlapping windows advancing by N.")
    ] = None,
    shard: Annotated[
        str | None, typer.Option("--shard", help="Evaluate shard i of n (i/n, i from 0) for --merge-shards.")
    ] = None,
    merge: Annotated[
        list[Path] | None,
        typer.Option("--merge-shards", help="Combine these shard result files (repeat once per shard)."),
    ] = None,
    fit_temperature: Annotated[
        str | None,
        typer.Option("--fit-temperature", help="Multiple choice: fit a temperature on this validation file."),
    ] = None,
    log_samples: Annotated[
        Path | None, typer.Option("--log-samples", help="Write per-document details as JSONL here.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the results JSON here.")
    ] = None,
    seed: SeedOpt = 1234,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    config: ConfigOpt = None,
) -> None:
    if merge:
        if model or task:
            raise UsageError("--merge-shards takes shard result files only, no MODEL or --task")
        results = merge_shards([_read_json(p) for p in merge])
        _write(results, output, force)
        if as_json:
            ui.print_json(results)
        elif not quiet:
            _table(results)
        return
    if model is None or task is None:
        raise UsageError("give a MODEL and --task (or --merge-shards FILES)")
    spec = load_task(task)
    for path in (output, log_samples):
        if path is not None:
            check_output(path, force=force)
    for key in spec.ignored_keys:
        ui.warn(f"task key {key!r} is not supported by llmctl and is ignored")
    opts = EvalOptions(
        data=data, fewshot_data=fewshot_data, num_fewshot=num_fewshot, limit=limit, seed=seed,
        batch_size=batch_size, max_length=max_length, stride=stride, device=device, dtype=dtype.value,
        shard=parse_shard(shard) if shard else None, fit_temperature=fit_temperature,
    )  # fmt: skip
    if fit_temperature and spec.output_type != "multiple_choice":
        raise UsageError("--fit-temperature applies to multiple-choice tasks only")
    with ui.progress(f"eval {spec.name}") as bar:
        results, samples = evaluate(spec, model, opts, progress=lambda n=1: bar.advance(n))
    if output is not None:
        with atomic_output(output, force=force, is_dir=False) as tmp:
            tmp.write_text(
                json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
            )
    if log_samples is not None:
        with open_writer(log_samples, force=force) as writer:
            for sample in samples:
                writer.write(sample)
    if as_json:
        ui.print_json(results)
    elif not quiet:
        _table(results)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"shard results file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputDataError(f"{path}: not a results JSON file ({e})") from None


def _write(results: dict, output: Path | None, force: bool) -> None:
    if output is not None:
        with atomic_output(output, force=force, is_dir=False) as tmp:
            tmp.write_text(
                json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
            )


def _table(results: dict) -> None:
    from rich.table import Table

    table = Table(title="llmctl eval", title_justify="left")
    for column in ("task", "metric", "filter", "value", "stderr"):
        table.add_column(column)
    for task, values in results["results"].items():
        for key, value in values.items():
            if key == "alias" or "_stderr," in key:
                continue
            metric, _, filt = key.partition(",")
            stderr = values.get(f"{metric}_stderr,{filt}", "")
            fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
            table.add_row(task, metric, filt, fmt(value), fmt(stderr))
    ui.err.print(table)
