"""llmctl merge: merge models (linear, task arithmetic, TIES, DARE, SLERP, ...) out of core."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from llmctl.core.command import cli_command
from llmctl.core.config import config_callback
from llmctl.core.console import ui
from llmctl.core.errors import UsageError
from llmctl.core.options import (
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    OutputDirOpt,
    QuietOpt,
    SeedOpt,
)

HELP = """Merge models that share an architecture, tensor by tensor, out of core.

Give a mergekit-style recipe (--config merge.yaml: merge_method, base_model, models or slices, parameters
as scalars, per-layer gradients or name-filtered lists, dtype, tokenizer_source), or the models and a
method flag. Methods: linear, task_arithmetic, ties, dare_ties, dare_linear, slerp, breadcrumbs,
breadcrumbs_ties, model_stock. Tensors are streamed from the inputs' safetensors and written as sharded
safetensors with an index; the tokenizer, chat template and generation config are copied, and llmctl.json
records the recipe. Models with different vocabularies are refused unless --tokenizer-source says how."""

EPILOG = """Examples:

  llmctl merge ./a ./b --slerp --t 0.5 -o merged

  llmctl merge --base ./base ./a ./b --ties --density 0.5 --weights 0.6,0.4 -o merged"""

METHOD_FLAGS = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "slerp",
    "breadcrumbs",
    "model_stock",
]


def _merge_config_callback(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """--config is a mergekit recipe when the YAML names a merge_method; otherwise option defaults."""
    if value is None:
        return value
    try:
        data = yaml.safe_load(Path(value).read_text(encoding="utf-8")) if Path(value).is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        data = None
    if isinstance(data, dict) and "merge_method" in data:
        return value
    return config_callback(ctx, param, value)


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes numbers separated by commas, not {text!r}") from None


def _flag(name: str, what: str):
    return Annotated[bool, typer.Option(f"--{name.replace('_', '-')}", help=what)]


@cli_command("merge")
def main(
    models: Annotated[
        list[str] | None,
        typer.Argument(metavar="MODEL...", help="Model directories to merge.", show_default=False),
    ] = None,
    output: OutputDirOpt = ...,
    base: Annotated[
        str | None, typer.Option("--base", help="Base model (task-vector methods, SLERP's t=0).")
    ] = None,
    linear: _flag("linear", "Weighted average.") = False,
    task_arithmetic: _flag("task_arithmetic", "Base + weighted sum of task vectors.") = False,
    ties: _flag("ties", "TIES: trim to --density by magnitude, elect signs, disjoint mean.") = False,
    dare_ties: _flag("dare_ties", "DARE (random keep with p = --density, rescaled) + TIES signs.") = False,
    dare_linear: _flag("dare_linear", "DARE without sign election.") = False,
    slerp: _flag("slerp", "Spherical interpolation of two models by --t.") = False,
    breadcrumbs: _flag("breadcrumbs", "Drop --gamma outliers and the smallest deltas.") = False,
    model_stock: _flag("model_stock", "Model Stock: base + 2 or more fine-tunes.") = False,
    method: Annotated[str | None, typer.Option("--method", help="Any registered method by name.")] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora", help="A LoRA adapter to merge into the one model (repeat to combine; --weights)."
        ),
    ] = None,
    t: Annotated[float | None, typer.Option("--t", help="SLERP position: 0 = base, 1 = the other.")] = None,
    weights: Annotated[str | None, typer.Option("--weights", help="Per-model weights, e.g. 0.6,0.4.")] = None,
    density: Annotated[
        str | None, typer.Option("--density", help="Fraction kept, in (0, 1]; one value or one per model.")
    ] = None,
    gamma: Annotated[
        float | None, typer.Option("--gamma", help="Breadcrumbs: outlier fraction dropped.")
    ] = None,
    lambda_: Annotated[
        float | None, typer.Option("--lambda", help="Scale of the merged task vector.")
    ] = None,
    tokenizer_source: Annotated[
        str | None,
        typer.Option("--tokenizer-source", help="When vocabularies differ: base, union, or a model's path."),
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Largest output shard (e.g. 2GB, 500MB).")
    ] = "2GB",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            is_eager=True,
            callback=_merge_config_callback,
            help="A mergekit-style merge recipe (YAML), or a YAML file of option defaults.",
        ),
    ] = None,
) -> None:
    from llmctl.core.merge import MergeOptions, is_recipe, load_recipe, recipe_from_flags, run_merge

    flags = {
        "linear": linear,
        "task_arithmetic": task_arithmetic,
        "ties": ties,
        "dare_ties": dare_ties,
        "dare_linear": dare_linear,
        "slerp": slerp,
        "breadcrumbs": breadcrumbs,
        "model_stock": model_stock,
    }
    chosen = [name for name in METHOD_FLAGS if flags[name]] + ([method] if method else [])
    recipe_file = None
    if config is not None:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        recipe_file = config if is_recipe(data) else None
    if lora:
        from llmctl.core.merge.lora import merge_lora

        targets = ([base] if base else []) + list(models or [])
        if len(targets) != 1 or chosen or recipe_file is not None:
            raise UsageError(
                "--lora merges adapters into one model: give exactly one model and no method or recipe"
            )
        summary = merge_lora(
            targets[0],
            lora,
            output,
            weights=_floats(weights, "--weights"),
            force=force,
            device=device,
            max_shard_size=max_shard_size,
            progress_factory=lambda n: ui.progress("merging tensors", total=n),
        )
        _report(summary, output, as_json)
        return
    if recipe_file is not None:
        if models or chosen or base:
            raise UsageError("give either a recipe (--config) or models and a method flag, not both")
        recipe = load_recipe(recipe_file)
        if tokenizer_source is not None:
            recipe = recipe.model_copy(update={"tokenizer_source": tokenizer_source})
    else:
        if len(chosen) != 1:
            raise UsageError(
                "choose one merge method: --"
                + ", --".join(m.replace("_", "-") for m in METHOD_FLAGS)
                + " or --method NAME (or give a recipe with --config)"
            )
        if not models:
            raise UsageError(
                "no models to merge: give model directories (and --base) or --config recipe.yaml"
            )
        if chosen[0] == "slerp" and base is None and len(models) == 2:
            base = models[0]  # `llmctl merge A B --slerp --t 0.3`: t = 0 is A
        parameters = {k: v for k, v in {"t": t, "lambda": lambda_}.items() if v is not None}
        per_model = {
            "density": _floats(density, "--density"),
            "gamma": [gamma] if gamma is not None else None,
        }
        recipe = recipe_from_flags(
            chosen[0],
            models,
            base=base,
            weights=_floats(weights, "--weights"),
            parameters=parameters,
            per_model={k: v for k, v in per_model.items() if v is not None},
            tokenizer_source=tokenizer_source,
        )
    dtype_name = str(getattr(dtype, "value", dtype))
    if dtype_name != "auto":
        recipe = recipe.model_copy(update={"dtype": dtype_name})
    options = MergeOptions(device=device, seed=seed, max_shard_size=max_shard_size)
    summary = run_merge(
        recipe,
        output,
        options=options,
        force=force,
        warn=ui.warn,
        progress_factory=lambda n: ui.progress("merging tensors", total=n),
    )
    _report(summary, output, as_json)


def _report(summary: dict, output: Path, as_json: bool) -> None:
    if as_json:
        ui.print_json(summary)
    elif "adapters" in summary:
        ui.info(
            f"wrote {output} ({len(summary['adapters'])} LoRA adapter(s), "
            f"{summary['merged_tensors']} tensors updated)"
        )
    else:
        ui.info(
            f"wrote {output} ({summary['method']} of {len(summary['models'])} models, {summary['tensors']} "
            f"tensors in {summary['shards']} shard(s))"
        )
