"""Run a merge, out of core: one output tensor at a time, streamed into sharded safetensors.

Peak memory is about (number of input tensors + 1) x the largest tensor: each job reads its inputs from
the memory-mapped shards, merges them on the compute device, writes the result and drops everything.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmctl.core.errors import UsageError
from llmctl.core.io import atomic_output
from llmctl.core.merge.config import MergeRecipe
from llmctl.core.merge.loader import INDEX_FILE, LazyModel
from llmctl.core.merge.methods import Inputs
from llmctl.core.merge.plan import MergePlan, _is_vocab, build_plan
from llmctl.core.merge.vocab import VocabMap, resolve_vocab
from llmctl.core.merge.writer import CODE_DTYPES, ShardedWriter, parse_size
from llmctl.core.provenance import now, write_provenance

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
NOT_COPIED = {"llmctl.json", "README.md", "mergekit_config.yml", INDEX_FILE}
TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
}


@dataclass
class MergeOptions:
    device: str = "cpu"
    seed: int = 0
    max_shard_size: str = "2GB"


def _dtype(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UsageError(f"invalid {what} {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so random methods give the same tensor whatever the order tensors are merged in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def open_models(recipe: MergeRecipe) -> dict[str, LazyModel]:
    return {path: LazyModel(path) for path in recipe.model_paths()}


def prepare(recipe: MergeRecipe) -> tuple[MergePlan, VocabMap | None]:
    """Everything that can fail before writing: models readable, plan valid, vocabularies compatible."""
    models = open_models(recipe)
    plan = build_plan(recipe, models)
    embed = next((j for j in plan.jobs if "embed_tokens" in j.name), None)
    rows = {}
    if embed is not None:
        for model, name in embed.sources:
            rows[model] = models[model].info(name).shape[0]
    else:
        rows = {p: -1 for p in models}
    vocab = resolve_vocab(list(models), rows, recipe.base_model, recipe.tokenizer_source)
    if vocab is None:
        for job in plan.jobs:
            shapes = {plan.models[m].info(n).shape for m, n in job.sources}
            if len(shapes) > 1:
                raise UsageError(
                    f"tensor {job.name} has different shapes in the models; pass --tokenizer-source"
                )
    return plan, vocab


def merge_tensors(
    plan: MergePlan,
    vocab: VocabMap | None,
    options: MergeOptions,
    emit: Callable[[str, torch.Tensor], None],
    progress: Callable[[], None] = lambda: None,
) -> None:
    """Merge every job in order and hand each result to ``emit`` (the writer, or a dict in tests)."""
    from llmctl.core.runtime import resolve_device

    device = resolve_device(options.device)
    load_dtype = _dtype(plan.recipe.dtype, "dtype")
    out_dtype = _dtype(plan.recipe.out_dtype, "out_dtype") or load_dtype
    for job in plan.jobs:
        raw = [plan.models[m].get(n) for m, n in job.sources]
        tensors = [t.to(device=device, dtype=load_dtype or t.dtype) for t in raw]
        del raw
        if vocab is not None and _is_vocab(job.name):
            originals = {m: t for (m, _), t in zip(job.sources, tensors, strict=True)}
            tensors = [vocab.permute(m, t, originals) for (m, _), t in zip(job.sources, tensors, strict=True)]
            del originals
        generator = None
        if plan.method.random:
            generator = torch.Generator(device=device)
            generator.manual_seed(tensor_seed(options.seed, job.name))
        result = plan.method.merge(Inputs(tensors, job.base, job.shared, job.per_input, generator, job.name))
        del tensors
        target = out_dtype or CODE_DTYPES[plan.models[job.sources[0][0]].info(job.sources[0][1]).dtype]
        emit(job.name, result.to(target))
        del result
        progress()


def output_specs(plan: MergePlan, vocab: VocabMap | None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    load_dtype = _dtype(plan.recipe.dtype, "dtype")
    out_dtype = _dtype(plan.recipe.out_dtype, "out_dtype") or load_dtype
    specs = []
    for job in plan.jobs:
        shape = job.shape
        if vocab is not None and _is_vocab(job.name):
            shape = (vocab.rows, *shape[1:])
        dtype = out_dtype or CODE_DTYPES[plan.models[job.sources[0][0]].info(job.sources[0][1]).dtype]
        specs.append((job.name, tuple(shape), dtype))
    return specs


def _copy_side_files(plan: MergePlan, vocab: VocabMap | None, directory: Path, specs) -> None:
    template = plan.models[plan.template].path
    source = template
    if vocab is not None and vocab.source not in ("base", "union"):
        source = plan.models[vocab.source].path
    for f in sorted(template.iterdir()):
        if (
            f.is_file()
            and not f.name.endswith((".safetensors", ".bin", ".pt"))
            and f.name not in NOT_COPIED
            and not f.name.startswith(("adapter_", "."))
            and f.name not in TOKENIZER_FILES
        ):
            shutil.copy2(f, directory / f.name)
    if vocab is not None and vocab.source == "union":
        vocab.tokenizer.save_pretrained(directory)
    else:
        for f in sorted(source.iterdir()):
            if f.is_file() and f.name in TOKENIZER_FILES:
                shutil.copy2(f, directory / f.name)
    chat = plan.recipe.chat_template
    if chat:
        donor = plan.models.get(chat)
        if donor is not None and (donor.path / "chat_template.jinja").is_file():
            shutil.copy2(donor.path / "chat_template.jinja", directory / "chat_template.jinja")
        else:
            (directory / "chat_template.jinja").write_text(chat, encoding="utf-8")
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    dtypes = {d for _, _, d in specs}
    if len(dtypes) == 1:
        config["dtype"] = str(next(iter(dtypes))).removeprefix("torch.")
        config.pop("torch_dtype", None)
    if config.get("num_hidden_layers") != plan.num_layers:
        config["num_hidden_layers"] = plan.num_layers
        if isinstance(config.get("layer_types"), list):
            config["layer_types"] = (config["layer_types"] * plan.num_layers)[: plan.num_layers]
    if vocab is not None:
        config["vocab_size"] = vocab.rows
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def run_merge(
    recipe: MergeRecipe,
    output: str | Path,
    *,
    options: MergeOptions | None = None,
    force: bool = False,
    progress_factory=None,
    warn: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Merge ``recipe`` into the model directory ``output`` (written atomically). Returns a summary."""
    options = options or MergeOptions()
    started = now()
    from llmctl.core.io.atomic import check_output

    check_output(output, force=force)
    max_bytes = parse_size(options.max_shard_size)
    plan, vocab = prepare(recipe)
    for message in plan.warnings:
        warn(message)
    specs = output_specs(plan, vocab)
    with atomic_output(output, force=force) as tmp:
        writer = ShardedWriter(tmp, specs, max_bytes)
        with writer:
            if progress_factory is None:
                merge_tensors(plan, vocab, options, writer.write)
            else:
                with progress_factory(len(plan.jobs)) as bar:
                    merge_tensors(plan, vocab, options, writer.write, bar.advance)
            writer.finish()
        _copy_side_files(plan, vocab, tmp, specs)
        recipe_dict = recipe.model_dump(exclude_none=True)
        write_provenance(
            tmp,
            command="merge",
            inputs=list(plan.models),
            started_at=started,
            seed=options.seed if plan.method.random else None,
            extra={
                "merge": {
                    "recipe": recipe_dict,
                    "method": plan.method.name,
                    "reference": plan.method.reference_url,
                    "device": options.device,
                }
            },
        )
    return {
        "output": str(output),
        "method": plan.method.name,
        "models": list(plan.models),
        "tensors": len(plan.jobs),
        "shards": len(writer.filenames),
        "layers": plan.num_layers,
        "vocab_size": vocab.rows if vocab else None,
        "bytes": sum(s.size for s in writer.shards),
    }
