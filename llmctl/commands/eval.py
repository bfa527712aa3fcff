"""llmctl eval: perplexity, multiple-choice and generative benchmarks with lm-eval's definitions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llmctl.core.command import cli_command
from llmctl.core.console import ui
from llmctl.core.eval.runner import EvalOptions, evaluate
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
reads local JSONL. Results use lm-eval's keys ("acc,none", "acc_stderr,none", "word_perplexity,none", ...)."""

EPILOG = """Examples:

  llmctl eval ./smollm2 --task perplexity --data ../shared/data/wikitext-2/test.txt --max-length 512

  llmctl eval ./smollm2 --task arc_mosaic --data arc_easy.jsonl --limit 100 --output results.json"""


@cli_command("eval")
def main(
    model: Annotated[str, typer.Argument(help="A Hugging Face model directory or a .gguf file.")],
    task: Annotated[str, typer.Option("--task", help="Built-in task name or a task YAML file.")],
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
    spec = load_task(task)
    for path in (output, log_samples):
        if path is not None:
            check_output(path, force=force)
    for key in spec.ignored_keys:
        ui.warn(f"task key {key!r} is not supported by llmctl and is ignored")
    opts = EvalOptions(
        data=data, fewshot_data=fewshot_data, num_fewshot=num_fewshot, limit=limit, seed=seed,
        batch_size=batch_size, max_length=max_length, stride=stride, device=device, dtype=dtype.value,
    )  # fmt: skip
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
