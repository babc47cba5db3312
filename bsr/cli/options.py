"""Flags generated from dataclass fields (`TrainConfig`, `BSRConfig`, `BenchSpec`) and their help strings, so the
command line and the configs never drift apart; and the flags the user gave, as nested config values."""

from __future__ import annotations

import argparse
import types
from dataclasses import MISSING, fields
from typing import Any, Callable, Sequence, Union, get_args, get_origin, get_type_hints


def _parser_for(tp: Any) -> Callable[[str], Any]:
    """A string -> value converter for a dataclass type hint; "none" gives None for optional fields."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            base = _parser_for(inner[0])
            return lambda s: None if s.lower() in ("none", "off", "null") else base(s)
        return str  # e.g. block specs (str or list of ints): BSRConfig parses them itself
    if origin is list:
        item = _parser_for(args[0])
        return lambda s: [item(part) for part in s.split(",") if part.strip()]
    if tp in (int, float, str):
        return tp
    return str


def _default_text(f) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return ""
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    return f" [default: {value}]"


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: Sequence[str] = ()):
    """One `--flag` per field of `cls` (help from the field's metadata); only flags the user gives get a value."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + _default_text(f)
        dest = prefix + f.name
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=dest, type=_parser_for(hints[f.name]), default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=help_text)


def flags_to_values(namespace: argparse.Namespace, ignore: Sequence[str]) -> dict:
    """Flags the user gave, nested like `TrainConfig.to_dict()` (`bsr.<field>` under "bsr")."""
    values: dict = {}
    for key, value in vars(namespace).items():
        if key in ignore:
            continue
        if key.startswith("bsr."):
            values.setdefault("bsr", {})[key[4:]] = value
        else:
            values[key] = value
    return values
