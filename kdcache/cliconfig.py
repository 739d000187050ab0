"""``--config FILE.toml``: any flag of a command as a key; flags given on the command line win.

Keys are flag names with dashes or underscores (``batch-size`` or ``batch_size``), at the top level
or in a table named after the command (``[dump]``, ``[train]``); tables for other commands are
ignored, anything else unknown is an error naming the key.
"""

from __future__ import annotations

import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any

from kdcache.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMMANDS = ("dump", "train", "info", "verify", "ls", "calibrate", "report", "sweep", "born-again")


def merged_params(ctx: Any, config: Path | None) -> dict[str, Any]:
    """The command's parameters: defaults, overridden by the config file, overridden by flags."""
    params = dict(ctx.params)
    params.pop("config", None)
    if config is None:
        return params
    command = ctx.info_name
    doc = _read_toml(config)
    values = {k: v for k, v in doc.items() if not (isinstance(v, dict) and k in COMMANDS)}
    if isinstance(doc.get(command), dict):
        values.update(doc[command])
    by_key = _params_by_key(ctx)
    unknown = [key for key in values if key.replace("-", "_") not in by_key]
    if unknown:
        known = ", ".join(sorted({opt[2:] for param in set(by_key.values()) for opt in getattr(param, "opts", [])
                                  if opt.startswith("--")} or {k.replace("_", "-") for k in by_key}))
        raise ConfigError(f"--config {config}: unknown key {unknown[0]!r} for `kdcache {command}` (known: {known})")
    hints = _type_hints(ctx)
    for key, value in values.items():
        param = by_key[key.replace("-", "_")]
        source = ctx.get_parameter_source(param.name)
        # Compare by name: typer >= 0.2x vendors its own click, whose ParameterSource is another enum.
        if getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        params[param.name] = _cast(value, hints.get(param.name), config, key)
    return params


def merged_params_and_settings(ctx: Any, config: Path | None, tables: tuple[str, ...] = ("train",),
                               convert: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """For commands that run other commands (``sweep``, ``born-again`` run ``train``): the
    command's parameters as :func:`merged_params` gives them, and apart, the config's other keys
    (as spelled there) for the caller to check as the other command's settings, rather than refused.

    Keys are read at the top level, then under each of ``tables`` (``[train]``), then under the
    command's own table, a later one winning. ``convert`` maps a parameter to a function applied
    to its TOML value first (a table of grid values, say).
    """
    params = dict(ctx.params)
    params.pop("config", None)
    if config is None:
        return params, {}
    doc = _read_toml(config)
    values = {k: v for k, v in doc.items() if not (isinstance(v, dict) and k in COMMANDS)}
    for table in (*tables, ctx.info_name):
        if isinstance(doc.get(table), dict):
            values.update(doc[table])
    by_key, hints, rest = _params_by_key(ctx), _type_hints(ctx), {}
    for key, value in values.items():
        param = by_key.get(key.replace("-", "_"))
        if param is None:
            rest[key] = value
            continue
        if getattr(ctx.get_parameter_source(param.name), "name", None) in ("COMMANDLINE", "ENVIRONMENT"):
            continue
        if convert and param.name in convert:
            value = convert[param.name](value, config, key)
        params[param.name] = _cast(value, hints.get(param.name), config, key)
    return params, rest


def _read_toml(config: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(config).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: file {str(config)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"--config: {str(config)!r} is a directory, not a TOML file") from None
    except OSError as e:
        raise ConfigError(f"--config: cannot read {str(config)!r}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {config}: not valid TOML: {e}") from None


def _params_by_key(ctx: Any) -> dict[str, Any]:
    """Config keys (flag names, underscores for dashes) → the command's parameters.

    ``--out`` is declared as the Python name ``out_``: both ``out`` and ``out_`` are accepted.
    """
    by_key: dict[str, Any] = {}
    for param in ctx.command.params:
        if param.name == "config":
            continue
        by_key[param.name] = param
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                by_key[opt[2:].replace("-", "_")] = param
    return by_key


def _type_hints(ctx: Any) -> dict[str, Any]:
    """The annotations of the command function (``Optional[X]`` unwrapped to ``X``)."""
    fn = getattr(ctx.command, "callback", None)
    fn = inspect.unwrap(fn) if fn is not None else None
    try:
        hints = typing.get_type_hints(fn) if fn is not None else {}
    except Exception:  # noqa: BLE001 - no hints: values pass through unchecked
        return {}
    out = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        union = typing.get_origin(hint) in (typing.Union, getattr(types, "UnionType", typing.Union))
        out[name] = args[0] if union and len(args) == 1 else hint
    return out


_TOML_TYPE = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
              Path: "a string (a path)"}


def _cast(value: Any, hint: Any, config: Path, key: str) -> Any:
    """Check a TOML value against the flag's type strictly (TOML has types: ``"8"`` is not 8). A
    repeatable flag (``--features``) takes a list of strings, or one string."""
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            return [value]
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ConfigError(f"--config {config}: key {key!r} must be a list of strings (or one string), "
                              f"got {type(value).__name__} {value!r}")
        return value
    if hint not in _TOML_TYPE:
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, str),
    }[hint]
    if not ok:
        raise ConfigError(f"--config {config}: key {key!r} must be {_TOML_TYPE[hint]}, "
                          f"got {type(value).__name__} {value!r}")
    if hint is float:
        return float(value)
    if hint is Path:
        return Path(value)
    return value


def require(params: dict[str, Any], *names: str) -> None:
    for name in names:
        if params.get(name) in (None, ""):
            raise ConfigError(f"--{name.replace('_', '-')} is required (give it as a flag or in --config)")
