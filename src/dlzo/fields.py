"""Option fields of the dataclass configs: each field carries its CLI help text (dlzo.cli.flags turns the
fields into flags), and the shared checks that name a flag in their one-line error."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dlzo.errors import DlzoError


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text for its CLI flag."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def same_as(cls: type, name: str, default: Any = dataclasses.MISSING) -> Any:
    """A field with the help text (and, unless given, the default) of `cls`'s field `name`, so that an
    option shared by several commands is described in one place."""
    source = cls.__dataclass_fields__[name]
    if default is dataclasses.MISSING:
        default = source.default if source.default is not dataclasses.MISSING else source.default_factory()
    return option(default, source.metadata["help"], **{k: v for k, v in source.metadata.items() if k != "help"})


def at_least_one(config: object, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise DlzoError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(config, name)}")


def known_checkpoint(name: str) -> None:
    if name not in ("best", "last", "final"):
        raise DlzoError(f"--checkpoint {name!r} is not best, last or final")


def positive(config: object, name: str) -> None:
    value = getattr(config, name)
    if not (math.isfinite(value) and value > 0):
        raise DlzoError(f"--{name.replace('_', '-')} must be a positive finite number, not {value}")

