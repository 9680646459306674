"""Dataclass configs are the one source of truth for options: each field becomes one argparse flag, and a
`--config` TOML recipe may set any of them (flags override the recipe).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

from dlzo.errors import DlzoError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


T = TypeVar("T")


def _base_type(annotation: Any) -> Any:
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing})  # noqa: S307 - our own annotations only
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one --flag per field of the dataclass `cls`, and --config for a TOML recipe of them."""
    parser.add_argument("--config", default=None, help="TOML recipe with any of these options; flags override it")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("help"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = _base_type(f.type)
        extra = {k: v for k, v in f.metadata.items() if k not in ("help", "positional")}
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="+", help=f.metadata["help"])
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=default, help=f"{f.metadata['help']} (default: {default})",
                                **extra)


def load_recipe(path: str, cls: type) -> dict[str, Any]:
    """Read a TOML recipe whose keys are field names of `cls`; errors name the file and the key."""
    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except OSError as err:
        raise DlzoError(f"--config {path}: cannot read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise DlzoError(f"--config {path}: not valid TOML ({err})") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise DlzoError(f"--config {path}: unknown key '{key}' (known: {', '.join(sorted(fields))})")
        kind = _base_type(fields[key].type)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif not isinstance(values[key], kind) or (kind is not bool and isinstance(value, bool)):
            raise DlzoError(f"--config {path}: key '{key}' should be {kind.__name__}, got {value!r}")
    return values


def from_namespace(cls: type[T], namespace: argparse.Namespace, **overrides: Any) -> T:
    """Build the dataclass `cls` from parsed flags."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(namespace).items() if k in names}
    values.update(overrides)
    return cls(**values)

