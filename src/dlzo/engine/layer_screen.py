"""The layer screen behind `--rule screen`: a short, paired training race of a few candidate layers.

Why: the probe's rules name the layer where massive activations begin, and that layer trains best on some
families and not on others (docs/results/study.md: on SmolLM2-135M the rule's layer 11 beats the last layer; on
Qwen2.5-Coder-0.5B the last layer beats the rule's layer 3). The screen asks the question the user cares about
on the user's own data: which candidate's dev loss falls furthest in some ZO steps, each at its own rate from a
small grid?

How (`screen_layers`):
- every candidate layer and every rate of the grid trains `steps` ZO steps from the same weights, on the same
  batches in the same order, with the same direction seeds (the run's): only the layer and the rate differ,
  so the comparison is paired;
- each arm's dev loss after its last step is measured on the same dev examples (one loss per example); a
  non-finite one counts as infinitely bad;
- a layer's score is its best rate's mean dev loss; the candidate with the lowest score wins, except that the
  preferred candidate (the paper's rule's layer) keeps the choice unless the winner's dev loss is lower by more
  than `z` standard errors of the paired per-example difference: the screen overrides the paper's rule only
  on clear evidence.
The weights are put back exactly after every arm. Cost: steps x rates forwards of 2B rows per candidate (cheap
for late layers: the callers skip the frozen layers below each candidate), plus one dev pass per arm.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dlzo.engine.zo import ZOOptimizer

# The screen's setting (docs/rules.md, "screen"): 60 steps per arm, rates 1/3x and 1x the run's --lr, 128 dev
# examples; another layer replaces the paper's rule's layer only when its dev loss is lower by more than 2
# standard errors. Why so long, and no larger rate: on SmolLM2-135M the last layer leads for the first 20-50
# steps and the rule's layer overtakes it later, and a rate 3x larger leads at step 20 and diverges by step 60
# (docs/results/study.md, section 6).
SCREEN = {"steps": 60, "rate_factors": (1 / 3, 1.0), "dev_examples": 128, "z": 2.0}


@dataclass
class ScreenResult:
    layer: int  # the pick
    lr: float  # the pick's best rate in the grid
    preferred: int | None  # the layer that keeps the choice unless clearly beaten
    start_loss: float  # dev loss of the untrained model
    losses: dict[int, dict[float, float]]  # layer -> rate -> mean dev loss after the last step (inf: diverged)
    curves: dict[int, dict[float, dict[int, float]]] = field(default_factory=dict)  # layer -> rate -> step -> loss
    seconds: dict[int, float] = field(default_factory=dict)  # layer -> seconds spent on it (all rates, evals)
    step_seconds: dict[int, float] = field(default_factory=dict)  # layer -> mean seconds of one ZO step
    steps: int = 0
    rates: list[float] = field(default_factory=list)
    z: float = 2.0
    total_seconds: float = 0.0
    # the lowest-loss layer against the preferred one: {"layer", "against", "gap" (their mean difference),
    # "se" (its paired standard error), "overrides" (gap > z * se)}; empty when the preferred layer is lowest
    comparison: dict = field(default_factory=dict)
    units: dict[int, dict[float, list[float]]] = field(default_factory=dict, repr=False)  # per-example, last step

    def best(self, layer: int) -> tuple[float, float]:
        """(rate, dev loss) of the layer's best arm (the smaller rate on ties)."""
        return min(((loss, rate) for rate, loss in self.losses[layer].items()), key=lambda t: (t[0], t[1]))[::-1]

    def doubts(self) -> list[str]:
        """What makes the pick doubtful, in words (empty: nothing the screen can tell)."""
        notes = []
        loss = self.best(self.layer)[1]
        if not math.isfinite(loss) or loss >= self.start_loss:
            notes.append(f"no arm of layer {self.layer} lowered the dev loss below the start ({self.start_loss:.4f}) "
                         f"in {self.steps} steps: the rates {', '.join(f'{r:.3g}' for r in self.rates)} may be too "
                         f"large or too small")
        c = self.comparison
        if c and not c["overrides"]:
            notes.append(f"layer {c['layer']}'s dev loss is lower by {c['gap']:.4f}, within {self.z:g} standard errors "
                         f"({c['se']:.4f}): the screen cannot tell the two apart, and keeps layer {self.layer}")
        return notes

    def summary(self) -> str:
        parts = []
        for layer in self.losses:
            rate, loss = self.best(layer)
            parts.append(f"layer {layer}: {loss:.4f} at lr {rate:.3g}")
        return (f"screen, {self.steps} ZO steps per arm at lr {', '.join(f'{r:.3g}' for r in self.rates)}, dev loss "
                f"(start {self.start_loss:.4f}): " + "; ".join(parts))

    def to_json(self) -> dict:
        data = asdict(self)
        del data["units"]
        data["losses"] = {str(k): {f"{r:.6g}": _finite(v) for r, v in arms.items()} for k, arms in self.losses.items()}
        data["curves"] = {str(k): {f"{r:.6g}": {str(s): _finite(v) for s, v in curve.items()}
                                   for r, curve in arms.items()} for k, arms in self.curves.items()}
        data["seconds"] = {str(k): round(v, 3) for k, v in self.seconds.items()}
        data["step_seconds"] = {str(k): round(v, 4) for k, v in self.step_seconds.items()}
        data["total_seconds"] = round(self.total_seconds, 3)
        data["best"] = {str(k): {"lr": self.best(k)[0], "dev_loss": _finite(self.best(k)[1])} for k in self.losses}
        data["doubts"] = self.doubts()
        return data


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no infinity


@dataclass
class ScreenTask:
    """What the screen trains and measures, from the caller (dlzo's trainer or ZOTrainer):
    `runner(layer)` -> an object the two callables below accept, prepared for tuning `layer` alone (e.g. a
    BranchedForward that skips the frozen layers below it); `pair_loss(runner, step, plus, minus)` -> (L+, L-)
    of the step's training batch; `dev_loss(runner)` -> the dev loss of every dev example (or batch) with the
    model's current weights, always in the same order (the screen pairs them across arms)."""

    runner: Callable[[int], object]
    pair_loss: Callable[[object, int, dict, dict], tuple[float, float]]
    dev_loss: Callable[[object], list[float]]
    parameters: Callable[[int], list[tuple[str, nn.Parameter]]]


def _train_arm(task: ScreenTask, runner: object, optimizer: ZOOptimizer, steps: int, checkpoints: list[int],
               curve: dict[int, float], units: list[float]) -> float:
    """Train the arm `steps` steps, measuring the mean dev loss at the checkpoints into `curve` (inf from a
    non-finite loss on) and the last per-example losses into `units`; returns the seconds spent stepping."""
    stepping = 0.0
    for step in range(steps):
        tick = time.perf_counter()
        result = optimizer.step_functional(lambda plus, minus, r=runner, t=step: task.pair_loss(r, t, plus, minus))
        stepping += time.perf_counter() - tick
        if result.skipped:  # a non-finite loss: this arm has diverged
            curve.update({s: math.inf for s in checkpoints if s > step})
            break
        if step + 1 in checkpoints:
            units[:] = [float(v) for v in task.dev_loss(runner)]
            value = statistics.fmean(units)
            curve[step + 1] = value if math.isfinite(value) else math.inf
    return stepping


@torch.no_grad()
def screen_layers(task: ScreenTask, candidates: list[int], rates: list[float], steps: int, eps: float, seed: int,
                  distribution: str = "gaussian", preferred: int | None = None, z: float = 2.0,
                  eval_at: list[int] | None = None, progress: Callable[[str], None] | None = None) -> ScreenResult:
    """Train every (candidate, rate) arm `steps` ZO steps from the same weights and compare their dev losses
    (see the module doc). `eval_at`: also measure the dev loss after these steps (a study's curve; the pick
    reads only the last step). `preferred`: the candidate that wins unless clearly beaten (`pick`)."""
    if not candidates or not rates or steps < 1:
        raise ValueError("the layer screen needs candidates, rates and at least one step")
    started = time.perf_counter()
    checkpoints = sorted({s for s in (eval_at or []) if 0 < s < steps} | {steps})
    losses: dict[int, dict[float, float]] = {}
    curves: dict[int, dict[float, dict[int, float]]] = {}
    units: dict[int, dict[float, list[float]]] = {}
    seconds, step_seconds, start_loss = {}, {}, math.nan
    for layer in candidates:
        layer_started, stepped, stepping = time.perf_counter(), 0, 0.0
        named = task.parameters(layer)
        saved = [p.detach().clone() for _, p in named]
        runner = task.runner(layer)
        if not math.isfinite(start_loss):  # the untrained model: the same for every candidate
            start_loss = statistics.fmean(float(v) for v in task.dev_loss(runner))
        losses[layer], curves[layer], units[layer] = {}, {}, {}
        for rate in rates:
            optimizer = ZOOptimizer(named, lr=rate, eps=eps, seed=seed, distribution=distribution)
            curve, units[layer][rate] = curves[layer].setdefault(rate, {}), []
            try:
                stepping += _train_arm(task, runner, optimizer, steps, checkpoints, curve, units[layer][rate])
                stepped += optimizer.step_count
            finally:
                for (_, p), original in zip(named, saved):
                    p.data.copy_(original)
            losses[layer][rate] = curve[steps]
            if progress is not None:
                progress(f"screen: layer {layer}, lr {rate:.3g}: dev loss {curve[steps]:.4f} after {steps} steps")
        seconds[layer], step_seconds[layer] = time.perf_counter() - layer_started, stepping / max(stepped, 1)
    result = ScreenResult(layer=candidates[0], lr=rates[0], preferred=preferred, start_loss=start_loss,
                          losses=losses, curves=curves, seconds=seconds, step_seconds=step_seconds, steps=steps,
                          rates=list(rates), z=z, total_seconds=time.perf_counter() - started, units=units)
    result.layer = pick(result, preferred, z)
    result.lr = result.best(result.layer)[0]
    return result


def pick(result: ScreenResult, preferred: int | None, z: float) -> int:
    """The layer with the lowest best dev loss (ties: the earlier candidate), except that `preferred` keeps the
    choice unless that layer's per-example dev losses are lower by more than `z` standard errors of their paired
    difference (each layer at its best rate). Fills `result.comparison`."""
    order = list(result.losses)
    winner = min(order, key=lambda k: (result.best(k)[1], order.index(k)))
    result.comparison = {}
    if preferred not in result.losses or winner == preferred:
        return winner
    mine, theirs = result.best(preferred), result.best(winner)
    if not math.isfinite(mine[1]):
        result.comparison = {"layer": winner, "against": preferred, "gap": math.inf, "se": 0.0, "overrides": True}
        return winner
    differences = [a - b for a, b in zip(result.units[preferred][mine[0]], result.units[winner][theirs[0]])]
    gap = statistics.fmean(differences)
    se = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.inf
    overrides = gap > z * se
    result.comparison = {"layer": winner, "against": preferred, "gap": gap, "se": se, "overrides": overrides}
    return winner if overrides else preferred
