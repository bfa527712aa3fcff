"""Task definitions: a documented subset of lm-evaluation-harness's YAML task format.

Supported keys (same meaning as in lm-eval): ``task``, ``output_type`` (``multiple_choice``,
``loglikelihood_rolling``, ``generate_until``), ``dataset_path: json`` with
``dataset_kwargs: {data_files: {<split>: FILE}}``, ``test_split``, ``validation_split``, ``training_split``,
``fewshot_split``, ``doc_to_text``, ``doc_to_choice``, ``doc_to_target`` (a field name, a Jinja2 template,
a list, or an int), ``target_delimiter`` (default ``" "``), ``fewshot_delimiter`` (default ``"\\n\\n"``),
``num_fewshot``, ``generation_kwargs`` (``until``, ``max_gen_toks``), ``filter_list`` (``regex`` with
``regex_pattern``/``group_select``/``fallback``, ``take_first``), ``metric_list`` (``metric`` plus
``ignore_case``, ``ignore_punctuation``, ``regexes_to_ignore`` for ``exact_match``). Other keys are
ignored with a warning. Templates render with StrictUndefined, so a missing field is an error.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmctl.core.errors import InputDataError, UsageError

BUILTIN_DIR = Path(__file__).parent / "tasks"
OUTPUT_TYPES = ("multiple_choice", "loglikelihood_rolling", "generate_until")
KNOWN_KEYS = {
    "task", "output_type", "dataset_path", "dataset_name", "dataset_kwargs", "test_split", "validation_split",
    "training_split", "fewshot_split", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter",
    "fewshot_delimiter", "num_fewshot", "generation_kwargs", "filter_list", "metric_list", "metadata", "tag",
    "description", "repeats", "should_decontaminate", "doc_to_decontamination_query", "process_results",
}  # fmt: skip


@dataclass
class Task:
    name: str
    output_type: str
    data_files: dict[str, str] = field(default_factory=dict)
    test_split: str | None = "test"
    fewshot_split: str | None = None
    doc_to_text: Any = ""
    doc_to_choice: Any = None
    doc_to_target: Any = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    until: list[str] = field(default_factory=list)
    max_gen_toks: int = 256
    filters: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""
    ignored_keys: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("ignored_keys",)}


def _template_env():
    import re

    from jinja2 import BaseLoader, Environment, StrictUndefined

    env = Environment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


_ENV = None


def render(template: str, doc: dict) -> str:
    """A Jinja2 template over the document's fields; a missing field raises :class:`InputDataError`."""
    global _ENV
    from jinja2 import TemplateError, UndefinedError

    if _ENV is None:
        _ENV = _template_env()
    try:
        return _ENV.from_string(template).render(**doc)
    except UndefinedError as e:
        raise InputDataError(f"template {template!r}: {e}") from None
    except TemplateError as e:
        raise UsageError(f"template {template!r} is invalid: {e}") from None


def doc_text(task: Task, doc: dict) -> str:
    spec = task.doc_to_text
    if isinstance(spec, str) and spec in doc:
        return str(doc[spec])
    return render(spec, doc) if isinstance(spec, str) else str(spec)


def doc_choices(task: Task, doc: dict) -> list[str]:
    spec = task.doc_to_choice
    if isinstance(spec, list):
        return [str(c) for c in spec]
    if isinstance(spec, str) and spec in doc:
        value = doc[spec]
    elif isinstance(spec, str):
        rendered = render(spec, doc)
        try:
            value = ast.literal_eval(rendered)
        except (ValueError, SyntaxError):
            raise InputDataError(
                f"doc_to_choice {spec!r} did not render to a list: {rendered[:80]!r}"
            ) from None
    else:
        raise UsageError(f"task {task.name}: doc_to_choice must be a field, a template or a list")
    if not isinstance(value, list) or not value:
        raise InputDataError(f"doc_to_choice gave {type(value).__name__}, expected a non-empty list")
    return [str(c) for c in value]


def doc_target(task: Task, doc: dict) -> Any:
    spec = task.doc_to_target
    if isinstance(spec, int):
        return spec
    if isinstance(spec, str) and spec in doc:
        value = doc[spec]
    elif isinstance(spec, str):
        value = render(spec, doc)
        if task.output_type == "multiple_choice" and value.strip().lstrip("-").isdigit():
            value = int(value.strip())
    else:
        value = spec
    if task.output_type == "multiple_choice":
        choices = doc_choices(task, doc)
        if isinstance(value, str) and value in choices:
            value = choices.index(value)
        if not isinstance(value, int) or not 0 <= value < len(choices):
            raise InputDataError(f"answer {value!r} is not an index into the {len(choices)} choices")
    return value


def parse_task(data: dict[str, Any], source: str) -> Task:
    if not isinstance(data, dict) or "task" not in data:
        raise UsageError(f"{source}: a task file is a mapping with at least 'task' and 'output_type'")
    output_type = data.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise UsageError(f"{source}: output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
    data_files: dict[str, str] = {}
    if data.get("dataset_path") not in (None, "json"):
        raise UsageError(
            f"{source}: dataset_path {data.get('dataset_path')!r} would need a download; llmctl reads local "
            "files only (dataset_path: json with dataset_kwargs.data_files, or --data FILE)"
        )
    files = (data.get("dataset_kwargs") or {}).get("data_files") or {}
    if isinstance(files, str):
        files = {"test": files}
    base = Path(source).parent if source and not source.startswith("<") else Path(".")
    for split, path in files.items():
        path = path[0] if isinstance(path, list) else path
        data_files[split] = str((base / path) if not Path(path).is_absolute() else path)
    gen = data.get("generation_kwargs") or {}
    until = gen.get("until", [])
    metrics = data.get("metric_list") or _default_metrics(output_type)
    return Task(
        name=str(data["task"]),
        output_type=output_type,
        data_files=data_files,
        test_split=data.get("test_split") or data.get("validation_split") or "test",
        fewshot_split=data.get("fewshot_split") or data.get("training_split"),
        doc_to_text=data.get("doc_to_text", ""),
        doc_to_choice=data.get("doc_to_choice"),
        doc_to_target=data.get("doc_to_target"),
        target_delimiter=data.get("target_delimiter", " "),
        fewshot_delimiter=data.get("fewshot_delimiter", "\n\n"),
        num_fewshot=int(data.get("num_fewshot", 0) or 0),
        until=[until] if isinstance(until, str) else list(until),
        max_gen_toks=int(gen.get("max_gen_toks", 256)),
        filters=data.get("filter_list") or [],
        metrics=[m if isinstance(m, dict) else {"metric": m} for m in metrics],
        source=source,
        ignored_keys=sorted(set(data) - KNOWN_KEYS),
    )


def _default_metrics(output_type: str) -> list[dict[str, Any]]:
    return {
        "multiple_choice": [{"metric": "acc"}, {"metric": "acc_norm"}],
        "loglikelihood_rolling": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                  {"metric": "bits_per_byte"}],
        "generate_until": [{"metric": "exact_match"}],
    }[output_type]  # fmt: skip


def builtin_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def load_task(name_or_path: str) -> Task:
    """A built-in task by name, or a task YAML file."""
    path = Path(name_or_path)
    builtins = builtin_tasks()
    if name_or_path in builtins:
        path = builtins[name_or_path]
    elif not path.is_file():
        # exit 3 as the eval issue specifies for an unknown task (a task is the data's definition)
        raise InputDataError(
            f"unknown task {name_or_path!r}: not a built-in ({', '.join(builtins)}) or a YAML file"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_task(data, str(path))


def read_split(task: Task, split: str | None, override: str | None = None) -> list[dict]:
    """The documents of a split: JSONL (or .json list) from ``override`` or the task's data_files."""
    from llmctl.core.io import read_records

    path = override or (task.data_files.get(split) if split else None)
    if path is None:
        raise UsageError(f"task {task.name}: no data for split {split!r}; pass --data FILE (JSONL)")
    if str(path).endswith(".json") and Path(path).is_file():
        docs = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(docs, list):
            raise InputDataError(f"{path}: expected a JSON list of documents")
        return docs
    docs = [r.data for r in read_records(str(path))]
    if not docs:
        raise InputDataError(f"{path}: no documents")
    return docs
