"""``--config FILE.toml``: any flag of a command as a key; flags given on the command line win.

Keys are flag names with dashes or underscores (``batch-size`` or ``batch_size``), at the top level
or in a table named after the command (``[dump]``, ``[train]``); tables for other commands are
ignored, anything else unknown is an error naming the key.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from kdcache.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMMANDS = ("dump", "train", "info", "verify")


def merged_params(ctx: click.Context, config: Path | None) -> dict[str, Any]:
    """The command's parameters: defaults, overridden by the config file, overridden by flags."""
    params = dict(ctx.params)
    params.pop("config", None)
    if config is None:
        return params
    command = ctx.info_name
    try:
        doc = tomllib.loads(Path(config).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: file {str(config)!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {config}: not valid TOML: {e}") from None
    values = {k: v for k, v in doc.items() if not (isinstance(v, dict) and k in COMMANDS)}
    if isinstance(doc.get(command), dict):
        values.update(doc[command])
    by_name = {p.name: p for p in ctx.command.params if p.name != "config"}
    for key, value in values.items():
        name = key.replace("-", "_")
        param = by_name.get(name)
        if param is None:
            known = ", ".join(sorted(n.replace("_", "-") for n in by_name))
            raise ConfigError(f"--config {config}: unknown key {key!r} for `kdcache {command}` (known: {known})")
        if ctx.get_parameter_source(name) in (click.core.ParameterSource.COMMANDLINE,
                                              click.core.ParameterSource.ENVIRONMENT):
            continue
        try:
            params[name] = param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise ConfigError(f"--config {config}: key {key!r}: {e.message}") from None
    return params


def require(params: dict[str, Any], *names: str) -> None:
    for name in names:
        if params.get(name) in (None, ""):
            raise ConfigError(f"--{name.replace('_', '-')} is required (give it as a flag or in --config)")
