"""`dlzo sweep`: tune each layer alone (plus full MeZO, ZO-LoRA or first-order references) with the same
seed, steps and data, and say whether the probe's layer is the best one. Resumable run by run."""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from pathlib import Path

from tqdm import tqdm

from dlzo.data.benchmarks import load_task, task_splits
from dlzo.errors import DlzoError
from dlzo.fields import comma_list
from dlzo.model.checkpoint import atomic_write_json
from dlzo.model.loading import load_model, load_tokenizer
from dlzo.model.probe import find_dominant_layer
from dlzo.studies.lr_grid import choose_rates, kept_rates, parse_grid, read_kept_grid
from dlzo.studies.options import SweepConfig, only_names, reference_names
from dlzo.studies.plots import plot_sweep
from dlzo.studies.report import best_dev_step, format_seed_summary, format_sweep, seed_summary, sweep_verdict
from dlzo.training.config import TrainConfig, same_path_option
from dlzo.training.loop import train
from dlzo.training.run_data import load_data
from dlzo.training.run_folder import RESUME, REUSE, RunFolder


def shared_train_options(config: SweepConfig) -> dict:
    """The sweep's options that every run takes as they are (same name, same meaning in TrainConfig)."""
    per_run = {"out", "lr"}  # each run has its own folder and its scope's own rate
    train_fields = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in asdict(config).items() if k in train_fields and k not in per_run}


def _run_config(config: SweepConfig, run_dir: Path, overrides: dict) -> TrainConfig:
    """How the sweep trains one run: its shared options, its folder and its scope's own (lr, scope, ...)."""
    return TrainConfig(**shared_train_options(config), out=str(run_dir), **overrides)


def _sweep_runs(config: SweepConfig, num_layers: int, probe_layer: int | None,
                extra_layers: list[int] = ()) -> list[tuple[str, dict]]:
    if config.layers == "none":  # references only (e.g. full MeZO at equal wall time)
        return _references(config, [])
    if config.layers == "all":
        layers = list(range(num_layers))
    else:
        layers = sorted(set(comma_list(config.layers, int,
                                       f"--layers {config.layers!r} is neither 'all' nor a list like 0,1,11")))
        bad = [k for k in layers if not 0 <= k < num_layers]
        if bad:
            raise DlzoError(f"--layers: layer {bad[0]} does not exist (0..{num_layers - 1})")
    layers = sorted(set(layers) | set(extra_layers) | ({probe_layer} if probe_layer is not None else set()))
    return _references(config, [(f"layer{k:02d}", {"scope": f"layer:{k}", "lr": config.lr}) for k in layers])


def _references(config: SweepConfig, runs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    pick = lambda value: config.lr if value < 0 else value  # noqa: E731
    for reference in reference_names(config.references):
        if reference == "full":
            runs.append(("full", {"scope": "full", "lr": pick(config.full_lr)}))
        elif reference == "lora":
            runs.append(("lora", {"scope": "lora", "lr": pick(config.lora_lr)}))
        elif reference == "adamw":
            runs.append(("adamw", {"scope": "full", "lr": config.adamw_lr, "optimizer": "adamw"}))
        else:  # lezo:K (reference_names lets nothing else through)
            runs.append((f"lezo{reference[5:]}", {"scope": reference, "lr": pick(config.full_lr)}))
    return runs


def _decide(run_dir: Path, config: TrainConfig, name: str) -> str:
    """What the sweep does with one run's folder (RunFolder.decide): a finished run is reported only if it was
    trained as this sweep would train it, every option but its folder included, steps and seed too (e.g. a run
    finished before --lr-grid chose another rate is refused); an interrupted one continues where it stopped,
    but an AdamW reference keeps no optimizer state on disk, so it starts again (before, every later sweep
    stopped on its refused --resume)."""
    def refuse(key: str, was: object, now: object) -> DlzoError:
        show = lambda value: f"{value:g}" if isinstance(value, float) else repr(value)  # noqa: E731
        return DlzoError(f"{run_dir} was trained with {key}={show(was)}, but this sweep runs {name} with "
                         f"{key}={show(now)}; move that folder away or give --out another folder")

    no_resume = "a first-order run keeps no optimizer state" if config.optimizer != "zo" else ""
    return RunFolder(run_dir).decide(config, study=True, no_resume=no_resume, refuse=refuse)


def _check_probe_is_for(probe_file: Path, kept: dict | None, now: dict) -> None:
    """The kept probe chose the swept layers: it must be of this model, on this task's or file's texts (probes
    written before this check say nothing and are taken as they are)."""
    for key, was in (kept or {}).items():
        if not same_path_option(key, was, now.get(key)):
            raise DlzoError(f"{probe_file} was measured with --{key} {was!r}, but this sweep has {now.get(key)!r}; "
                            f"give --out another folder")


def sweep(config: SweepConfig) -> dict:
    """Tune each layer alone (plus references) with the same seeds, steps and data; resumable. With --seeds,
    the same sweep once per seed, then mean ± std across seeds."""
    config.validate()
    if config.seeds:
        return sweep_seeds(config)
    out = Path(config.out)
    probe_file = out / "probe.json"
    rates = parse_grid(config.lr_grid) if config.lr_grid else None  # a bad flag is reported before any run
    kept_grid = (read_kept_grid(Path(config.grid_from), rates, config.grid_steps, config.grid_seed)
                 if config.grid_from else None)
    train_examples = None
    if config.data:  # the rows are read and checked before the sweep folder is made
        config.validate_data_options()
        train_examples = load_data(TrainConfig(**shared_train_options(config)), load_tokenizer(config.model)).splits.train
    out.mkdir(parents=True, exist_ok=True)
    measured_on = {"model": config.model, "task": config.task, "data": config.data}
    if probe_file.exists():
        probe = json.loads(probe_file.read_text())
        _check_probe_is_for(probe_file, probe.get("measured_on"), measured_on)
    else:
        if train_examples is None:
            task = load_task(config.task, config.data_dir)
            train_examples = task_splits(task, 0, config.num_train, None if config.num_dev < 0 else config.num_dev,
                                         config.num_test).train
        model, tokenizer = load_model(config.model, dtype=config.dtype), load_tokenizer(config.model)
        texts = [e.prompt + e.continuations[e.label] for e in train_examples[:64]]
        probe = {**find_dominant_layer(model, tokenizer, texts).to_json(), "measured_on": measured_on}
        atomic_write_json(probe_file, probe)
        del model
    probe_layer = probe["dominant_layer"]
    # every rule's pick is swept (sun: the probe's layer; onset: the largest persistent jump; docs/rules.md)
    rule_layers = {rule: layer for rule, layer in probe.get("picks", {}).items() if layer is not None}
    runs = _sweep_runs(config, len(probe["layers"]), probe_layer, sorted(set(rule_layers.values())))
    names = [name for name, _ in runs]  # checked before the grid, which may train for hours
    only = only_names(config.only)
    missing = next((name for name in only if name not in names), None)
    if missing is not None:
        raise DlzoError(f"--only {missing}: not a run of this sweep (its runs: {', '.join(names)})")
    grid = None
    if kept_grid:  # the rates an earlier sweep of this recipe chose (its grid runs need not be here)
        grid = kept_rates(kept_grid, runs)
    elif rates:  # each ZO scope's rate chosen on dev loss (dlzo.studies.lr_grid), the same for every seed
        base = TrainConfig(**{**shared_train_options(config), "seed": config.grid_seed})
        grid = choose_rates(base, runs, rates, config.grid_steps, Path(config.grid_out or out / "grid"))
    if grid:
        runs = [(name, {**overrides, "lr": grid["chosen"][name]["lr"]} if name in grid["chosen"] else overrides)
                for name, overrides in runs]
    header = {"model": config.model, "task": config.data or config.task, "probe_layer": probe_layer,
              "rule_layers": rule_layers, "config": asdict(config), "lr_grid": grid}
    checked: set[str] = set()
    summary = _collect(config, out, runs, header, checked)  # a run trained otherwise is refused before any training
    for name, overrides in tqdm(runs, desc="sweep", disable=False):
        run_dir = out / "runs" / name
        if (only and name not in only) or name in checked:  # checked: finished, and trained as asked
            continue
        train_config = _run_config(config, run_dir, overrides)
        decision = _decide(run_dir, train_config, name)
        if decision == REUSE:  # finished by another --only process since
            continue
        train(replace(train_config, resume=str(run_dir) if decision == RESUME else ""))
        summary = _collect(config, out, runs, header, checked)  # saved as each run finishes
    if summary.get("pending"):  # left to another --only process, or to a later sweep
        print(format_sweep(summary))
        print(f"{out}: {len(summary['pending'])} run(s) not finished yet ({', '.join(summary['pending'])}); "
              f"run the same sweep without --only once they are, for the verdict and the plot")
        return summary
    summary["verdict"] = sweep_verdict(summary)
    atomic_write_json(out / "sweep.json", summary)
    plot_sweep(summary, out / "sweep.png")
    print(format_sweep(summary))
    print(summary["verdict"])
    return summary


def _entry(name: str, overrides: dict, run_dir: Path) -> dict:
    """A finished run as the sweep reports it."""
    results = RunFolder(run_dir).results()
    metric, value = results["test_metric"], results["test_value"]
    if metric == "perplexity":  # --data generation rows: the verdict and plot want higher-is-better in [0, 1]
        metric, value = "1/perplexity", 1 / value
    return {"name": name, "scope": overrides["scope"], "optimizer": overrides.get("optimizer", "zo"),
            "layer": int(name[5:]) if name.startswith("layer") else None, "lr": overrides["lr"],
            "test_metric": value, "metric": metric,
            "dev_loss_start": results["dev_loss_start"], "dev_loss_end": results["dev_loss_best"],
            "best_step": best_dev_step(run_dir),
            "steps": results["steps"], "seconds": results["train_seconds"],
            "seconds_per_step": results["seconds_per_step"]}


def _collect(config: SweepConfig, out: Path, runs: list[tuple[str, dict]], header: dict, checked: set[str]) -> dict:
    """OUT/sweep.json from every run finished now (in this process or, with --only, in another one), each
    checked once (`checked`: a --data check hashes the files) to be trained as this sweep would train it; the
    others are listed as pending."""
    entries, pending = [], []
    for name, overrides in runs:
        run_dir = out / "runs" / name
        if not RunFolder(run_dir).is_finished():
            pending.append(name)
            continue
        if name not in checked:
            _decide(run_dir, _run_config(config, run_dir, overrides), name)  # reused: trained as asked
            checked.add(name)
        entries.append(_entry(name, overrides, run_dir))
    summary = {**header, "runs": entries, **({"pending": pending} if pending else {})}
    atomic_write_json(out / "sweep.json", summary)
    return summary


def sweep_seeds(config: SweepConfig) -> dict:
    """The sweep once per seed in OUT/seed<S>/ (each resumable), then OUT/seeds.json: mean, sample std and
    standard error across seeds of every run's test metric and best dev loss."""
    seeds = comma_list(config.seeds, int, f"--seeds {config.seeds!r} is not a list like 0,1,2")
    out = Path(config.out)
    pending: dict[str, list[str]] = {}
    for seed in seeds:  # one learning-rate grid, OUT/grid, for all the seeds
        done = sweep(replace(config, seed=seed, seeds="", out=str(out / f"seed{seed}"),
                             grid_out=config.grid_out or str(out / "grid")))
        if done.get("pending"):
            pending[f"seed{seed}"] = done["pending"]
    if pending:  # a mean over seeds with some runs missing would not be the study's figure
        print(f"{out}: no seeds.json yet, runs not finished: "
              + "; ".join(f"{seed} {', '.join(names)}" for seed, names in pending.items()))
        return {"config": asdict(config), "pending": pending}
    summary = {"config": asdict(config), "runs": seed_summary(out, seeds)}
    atomic_write_json(out / "seeds.json", summary)
    print(format_seed_summary(summary["runs"]))
    return summary
