"""A reward function of your own (`--reward PATH.py:FUNCTION`): loaded from its file, called on a batch of
completions, and its answer checked.

    FUNCTION(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]

`prompts` are the rows' prompts as written (before any chat template), `completions` what the model wrote
after each (special tokens dropped), `rows` every field of each row as read. Anything the function does wrong
(it raises, returns another number of values, or something that is not a finite number) is a `RewardError`:
one line naming the function and the row, so a training run stops cleanly after its last finished step and
resumes once the function is fixed.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dlzo.errors import DlzoError, first_line

RewardFunction = Callable[[list[str], list[str], list[dict]], Sequence[float]]


class RewardError(DlzoError):
    """A reward function that raised or answered wrongly: one line naming the function and the row."""


def split_spec(spec: str) -> tuple[str, str]:
    """"path/to/file.py:function" -> (path, function); one line when it is not of that form."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise DlzoError(f"--reward {spec!r}: expected PATH.py:FUNCTION, e.g. examples/rewards/length.py:reward")
    return path, name


def absolute_spec(spec: str) -> str:
    """The spec with its file made absolute, so a resumed run (or `dlzo eval --run`) finds it from any folder."""
    if not spec:
        return spec
    path, name = split_spec(spec)
    return f"{os.path.abspath(os.path.expanduser(path))}:{name}"


# Loaded functions by (file, name, modification time, size): a run checks the function before it writes anything
# and then uses it, and the file is executed once for both; an edited file is loaded again.
_LOADED: dict[tuple, RewardFunction] = {}


def load_reward(spec: str) -> Reward:
    """The function FUNCTION of the Python file PATH (importlib.util.spec_from_file_location); every failure is
    one line naming the flag and the file."""
    path, name = split_spec(spec)
    file = Path(path).expanduser()
    if not file.is_file():
        raise DlzoError(f"--reward {spec}: no file {path}")
    stat = file.stat()
    key = (str(file.resolve()), name, stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        module_name = f"dlzo_reward_{abs(hash(key[0]))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, file)
        if loader_spec is None or loader_spec.loader is None:
            raise DlzoError(f"--reward {spec}: {path} cannot be imported as Python (name it .py)")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling inside the file look themselves up here
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:  # the user's code: any error is one line
            sys.modules.pop(module_name, None)
            raise DlzoError(f"--reward {spec}: importing {path} failed: {type(err).__name__}: "
                            f"{first_line(err)}") from None
        function = getattr(module, name, None)
        if function is None:
            raise DlzoError(f"--reward {spec}: {path} defines no {name}")
        if not callable(function):
            raise DlzoError(f"--reward {spec}: {name} in {path} is a {type(function).__name__}, not a function")
        _LOADED[key] = function
    return Reward(_LOADED[key], f"{name} ({path})")


class Reward:
    """A reward function with its answers checked; `name` is how errors name it."""

    def __init__(self, function: RewardFunction, name: str = ""):
        self.function = function
        self.name = name or getattr(function, "__qualname__", None) or repr(function)

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict],
                 where: list[str] | None = None) -> list[float]:
        """One finite float per completion. `where` names each row in errors (file:line), else its place in the
        batch. A function that raises on the batch is called again row by row, to name the row it fails on."""
        where = where or [f"row {i + 1} of the batch" for i in range(len(prompts))]
        try:
            values = self.function(list(prompts), list(completions), [dict(r) for r in rows])
        except Exception as err:
            raise self._failure(prompts, completions, rows, where, err) from None
        if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence) and not hasattr(values, "tolist"):
            raise RewardError(f"reward {self.name} returned a {type(values).__name__} for the batch of "
                              f"{_rows(where)}: it must return a list of numbers, one per completion")
        values = values.tolist() if hasattr(values, "tolist") else list(values)
        if len(values) != len(completions):
            raise RewardError(f"reward {self.name} returned {len(values)} values for {len(completions)} completions "
                              f"(the batch of {_rows(where)}): it must return one number per completion")
        checked = []
        for value, place in zip(values, where):
            if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                kind = type(value).__name__
                raise RewardError(f"reward {self.name} returned {value!r} ({kind}) for {place}: every reward must be "
                                  f"a finite number")
            checked.append(float(value))
        return checked

    def _failure(self, prompts, completions, rows, where, err: Exception) -> RewardError:
        """The error of a batch that raised: the first row that raises alone, else the batch."""
        for index in range(len(prompts)) if len(prompts) > 1 else ():
            try:
                self.function([prompts[index]], [completions[index]], [dict(rows[index])])
            except Exception as alone:
                return RewardError(f"reward {self.name} raised {type(alone).__name__} on {where[index]}: "
                                   f"{first_line(alone)}")
        return RewardError(f"reward {self.name} raised {type(err).__name__} on the batch of {_rows(where)}: "
                           f"{first_line(err)}")


def _rows(where: list[str]) -> str:
    shown = ", ".join(where[:4])
    return f"{shown} and {len(where) - 4} more" if len(where) > 4 else shown


def reward_name(reward) -> str:
    """A reward as a record names it: its PATH.py:FUNCTION, or the function's name ("" for none)."""
    return reward if isinstance(reward, str) else getattr(reward, "__qualname__", repr(reward))
