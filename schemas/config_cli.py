"""The command line of the CLIs that take a configuration dataclass (schemas/config.py): one flag per field, plus
`--config FILE` (JSON or TOML) whose values the command line overrides.

Defaults < config file < command line. A config file that is missing or does not parse is an InputError naming the
file (exit 2); an unknown key or a value of the wrong type in it is a usage error naming the key (exit 2, as argparse
does for a bad flag); the values themselves are checked by the dataclass (InputError naming the flag).
"""

from __future__ import annotations

import argparse
import json
import tomllib
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from schemas.errors import InputError
from schemas.options import flag_of

T = TypeVar("T")


def _base_type(tp: Any) -> Any:
    """`int | None` → int, so argparse knows how to parse the value."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _typed(parser: argparse.ArgumentParser, path: str, key: str, value: Any, hint: Any) -> Any:
    """A file value must already have its field's type (TOML `max_steps = "20"` is a string, not a count): an error
    naming the key instead of a comparison failing deep inside the run. An int where a float is due becomes the
    float the flag would have given."""
    tp = _base_type(hint)
    if value is None and tp is not hint:
        return None
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        parser.error(f"config {path}: {key} = {value!r} is a {type(value).__name__}, expected {tp.__name__}")
    return value


def build_parser(
    cls: type, description: str, parents: list[argparse.ArgumentParser] = ()
) -> argparse.ArgumentParser:
    """One flag per field with its help line and default; the required ones in their own group, so `--help`
    marks them (they may also come from --config, so argparse itself does not enforce them)."""
    parser = argparse.ArgumentParser(description=description, parents=list(parents))
    required = parser.add_argument_group("required (on the command line or in --config)")
    parser.add_argument(
        "--config", help="JSON or TOML file with any of the flags below; the command line wins"
    )
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = f.metadata
        tp = _base_type(hints[f.name])
        group = required if meta["required"] else parser
        shown = meta["help"] if meta["required"] else f"{meta['help']} (default: {f.default})"
        if tp is bool:
            group.add_argument(
                flag_of(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=shown
            )
        else:
            metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else None
            group.add_argument(
                flag_of(f.name), dest=f.name, type=tp, default=None, help=shown, metavar=metavar
            )
    return parser


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The file's keys and values; a missing, unreadable or malformed file is an InputError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as e:
        raise InputError(f"--config {path}: {e}") from None
    if not isinstance(values, dict):
        raise InputError(f"--config {path}: expected a table of flag = value, got a {type(values).__name__}")
    return values


def parse_config(
    cls: type[T], argv: list[str] | None, description: str, parents: list[argparse.ArgumentParser] = ()
) -> T:
    """Defaults < config file < command line. An unknown key or a value of the wrong type in the file is a usage
    error naming the key (exit 2, as argparse does for a bad flag); the values themselves are checked by `cls`
    (InputError naming the flag)."""
    parser = build_parser(cls, description, parents)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        file_values = {k.replace("-", "_"): v for k, v in load_config_file(args.config).items()}
        unknown = sorted(set(file_values) - {f.name for f in fields(cls)})
        if unknown:
            parser.error(f"config {args.config}: unknown keys {unknown}")
        hints = typing.get_type_hints(cls)
        values.update({k: _typed(parser, args.config, k, v, hints[k]) for k, v in file_values.items()})
    own = {f.name for f in fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in own and v is not None})
    return cls(**values)
