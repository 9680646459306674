"""Dataclass configs are the one source of truth for options: each field becomes one argparse flag, and a
`--config` TOML recipe may set any of them (flags override the recipe). A `Literal[...]` field's values are the
flag's choices and the only values a recipe may give it (dlzo.fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any, NoReturn, TypeVar

from dlzo.errors import DlzoError
from dlzo.fields import choices

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


T = TypeVar("T")

# transformers.TrainingArguments' names for the same options, so a Trainer user's flags work as typed; each
# alias means what it means there (a field of the same meaning, never an approximation)
HF_ALIASES: dict[str, tuple[str, ...]] = {
    "lr": ("learning_rate",), "out": ("output_dir",), "steps": ("max_steps",),
    "batch_size": ("per_device_train_batch_size",), "eval_batch_size": ("per_device_eval_batch_size",),
    "grad_accum": ("gradient_accumulation_steps",), "eval_every": ("eval_steps",), "warmup_steps": ("warmup_steps",),
    "resume": ("resume_from_checkpoint",), "report_to": ("report_to",), "seed": ("seed",),
    "lr_scheduler": ("lr_scheduler_type",), "num_train_epochs": ("num_train_epochs",), "warmup_ratio": ("warmup_ratio",),
    "log_every": ("logging_steps",), "save_every": ("save_steps",), "run_name": ("run_name",),
}
# flags that set an option to one value: --bf16 is --dtype bfloat16
HF_SWITCHES: dict[str, dict[str, str]] = {"dtype": {"bf16": "bfloat16", "fp16": "float16"}}


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser whose mistakes (a value outside a flag's choices, an unknown flag, a missing value) are
    one DlzoError line like every other bad input: `dlzo` prints it and exits 2, without argparse's usage block
    (`dlzo COMMAND --help` shows that). Subcommands' parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        # argparse names a flag by all its spellings ("--lr/--learning_rate/--learning-rate"): the first is the one
        raise DlzoError(re.sub(r"argument (--[\w-]+)(?:/--[\w-]+)+:", r"argument \1:", message))


class _Joined(argparse.Action):
    """A flag taking several values (--report-to tensorboard wandb, as transformers' --report_to), kept as the
    comma-separated string that recipes and run.json spell."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, ",".join(values))


def _field_types(cls: type) -> dict[str, Any]:
    """Each field's type, resolved (the option modules use `from __future__ import annotations`), an Optional
    unwrapped to the type inside it."""
    hints, types_ = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        types_[f.name] = annotation
    return types_


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one --flag per field of the dataclass `cls`, and --config for a TOML recipe of them."""
    parser.add_argument("--config", default=None, help="TOML recipe with any of these options; flags override it")
    kinds = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("help"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind, allowed = kinds[f.name], choices(kinds[f.name])
        extra = {k: v for k, v in f.metadata.items() if k not in ("help", "positional", "switches", "several")}
        if f.metadata.get("several"):
            extra.update(nargs="+", action=_Joined)
        if allowed is not None:
            extra.update(choices=allowed)
            kind = type(allowed[0])
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs="+", help=f.metadata["help"])
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, *alias_flags(flag, HF_ALIASES.get(f.name, ())), dest=f.name, type=kind,
                                default=default, help=f"{f.metadata['help']} (default: {default})", **extra)
        for switch, value in HF_SWITCHES.get(f.name, {}).items():
            parser.add_argument(*alias_flags("", (switch,)), dest=f.name, action="store_const", const=value,
                                help=f"the same as {flag} {value} (transformers.TrainingArguments' name)")


def alias_flags(flag: str, aliases: tuple[str, ...]) -> list[str]:
    """Both spellings of each alias (--learning_rate and --learning-rate), none repeating `flag`."""
    spelled = [f"--{alias}" for name in aliases for alias in dict.fromkeys((name, name.replace("_", "-")))]
    return [alias for alias in dict.fromkeys(spelled) if alias != flag]


def load_recipe(path: str, cls: type) -> dict[str, Any]:
    """Read a TOML recipe whose keys are field names of `cls`; errors name the file and the key."""
    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except OSError as err:
        raise DlzoError(f"--config {path}: cannot read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise DlzoError(f"--config {path}: not valid TOML ({err})") from None
    kinds = _field_types(cls)
    for key, value in values.items():
        if key not in kinds:
            raise DlzoError(f"--config {path}: unknown key '{key}' (known: {', '.join(sorted(kinds))})")
        kind, allowed = kinds[key], choices(kinds[key])
        if allowed is not None:
            if isinstance(value, bool) or value not in allowed:
                raise DlzoError(f"--config {path}: key '{key}' should be one of {', '.join(map(str, allowed))}, "
                                f"got {value!r}")
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
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

