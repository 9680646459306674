"""`dlzo race`'s recipes: `NAME: key=value ...; NAME: ...`, each a set of TrainConfig overrides on top of the race's\nshared options."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dlzo.errors import DlzoError
from dlzo.studies.options import RaceConfig
from dlzo.training.config import TrainConfig

# Race-level fields every recipe inherits (a recipe may override any TrainConfig field).
_SHARED = ("model", "task", "data_dir", "dtype", "device", "batch_size", "eps", "num_train", "num_dev", "num_test",
           "data_seed", "eval_batch_size", "max_length")


def parse_recipes(text: str) -> list[tuple[str, dict]]:
    """`NAME: key=value ...; NAME: ...` -> [(name, {field: typed value})]; errors name the recipe and key."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    recipes = []
    for chunk in (c.strip() for c in text.split(";")):
        if not chunk:
            continue
        name, sep, body = chunk.partition(":")
        name = name.strip()
        if not sep or not name or " " in name:
            raise DlzoError(f"--recipes: {chunk!r} is not NAME: key=value ...")
        overrides = {}
        for item in body.split():
            key, eq, value = item.partition("=")
            key = key.replace("-", "_")
            if not eq or key not in fields or key in ("out", "resume", "seed", "steps"):
                raise DlzoError(f"--recipes: recipe {name}: {item!r} is not key=value of a training option "
                                f"(out, resume, seed and steps are the race's own)")
            overrides[key] = _typed(fields[key], value, name)
        recipes.append((name, overrides))
    names = [n for n, _ in recipes]
    if not recipes or len(set(names)) != len(names):
        raise DlzoError(f"--recipes: needs at least one recipe and distinct names, got {names}")
    return recipes


def _typed(field: dataclasses.Field, value: str, recipe: str):
    kind = type(field.default)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return kind(value)
    except ValueError:
        raise DlzoError(f"--recipes: recipe {recipe}: {field.name}={value!r} is not a {kind.__name__}") from None


def recipe_config(race: RaceConfig, overrides: dict, seed: int, folder: Path) -> TrainConfig:
    shared = {name: getattr(race, name) for name in _SHARED}
    config = TrainConfig(**{**shared, **overrides, "seed": seed, "steps": race.max_steps, "eval_every": 0,
                            "out": str(folder), "quiet": True})
    config.validate()
    return config
