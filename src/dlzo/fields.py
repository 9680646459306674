"""Option fields of the dataclass configs: each field carries its CLI help text (cli/flags.py turns the
fields into flags), and the shared checks that name a flag in their one-line error.

An option with a fixed set of values is typed `Literal[...]`, its values written once (in the lowest module that
needs them); the command line gets them as argparse choices, a TOML recipe is checked against them, and
`check_choices` checks a config built any other way (in Python, from a run's record, from a race recipe).
A comma-separated option stays a string (as the command line, recipes and run.json spell it) and is read with
`comma_list`."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from dlzo.errors import DlzoError

T = TypeVar("T")

Checkpoint = Literal["best", "last", "final"]  # a run's checkpoints: the lowest dev loss, the latest save, the end


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text for its CLI flag."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def same_as(cls: type, name: str, default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A field with the help text (and, unless given, the default) of `cls`'s field `name`, so that an
    option shared by several commands is described in one place; `help` words it for another command (the
    default stays the one default)."""
    source = cls.__dataclass_fields__[name]
    if default is dataclasses.MISSING:
        default = source.default if source.default is not dataclasses.MISSING else source.default_factory()
    return option(default, help or source.metadata["help"],
                  **{k: v for k, v in source.metadata.items() if k != "help"})


def at_least_one(config: object, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise DlzoError(f"{flag(name)} must be at least 1, not {getattr(config, name)}")


def known_checkpoint(name: str) -> None:
    if name not in typing.get_args(Checkpoint):
        raise DlzoError(f"--checkpoint {name!r} is not best, last or final")


def flag(name: str) -> str:
    """The command-line flag of option `name`."""
    return "--" + name.replace("_", "-")


def choices(annotation: Any) -> tuple | None:
    """The allowed values of a `Literal[...]` type (None for any other type)."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def literal_fields(cls: type) -> dict[str, tuple]:
    """{field name: allowed values} of the dataclass's `Literal`-typed fields."""
    hints = typing.get_type_hints(cls)
    found = {f.name: choices(hints[f.name]) for f in dataclasses.fields(cls)}
    return {name: allowed for name, allowed in found.items() if allowed is not None}


def bad_choice(config: object) -> tuple[str, object, tuple] | None:
    """(field, value, allowed values) of the first `Literal` field holding another value, else None."""
    for name, allowed in literal_fields(type(config)).items():
        value = getattr(config, name)
        if value not in allowed:
            return name, value, allowed
    return None


def check_choices(config: object) -> None:
    """Every `Literal` option holds one of its values: else one line naming the flag."""
    bad = bad_choice(config)
    if bad is not None:
        name, value, allowed = bad
        raise DlzoError(f"{flag(name)} {value!r} is not one of {', '.join(map(str, allowed))}")


def comma_list(text: str, item: Callable[[str], T] = str, error: str = "") -> list[T]:
    """The items of a comma-separated option ("0, 1,,2" -> ["0", "1", "2"]: spaces and empty items dropped),
    each converted by `item`; a value `item` refuses is `error` (a one-line DlzoError naming the flag)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return [item(part) for part in parts]
    except ValueError:
        raise DlzoError(error or f"{text!r} is not a comma-separated list") from None


def positive(config: object, name: str) -> None:
    value = getattr(config, name)
    if not (math.isfinite(value) and value > 0):
        raise DlzoError(f"{flag(name)} must be a positive finite number, not {value}")

