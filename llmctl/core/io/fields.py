"""Dotted field paths: ``--text-field meta.body`` reads ``record["meta"]["body"]``.

A path segment that is a non-negative integer also indexes lists (``messages.0.content``).
"""

from __future__ import annotations

from typing import Any

_MISSING = object()


def _split(path: str) -> list[str]:
    parts = path.split(".")
    if not path or any(p == "" for p in parts):
        raise ValueError(f"invalid field path {path!r}")
    return parts


def _step(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        return node.get(key, _MISSING)
    if isinstance(node, list) and key.isdigit():
        index = int(key)
        return node[index] if index < len(node) else _MISSING
    return _MISSING


def get_field(record: dict, path: str, default: Any = _MISSING) -> Any:
    """The value at ``path``; raises KeyError (naming the path) when it is absent and no default is given."""
    node: Any = record
    for key in _split(path):
        node = _step(node, key)
        if node is _MISSING:
            if default is _MISSING:
                raise KeyError(path)
            return default
    return node


def has_field(record: dict, path: str) -> bool:
    node: Any = record
    for key in _split(path):
        node = _step(node, key)
        if node is _MISSING:
            return False
    return True


def set_field(record: dict, path: str, value: Any) -> None:
    """Set the value at ``path``, creating intermediate objects; existing keys keep their position."""
    keys = _split(path)
    node: Any = record
    for key in keys[:-1]:
        child = _step(node, key)
        if child is _MISSING:
            if not isinstance(node, dict):
                raise KeyError(path)
            child = node[key] = {}
        node = child
    if isinstance(node, dict):
        node[keys[-1]] = value
    elif isinstance(node, list) and keys[-1].isdigit() and int(keys[-1]) < len(node):
        node[int(keys[-1])] = value
    else:
        raise KeyError(path)
