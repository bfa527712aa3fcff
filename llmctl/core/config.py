"""``--config FILE.yaml``: values in the file are defaults; flags given on the command line win.

The file is a mapping whose keys are a command's option names, with dashes or underscores
(``batch-size: 8`` or ``batch_size: 8``). It is loaded while click parses the command line (the option is
eager), and becomes click's ``default_map``, so every value goes through the same type conversion and
validation as the flag would, and anything typed on the command line still takes precedence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml


def _keys_for(param: Any) -> list[str]:
    keys = [param.name or ""]
    for opt in getattr(param, "opts", []) + getattr(param, "secondary_opts", []):
        if opt.startswith("--"):
            keys.append(opt[2:])
    return [k for k in keys if k]


def load_config_file(ctx: typer.Context, path: Path) -> dict[str, Any]:
    """Read ``path`` and map its keys onto the parameter names of ``ctx.command``."""
    if not path.is_file():
        raise typer.BadParameter(f"config file not found: {path}", ctx=ctx, param_hint="--config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise typer.BadParameter(f"{path} is not valid YAML: {first}", ctx=ctx, param_hint="--config") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path} must hold a mapping of option names to values", ctx=ctx)
    lookup: dict[str, str] = {}
    for param in ctx.command.params:
        if param.name in ("config",):
            continue
        for key in _keys_for(param):
            lookup[key] = param.name  # type: ignore[assignment]
            lookup[key.replace("-", "_")] = param.name  # type: ignore[assignment]
    defaults: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        name = lookup.get(str(key)) or lookup.get(str(key).replace("-", "_"))
        if name is None:
            unknown.append(str(key))
        else:
            defaults[name] = value
    if unknown:
        known = sorted({k.replace("_", "-") for k in lookup if "_" not in k or k == k.replace("_", "-")})
        raise typer.BadParameter(
            f"{path}: unknown option(s) {', '.join(unknown)} for this command; known: {', '.join(known)}",
            ctx=ctx,
            param_hint="--config",
        )
    return defaults


def config_callback(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    if value is not None:
        defaults = load_config_file(ctx, Path(value))
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value
