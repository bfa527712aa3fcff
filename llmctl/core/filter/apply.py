"""Run a list of rules over records: drop (or mark) a record at the first rule it fails, count per rule."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmctl.core.errors import InputDataError, UsageError
from llmctl.core.filter.rules import RULES
from llmctl.core.io import Record, set_field
from llmctl.core.io.fields import get_field


def parse_rules(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in RULES]
    if unknown or not names:
        raise UsageError(f"unknown --rules {', '.join(unknown) or '(none)'}; known: {', '.join(RULES)}")
    return names


def rule_params(names: list[str], overrides: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Each rule's defaults updated with ``overrides`` (``{rule: {param: value}}``); unknown keys fail."""
    overrides = overrides or {}
    params: dict[str, dict[str, Any]] = {n: dict(RULES[n].defaults) for n in names}
    for rule, values in overrides.items():
        if rule not in RULES:
            raise UsageError(f"thresholds: unknown rule {rule!r}; known: {', '.join(RULES)}")
        if not isinstance(values, dict):
            raise UsageError(f"thresholds: {rule} must map parameter names to values")
        unknown = [k for k in values if k not in RULES[rule].defaults]
        if unknown:
            known = ", ".join(RULES[rule].defaults)
            raise UsageError(
                f"thresholds: unknown parameter(s) {', '.join(unknown)} for {rule}; known: {known}"
            )
        if rule in params:
            for key, value in values.items():
                default = RULES[rule].defaults[key]
                params[rule][key] = {**default, **value} if isinstance(default, dict) else value
    return params


def load_thresholds(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"thresholds file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path} must map rule names to {{parameter: value}}")
    return data


@dataclass
class FilterStats:
    documents: int = 0
    kept: int = 0
    removed: Counter = field(default_factory=Counter)  # "rule" -> documents it removed
    reasons: Counter = field(default_factory=Counter)  # "rule:test" -> documents
    edited: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents, "kept": self.kept, "edited": self.edited,
            "removed": dict(self.removed), "reasons": dict(self.reasons),
        }  # fmt: skip


def check(text: str, names: list[str], params: dict[str, dict[str, Any]]) -> tuple[str | None, str]:
    """(``"rule:test"`` of the first failure or None, the text after cleaning rules)."""
    for name in names:
        failed, cleaned = RULES[name].check(text, params[name])
        if failed is not None:
            return f"{name}:{failed}", text
        if cleaned is not None:
            text = cleaned
    return None, text


def filter_records(
    records: Iterable[Record],
    names: list[str],
    params: dict[str, dict[str, Any]],
    *,
    text_field: str,
    mark: bool = False,
    lang_field: str | None = None,
    lang: str = "en",
    stats: FilterStats,
) -> Iterator[dict[str, Any]]:
    """Kept records (cleaned by C4's line rules when it runs), or all with ``filter_reason`` when ``mark``."""
    for record in records:
        stats.documents += 1
        reason = None
        text = record.text
        if lang_field is not None:
            try:
                value = get_field(record.data, lang_field)
            except KeyError:
                raise InputDataError(f"{record.where}: missing field {lang_field!r} (--lang-field)") from None
            if value != lang:
                reason = "language:lang_field"
        if reason is None:
            reason, text = check(record.text, names, params)
        data = record.data
        if reason is None and text != record.text:
            data = dict(data)
            set_field(data, text_field, text)
            stats.edited += 1
        if reason is None:
            stats.kept += 1
        else:
            stats.removed[reason.split(":")[0]] += 1
            stats.reasons[reason] += 1
        if mark:
            data = dict(data)
            data["filter_reason"] = reason
            yield data
        elif reason is None:
            yield data
