"""`dlzo race`: time to accuracy. Several training recipes on the same task, seed, data and machine, in one
process, each until it reaches a target test metric or a budget of training seconds.

    for each seed, for each recipe: training.Session (its train_step and lr_at) -> every --eval-every steps the
    metric on a fixed test subset (its time reported apart, never counted as training) -> stop at the target
    or the budget; then one upstream-style full MeZO step timed on the same machine (dlzo.studies.bench), and the
    ratios of seconds-to-target from that same run -> race.json, race.png

Recipes: `NAME: key=value key=value; NAME: ...`, the keys any TrainConfig field (scope, optimizer, lr,
zo_update, beta1, q, eps, ...), e.g. `adamw: optimizer=adamw scope=full lr=1e-5; dominant: scope=layer:11 lr=1e-3`.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dlzo.engine.scoring import encode, fast_layout
from dlzo.errors import DlzoError
from dlzo.evaluation.evaluate import evaluate
from dlzo.fields import comma_list
from dlzo.model.checkpoint import atomic_write_json
from dlzo.model.loading import load_model, load_tokenizer, resolve_device
from dlzo.studies.bench import PeakMemory, run_variant
from dlzo.studies.options import RaceConfig
from dlzo.studies.plots import plot_race
from dlzo.studies.recipes import parse_recipes, recipe_config
from dlzo.studies.spread import spread
from dlzo.training.config import TrainConfig, same_path_option
from dlzo.training.loop import Session
from dlzo.training.run_data import Data, load_data
from dlzo.training.run_folder import FREE_FOR_A_KEPT_RUN, REUSE, RunFolder
from dlzo.training.step import batch_indices


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RecipeRun:
    """One recipe of one seed: trains through its Session in chunks of --eval-every steps, each chunk timed
    and memory-measured, and scores the fixed test subset between chunks (timed apart)."""

    def __init__(self, race: RaceConfig, config: TrainConfig, data: Data):
        self.race, self.config, self.data = race, config, data
        run = RunFolder(config.out, "--out")
        run.decide(config)  # a new run: refused where one already is
        run.path.mkdir(parents=True, exist_ok=True)
        self.session = Session(config, run, None, data)
        self.device = self.session.device
        frozen = self.session.frozen
        # the frozen-prefix cache is built before step 0, and --scope dominant's layer chosen (probe, or the
        # sensitivity fallback's forwards on training batches): training time, so both count
        self.cache_s, self.cache_bytes = (frozen.seconds, frozen.bytes) if frozen is not None else (0.0, 0)
        self.choice_s = self.session.prepared.layer_choice.get("seconds", 0.0)
        self.step, self.train_s, self.eval_s, self.peak = 0, self.cache_s + self.choice_s, 0.0, 0
        self.curve: list[dict] = []
        self.reached: dict | None = None

    def inference_memory(self) -> int:
        """Peak memory of one plain forward of the first training batch (the 'memory of inference')."""
        s = self.session
        examples = [self.data.splits.train[i] for i in batch_indices(0, len(self.data.splits.train),
                                                                      self.config.batch_size, self.config.seed)]
        batch = encode(s.tokenizer, examples, max_length=s.max_length, layout=s.layout).to(self.device)
        memory = PeakMemory(self.device)
        with torch.no_grad(), memory.measure():
            s.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return memory.peak

    def score(self) -> None:
        s, started = self.session, time.perf_counter()
        result = evaluate(s.model, s.tokenizer, self.data.task, self.data.splits.test, self.config.eval_batch_size,
                          max_length=s.max_length, quiet=True)
        point = {"step": self.step, "seconds": round(self.train_s, 3), "metric": result.value}
        if self.race.dev_loss:
            point["dev_loss"] = s.evaluate_dev()
        self.eval_s += time.perf_counter() - started
        self.curve.append(point)
        # a step may end past the budget (done() is checked after it): a target met there is not within it
        if self.reached is None and result.value >= self.race.target and self.train_s <= self.race.budget_s:
            self.reached = point

    def train_chunk(self) -> None:
        s, memory = self.session, PeakMemory(self.device)
        with memory.measure():
            for _ in range(self.race.eval_every):
                lr = s.lr_at(self.step)
                _sync(self.device)
                started = time.perf_counter()
                s.train_step(self.step, lr)
                _sync(self.device)
                self.train_s += time.perf_counter() - started
                self.step += 1
                if self.done():
                    break
        self.peak = max(self.peak, memory.peak)

    def done(self) -> bool:
        return self.train_s >= self.race.budget_s or self.step >= self.race.max_steps

    def run(self) -> dict:
        inference = self.inference_memory()
        self.score()
        while (self.reached is None or not self.race.stop_at_target) and not self.done():
            self.train_chunk()
            self.score()
        return self.record(inference)

    def _scoring_before(self, reached: dict | None) -> dict | None:
        if reached is None:
            return None
        index = next(i for i, point in enumerate(self.curve) if point is reached)
        return self.curve[index - 1] if index else reached

    def _last_below_target(self) -> dict:
        below = [point for point in self.curve if point["metric"] < self.race.target]
        # every scoring at or over the target (the first one already past the budget): it may have crossed at 0 s
        last = below[-1] if below else {"seconds": 0.0, "step": 0}
        return {"seconds_below_target": last["seconds"], "steps_below_target": last["step"]}

    def record(self, inference: int) -> dict:
        config, s, reached = self.config, self.session, self.reached
        before = self._scoring_before(reached)
        return {"scope": s.prepared.scope.description, "optimizer": config.optimizer, "lr": config.lr,
                "zo_update": config.zo_update if config.optimizer == "zo" else None,
                "hessian_smooth": (config.hessian_smooth if config.optimizer == "zo" and config.zo_update == "hizoo"
                                   else None),
                "estimator": config.estimator if config.optimizer == "zo" else None, "q": config.q,
                "prefix_cache_seconds": round(self.cache_s, 3), "prefix_cache_bytes": self.cache_bytes,
                "layer_choice_seconds": self.choice_s,
                "tuned_parameters": s.prepared.scope.tuned, "reached": reached is not None,
                "steps_to_target": reached["step"] if reached else None,
                "seconds_to_target": reached["seconds"] if reached else None,
                # the target was crossed after the scoring before: time to target is known to this interval
                "seconds_before_target": before["seconds"] if before else None,
                "steps_before_target": before["step"] if before else None,
                # not reached: the last scoring under the target is the latest it is known not to have crossed
                # (the final scoring, just past the budget, may be over it: crossed at some unknown time since)
                **self._last_below_target(),
                "steps": self.step, "train_seconds": round(self.train_s, 3), "eval_seconds": round(self.eval_s, 3),
                "evaluations": len(self.curve), "seconds_per_step": self.train_s / max(self.step, 1),
                "peak_mem_bytes": self.peak, "inference_mem_bytes": inference,
                "mem_vs_inference": self.peak / inference if inference else None,
                "start_metric": self.curve[0]["metric"], "best_metric": max(p["metric"] for p in self.curve),
                "final_metric": self.curve[-1]["metric"], "curve": self.curve}


# The race options a finished recipe's figures depend on: a resumed race must not mix recipes run under others.
_RACE_OPTIONS = ("target", "stop_at_target", "budget_s", "max_steps", "eval_every", "num_test", "dev_loss")


def race_options(race: RaceConfig) -> dict:
    return {name: getattr(race, name) for name in _RACE_OPTIONS}


def check_same_race(record: dict, race: RaceConfig, path: Path) -> None:
    """A recipe finished before is reused only under the same race options (records older than this check
    carry none and are taken as they are)."""
    for name, was in record.get("race_options", {}).items():
        if was != getattr(race, name):
            raise DlzoError(f"{path}: this recipe ran with --{name.replace('_', '-')} {was!r}, the race now asks for "
                            f"{getattr(race, name)!r}; give --out another folder")


def recipe_record(config: TrainConfig) -> dict:
    """The options a recipe's figures depend on: all but where it lives and how it logs (as for a kept run)."""
    free = (*FREE_FOR_A_KEPT_RUN, *config.inert_options())
    return {k: v for k, v in asdict(config).items() if k not in free}


def _decide(run: RunFolder, config: TrainConfig) -> str:
    """A finished recipe is reused only if it trained as this race would train it: the recipe's own settings
    and the shared ones (model, task, data, batch, eps, dtype, ...), as its run.json holds them; a recipe killed
    midway starts over (RunFolder.decide)."""
    def refuse(key: str, was: object, now: object) -> DlzoError:
        return DlzoError(f"{run.race_recipe}: this recipe ran with --{key.replace('_', '-')} {was!r}, the race now "
                         f"gives {now!r}; give --out another folder")

    return run.decide(config, study=True, no_resume="a recipe's seconds must come from one uninterrupted run",
                      refuse=refuse)


def check_same_recipe(record: dict, config: TrainConfig, path: Path) -> None:
    """A finished recipe (or upstream timing) is reused only if it trained as this race would train it: the
    recipe's own settings and the shared ones (model, task, data, batch, eps, dtype, ...). Records older than
    this check carry none and are taken as they are."""
    now, inert = recipe_record(config), config.inert_options()
    for name, was in record.get("recipe_config", {}).items():
        if name not in inert and not same_path_option(name, was, now.get(name)):
            raise DlzoError(f"{path}: this recipe ran with --{name.replace('_', '-')} {was!r}, the race now gives "
                            f"{now.get(name)!r}; give --out another folder")


def upstream_step(race: RaceConfig, data: Data, seed: int) -> dict:
    """One upstream-style full MeZO step (dlzo.studies.bench's upstream_full: a padded row per candidate, full-vocabulary
    logits, four noise passes) on the race's first batch, timed here; a fresh model, since it moves the weights."""
    config = recipe_config(race, {}, seed, Path(race.out))
    model = load_model(config.model, dtype=config.dtype, device=config.device)
    tokenizer = load_tokenizer(config.model)
    device = next(model.parameters()).device
    train = data.splits.train
    examples = [train[i] for i in batch_indices(0, len(train), config.batch_size, seed)]
    packed = encode(tokenizer, examples, max_length=config.max_length, layout=fast_layout(model, tokenizer))
    separate = encode(tokenizer, examples, pack_single_token=False, max_length=config.max_length)
    result = run_variant("upstream_full", model, packed.to(device), separate.to(device), 0, race.upstream_repeats,
                         device)
    del model
    gc.collect()
    return result


def race_ratios(results: dict[str, dict], upstream_step_s: float | None, full: str, adamw: str) -> dict:
    """Seconds-to-target of each recipe against the references of the same run: upstream-style full MeZO
    (its measured step time x our full MeZO's steps to target: the same arithmetic, so the same steps), our
    full MeZO and AdamW. A reference that never reached the target gives a lower bound (the seconds of its
    last scoring under the target), marked so in `bounds`. Times to target are read at the scorings (every --eval-every steps), so
    each is known only to its interval after the scoring before; `range` gives the ratio's bounds from those
    intervals ([low, high]; high None when a recipe met the target at its first scoring after step 0's, whose
    crossing could be at any time since)."""
    references = {}
    if full in results:
        r = results[full]
        references["full"] = _reference(r, "seconds")
        if upstream_step_s:  # the same steps at upstream's measured step time
            steps, reached, before = _reference(r, "steps")
            references["upstream_full"] = (upstream_step_s * steps, reached,
                                           upstream_step_s * before if before is not None else None)
    if adamw in results:
        references["adamw"] = _reference(results[adamw], "seconds")
    ratios = {"references": {k: {"seconds": s, "reached": ok, "seconds_before": low}
                             for k, (s, ok, low) in references.items()}, "recipes": {}}
    for name, r in results.items():
        mine = r["seconds_to_target"] if r["reached"] else None
        mine_before = r.get("seconds_before_target") if mine else None
        ratios["recipes"][name] = {f"vs_{k}": (s / mine if mine else None) for k, (s, _, _) in references.items()}
        ratios["recipes"][name]["bounds"] = {f"vs_{k}": "reached, to the scoring interval" if ok else "at least"
                                             for k, (_, ok, _) in references.items()}
        own = {"full": full, "adamw": adamw}
        ratios["recipes"][name]["range"] = {
            f"vs_{k}": _ratio_range(reference, mine, mine_before, same_crossing=name == own.get(k))
            for k, reference in references.items()}
    best_dev = full_best_dev_loss(results, full)
    if best_dev is not None:
        ratios["references"]["full_best_dev_loss"] = best_dev
        for name, r in results.items():
            mine = seconds_to_dev_loss(r.get("curve", []), best_dev["dev_loss"])
            ratios["recipes"][name]["seconds_to_full_best_dev_loss"] = mine
            ratios["recipes"][name]["vs_full_best_dev_loss"] = best_dev["seconds"] / mine if mine else None
    return ratios


def _ratio_range(reference: tuple[float, bool, float | None], mine: float | None, mine_before: float | None,
                 same_crossing: bool) -> list | None:
    """[low, high] of reference seconds / mine when each crossing is known only to its scoring interval: low
    pairs the reference's earliest crossing with my latest, high its latest with my earliest (None: unbounded,
    my crossing may be near 0 s, or the reference never reached the target). None where a record lacks the
    interval (written before it was kept), or I never reached the target; [1, 1] against myself."""
    seconds, reached, low = reference
    if not mine:
        return None
    if same_crossing:
        return [1.0, 1.0]
    if low is None or (reached and mine_before is None):
        return None
    return [low / mine, seconds / mine_before if reached and mine_before else None]


def _reference(r: dict, unit: str) -> tuple[float, bool, float | None]:
    """In `unit` (seconds or steps): (to target, or by which it is known not to have got there; reached; the
    earliest the target can have been crossed). Not reached: its last scoring under the target, the end of its
    run in a record from before that was kept. Reached, None as the earliest: a record from before that was kept."""
    if not r["reached"]:
        known = r.get(f"{unit}_below_target")
        if known is None:
            known = r["train_seconds" if unit == "seconds" else "steps"]
        return known, False, known
    return r[f"{unit}_to_target"], True, r.get(f"{unit}_before_target")


def seconds_to_dev_loss(curve: list[dict], level: float) -> float | None:
    """Training seconds at the first scoring whose dev loss is at or below `level` (None: never)."""
    return next((p["seconds"] for p in curve if p.get("dev_loss") is not None and p["dev_loss"] <= level), None)


def full_best_dev_loss(results: dict[str, dict], full: str) -> dict | None:
    """Full MeZO's lowest dev loss over its run and the training seconds at which it first got there: the
    reference of 'time to full MeZO's own best dev loss' (None without full MeZO or finite dev losses, and
    None when its best is the untrained model's, step 0). Meant for races run with --no-stop-at-target: a
    recipe stopped at the target has a best dev loss of a shortened run."""
    curve = [p for p in results.get(full, {}).get("curve", [])
             if p.get("dev_loss") is not None and math.isfinite(p["dev_loss"])]
    if not curve:
        return None
    best = min(curve, key=lambda p: p["dev_loss"])
    if best["step"] == 0:  # full MeZO never improved: no time to compare against
        return None
    return {"dev_loss": best["dev_loss"], "seconds": best["seconds"], "step": best["step"]}


def summarise(per_seed: dict[str, dict], ratios: dict[str, dict]) -> dict:
    """Per recipe over the seeds: mean and sample std of seconds and steps to target (seeds that reached it),
    of the ratios, of the best metric, and the worst peak memory."""
    names = next(iter(per_seed.values())).keys()
    summary = {}
    for name in names:
        runs = [per_seed[s][name] for s in per_seed]
        kinds = {k for s in ratios for k in ratios[s]["recipes"][name] if k not in ("bounds", "range")}
        summary[name] = {"reached": sum(r["reached"] for r in runs), "seeds": len(runs),
                         "seconds_to_target": spread([r["seconds_to_target"] for r in runs]),
                         "steps_to_target": spread([r["steps_to_target"] for r in runs]),
                         "seconds_per_step": spread([r["seconds_per_step"] for r in runs]),
                         "best_metric": spread([r["best_metric"] for r in runs]),
                         "peak_mem_bytes": max(r["peak_mem_bytes"] for r in runs),
                         "mem_vs_inference": max(r["mem_vs_inference"] or 0 for r in runs),
                         "ratios": {k: spread([ratios[s]["recipes"][name].get(k) for s in ratios])
                                    for k in sorted(kinds)}}
    return summary


def run_seed(race: RaceConfig, recipes: list[tuple[str, dict]], seed: int) -> tuple[dict, dict]:
    """Every recipe of one seed, then the upstream step: (results by recipe, upstream_full timing).
    Resumable: each finished recipe (and the upstream timing) is kept in its folder and read back when the
    same race runs again; a recipe killed midway starts over (its seconds must come from one run)."""
    results, data, folder = {}, None, Path(race.out) / f"seed{seed}"
    for name, overrides in recipes:
        config = recipe_config(race, overrides, seed, folder / name)
        data = load_data(config)
        run = RunFolder(config.out)
        done = run.race_recipe
        if _decide(run, config) == REUSE:
            results[name] = json.loads(done.read_text())
            check_same_race(results[name], race, done)
            print(f"race seed {seed}: {name}: finished before, read from {done}", flush=True)
            continue
        print(f"race seed {seed}: {name} ({' '.join(f'{k}={v}' for k, v in overrides.items())})", flush=True)
        results[name] = {**RecipeRun(race, config, data).run(), "race_options": race_options(race),
                         "recipe_config": recipe_record(config)}
        atomic_write_json(done, results[name])
        gc.collect()
        r = results[name]
        print(f"  {'reached' if r['reached'] else 'missed'} {race.target} at step {r['steps_to_target']} "
              f"({r['seconds_to_target']} s of training); {r['steps']} steps, {r['train_seconds']:.1f} s training, "
              f"{r['eval_seconds']:.1f} s evaluation, best {r['best_metric']:.4f}", flush=True)
    kept = folder / "upstream-step.json"
    if race.upstream_repeats <= 0:
        return results, None
    shared = recipe_config(race, {}, seed, Path(race.out))
    if kept.exists():
        upstream = json.loads(kept.read_text())
        check_same_recipe(upstream, shared, kept)
        return results, upstream
    upstream = {**upstream_step(race, data, seed), "recipe_config": recipe_record(shared)}
    atomic_write_json(kept, upstream)
    return results, upstream


def race(config: RaceConfig) -> dict:
    config.validate()
    recipes = parse_recipes(config.recipes)
    seeds = comma_list(config.seeds, int)  # checked by config.validate()
    out = Path(config.out)
    if (out / "race.json").exists():
        raise DlzoError(f"--out {out} already holds a race (race.json); choose another --out")
    per_seed, upstream, ratios = {}, {}, {}
    for seed in seeds:
        per_seed[str(seed)], upstream[str(seed)] = run_seed(config, recipes, seed)
        step_s = upstream[str(seed)]["step_s"] if upstream[str(seed)] else None
        ratios[str(seed)] = race_ratios(per_seed[str(seed)], step_s, config.full_recipe, config.adamw_recipe)
    report = {"config": asdict(config), "recipes": dict(recipes), "target": config.target,
              "device": str(resolve_device(config.device)), "threads": torch.get_num_threads(),
              "upstream_full": upstream, "results": per_seed, "ratios": ratios,
              "summary": summarise(per_seed, ratios),
              "notes": "seconds are training seconds only (train_step, batch encoding included); evaluation of the "
                       "fixed test subset is timed apart (eval_seconds). vs_X ratios: X's seconds to target / this "
                       "recipe's (higher is better), read at the scorings; 'at least' where X never reached the target "
                       "within the budget (X's seconds then are those of its last scoring under the target, "
                       "seconds_below_target); range: the ratio's bounds, each crossing being known only to the interval "
                       "after the scoring before it (seconds_before_target)."}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "race.json", report)
    plot_race(report, out / "race.png")
    print(format_race(report))
    print(f"wrote {out / 'race.json'} and {out / 'race.png'}")
    return report


def format_race(report: dict) -> str:
    ratios = [("vs upstream", "vs_upstream_full", "11.2f"), ("vs full", "vs_full", "7.2f"),
              ("vs adamw", "vs_adamw", "8.2f")]
    if any("vs_full_best_dev_loss" in row["ratios"] for row in report["summary"].values()):
        ratios += [("s to full best dev", "seconds_to_full_best_dev_loss", "18.1f"),
                   ("vs full dev", "vs_full_best_dev_loss", "11.2f")]
    lines = [f"{'recipe':>12}  {'reached':>7}  {'s to target':>11}  {'steps':>6}  {'s/step':>7}  {'best':>6}  "
             f"{'mem/inf':>7}  " + "  ".join(f"{title:>{spec.split('.')[0]}}" for title, _, spec in ratios)]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for name, row in report["summary"].items():
        r = row["ratios"]
        lines.append(f"{name:>12}  {row['reached']:>3}/{row['seeds']:<3}  "
                     f"{fmt(row['seconds_to_target']['mean'], '11.1f')}  {fmt(row['steps_to_target']['mean'], '6.0f')}  "
                     f"{fmt(row['seconds_per_step']['mean'], '7.3f')}  {fmt(row['best_metric']['mean'], '6.3f')}  "
                     f"{fmt(row['mem_vs_inference'], '7.3f')}  "
                     + "  ".join(fmt(r.get(key, {}).get("mean"), spec) for _, key, spec in ratios))
    return "\n".join(lines)
