"""The learning rate of each scope, chosen on dev loss from a small grid before a sweep's runs (`dlzo sweep
--lr-grid`): never on a task's test split (with --data the dev rows are also what the sweep reports on).

    for each ZO scope, for each rate: a short `dlzo train` run (--grid-steps, the grid seed, no test examples)
    -> its dev loss at the last step -> the rate with the lowest one -> grid.json; the sweep then trains every
    seed at that rate

The criterion is the dev loss at the *last* grid step, not the lowest one seen on the way: a rate too large
for the model first drops the dev loss fastest and then diverges (SmolLM2-135M, layer 11, SST-2: lr 4e-3 had
the lowest dev loss at step 40 of every rate tried and 1.46 at step 80, docs/results/study.md), and the best
seen would pick it. A run whose loss stays non-finite (dlzo.errors.Diverged) counts as infinitely bad and is
marked so. Grid runs take the sweep's other options as they are, a schedule included (its horizon is then the
grid's steps). Resumable: finished grid runs are read back, after checking they were trained with the options
the grid would use now; an interrupted one continues.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from dlzo.errors import Diverged, DlzoError
from dlzo.fields import comma_list
from dlzo.model.checkpoint import atomic_write_json
from dlzo.training.config import TrainConfig
from dlzo.training.loop import train
from dlzo.training.run_folder import RESUME, REUSE, RunFolder


def parse_grid(text: str) -> list[float]:
    """'1e-4,1e-3' -> [1e-4, 1e-3] (sorted, each once); errors name the flag."""
    rates = sorted(set(comma_list(text, float,
                                  f"--lr-grid {text!r} is not comma-separated learning rates like 1e-4,1e-3")))
    if not rates or any(not (math.isfinite(r) and r > 0) for r in rates):
        raise DlzoError(f"--lr-grid {text!r}: needs at least one positive learning rate")
    return rates


def grid_run_name(name: str, lr: float) -> str:
    return f"{name}-lr{lr:g}"


def final_dev_loss(folder: Path, steps: int) -> float:
    """The dev loss logged at the grid run's last step; a diverged run (non-finite loss or dev loss) counts as
    infinitely bad (grid.json writes it as null)."""
    run = RunFolder(folder)
    if run.diverged():
        return math.inf
    loss = run.dev_losses().get(steps, math.inf)
    return loss if math.isfinite(loss) else math.inf


def _train_grid_run(config: TrainConfig, run_dir: Path) -> None:
    """Train one grid run, or continue it; a finished (or diverged) one kept from an earlier sweep is reused
    only if trained as this grid would train it (steps, seed, eps, batch, ...), or its dev loss answers another
    question."""
    def refuse(key: str, was: object, now: object) -> DlzoError:
        return DlzoError(f"{run_dir}: this grid run was trained with {key}={was!r}, the grid now asks for "
                         f"{now!r}; move the grid folder away or give --grid-out another folder")

    run = RunFolder(run_dir)
    decision = run.decide(config, study=True, refuse=refuse)
    if decision == REUSE:
        return
    try:
        train(replace(config, resume=str(run_dir) if decision == RESUME else ""))
    except Diverged as err:
        run.mark_diverged(str(err))


def choose_rates(base: TrainConfig, runs: list[tuple[str, dict]], rates: list[float], steps: int,
                 folder: Path) -> dict:
    """For each (name, overrides) ZO run: the grid's dev losses and the chosen rate (ties: the smaller rate).
    First-order runs keep their given rate. Writes and returns FOLDER/grid.json."""
    folder.mkdir(parents=True, exist_ok=True)
    chosen = {}
    for name, overrides in runs:
        if overrides.get("optimizer", "zo") != "zo":
            continue
        losses = {}
        for lr in rates:
            run_dir = folder / grid_run_name(name, lr)
            config = replace(base, **{**overrides, "lr": lr}, steps=steps, num_test=0,
                             eval_every=base.eval_every if 0 < base.eval_every < steps else steps, out=str(run_dir))
            _train_grid_run(config, run_dir)
            losses[lr] = final_dev_loss(run_dir, steps)
        if all(math.isinf(v) for v in losses.values()):
            raise DlzoError(f"--lr-grid: every rate diverged for {name} ({', '.join(f'{r:g}' for r in rates)}); "
                            f"add smaller rates")
        best = min(rates, key=lambda lr: (losses[lr], lr))
        chosen[name] = {"lr": best, "dev_loss_at_last_step": {f"{lr:g}": losses[lr] if math.isfinite(losses[lr])
                                                              else None for lr in rates}}
    record = {"rates": rates, "steps": steps, "seed": base.seed,
              "criterion": "dev loss at the last grid step (lowest wins; ties: the smaller rate)", "chosen": chosen}
    atomic_write_json(folder / "grid.json", record)
    return record


def read_kept_grid(path: Path, rates: list[float], steps: int, seed: int) -> dict:
    """A grid.json written by an earlier sweep (`--grid-from`), checked before anything is written: it must come
    from the same grid (rates, steps, seed), or its choices answer another question. Its run folders need not be
    on this machine: the record of the choice is what a continued study needs (a study's grid.json is committed
    with its results, the runs are not). grid.json does not record the grid runs' other options (model, task,
    eps, batch): that it belongs to this recipe is the caller's word, as with --lr."""
    try:
        record = json.loads(Path(path).read_text())
    except OSError as err:
        raise DlzoError(f"--grid-from {path}: cannot read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise DlzoError(f"--grid-from {path}: not JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("chosen"), dict):
        raise DlzoError(f"--grid-from {path}: not a grid.json of `dlzo sweep --lr-grid` (no 'chosen' rates)")
    for name, choice in record["chosen"].items():
        rate = choice.get("lr") if isinstance(choice, dict) else None
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (math.isfinite(rate) and rate > 0):
            raise DlzoError(f"--grid-from {path}: the rate chosen for {name} is {rate!r}, not a positive number")
    for key, now in (("rates", rates), ("steps", steps), ("seed", seed)):
        if record.get(key) != now:
            flag = {"rates": "--lr-grid", "steps": "--grid-steps", "seed": "--grid-seed"}[key]
            raise DlzoError(f"--grid-from {path}: its grid had {key} {record.get(key)!r}, this sweep has "
                            f"{flag} {now!r}")
    return {**record, "kept_from": str(path)}


def kept_rates(record: dict, runs: list[tuple[str, dict]]) -> dict:
    """The kept grid's choices for these runs; a ZO run it never chose a rate for is one clear error."""
    missing = [name for name, overrides in runs
               if overrides.get("optimizer", "zo") == "zo" and name not in record["chosen"]]
    if missing:
        raise DlzoError(f"--grid-from {record['kept_from']}: no rate for {', '.join(missing)} (it chose rates for "
                        f"{', '.join(sorted(record['chosen'])) or 'nothing'}); drop --grid-from to train the grid")
    return record
