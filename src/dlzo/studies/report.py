"""The Markdown report (`dlzo report`): the tables and pictures found in output folders (probe, sensitivity,
sweep, run folders) gathered into one file; sweep verdicts and seed summaries.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import matplotlib

from dlzo.errors import DlzoError
from dlzo.evaluation.evaluate import own_eval_line
from dlzo.model.checkpoint import atomic_write_text
from dlzo.studies.plots import plot_loss_curves
from dlzo.studies.spread import format_spread, spread
from dlzo.training.run_folder import RunFolder

matplotlib.use("Agg")  # files only, never a window


def sweep_verdict(summary: dict) -> str:
    layers = sorted((e for e in summary["runs"] if e["layer"] is not None), key=lambda e: -e["test_metric"])
    if not layers:
        return "no single-layer runs"
    best, probe_layer = layers[0], summary["probe_layer"]
    full = next((e for e in summary["runs"] if e["name"] == "full"), None)
    parts = [f"best single layer: {best['layer']} ({best['metric']} {best['test_metric']:.4f})"]
    if len(layers) > 1:
        parts.append(f"margin over runner-up layer {layers[1]['layer']}: {best['test_metric'] - layers[1]['test_metric']:+.4f}")
    if full:
        parts.append(f"margin over full MeZO: {best['test_metric'] - full['test_metric']:+.4f}")
    if probe_layer is None:
        parts.append("the probe found no massive activations, so there is no rule layer to compare")
    else:
        rank = [e["layer"] for e in layers].index(probe_layer) + 1
        parts.append(f"the probe's layer {probe_layer} {'is' if best['layer'] == probe_layer else 'is not'} the best "
                     f"(rank {rank} of {len(layers)} by test {best['metric']})")
    order = [e["layer"] for e in layers]
    for rule, layer in summary.get("rule_layers", {}).items():
        if layer in order and layer != probe_layer:
            parts.append(f"the {rule} rule's layer {layer} ranks {order.index(layer) + 1} of {len(layers)}")
    return "; ".join(parts)


def format_sweep(summary: dict) -> str:
    lines = [f"{'run':>8}  {'lr':>8}  {'test':>7}  {'dev start':>9}  {'dev best':>9}  {'drop':>8}  {'s/step':>7}"]
    for e in summary["runs"]:
        mark = "  <= probe" if e["layer"] is not None and e["layer"] == summary["probe_layer"] else ""
        lines.append(f"{e['name']:>8}  {e['lr']:8.1e}  {e['test_metric']:7.4f}  {e['dev_loss_start']:9.4f}  "
                     f"{e['dev_loss_end']:9.4f}  {e['dev_loss_start'] - e['dev_loss_end']:8.4f}  "
                     f"{e['seconds_per_step']:7.3f}{mark}")
    return "\n".join(lines)


def best_dev_step(run_dir: Path) -> int | None:
    """The step of the run's lowest logged dev loss (the checkpoint its test figure comes from); None if none."""
    losses = RunFolder(run_dir).dev_losses()
    return min(losses, key=losses.get) if losses else None


def _seed_records(seed_dir: Path) -> list[dict]:
    """One record per run the seed's sweep reported (its sweep.json), from the run's results.json: a folder
    moved aside in runs/ is none of them; without a sweep.json yet, every finished run in runs/. A seed folder
    with a sweep.json and no runs/ at all (a study continued on another machine from its committed sweep.json
    files) is taken from the sweep.json entries: the figures that sweep reported."""
    sweep_file = seed_dir / "sweep.json"
    entries = json.loads(sweep_file.read_text()).get("runs", []) if sweep_file.exists() else [
        {"name": results.parent.name} for results in sorted(seed_dir.glob("runs/*/results.json"))]
    from_entries = sweep_file.exists() and not (seed_dir / "runs").exists()
    records = []
    for entry in entries:
        run_dir = seed_dir / "runs" / entry["name"]
        if from_entries:
            value, metric = entry["test_metric"], entry["metric"]
            if metric == "1/perplexity":  # the sweep turned --data perplexity round for its verdict
                value, metric = (None if value is None else 1 / value), "perplexity"
            record = {"test_value": value, "test_metric": metric, "steps": entry["steps"], "scope": entry["scope"],
                      "dev_loss_best": entry["dev_loss_end"], "seconds_per_step": entry["seconds_per_step"],
                      "best_step": entry.get("best_step"), "source": "sweep.json",  # scope: the option, layer:5
                      "where": f"{seed_dir.name}/sweep.json ({entry['name']})"}
        elif (run := RunFolder(run_dir)).results_file.exists():  # scope: the tuned layers, "layers [5]"
            record = {**run.results(), "best_step": best_dev_step(run_dir),
                      "source": "run", "where": f"{seed_dir.name}/runs/{entry['name']}"}
        else:
            continue
        records.append({**record, "name": entry["name"], "seed": seed_dir.name})
    return records


def seed_summary(folder: Path, seeds: list[int] | None = None) -> dict[str, dict]:
    """Runs repeated over seeds (FOLDER/seed<S>/runs/NAME/results.json, or a seed's sweep.json entries where its
    run folders are not on this machine), grouped by NAME: test metric and best dev loss as mean, sample standard
    deviation and standard error, and at which step the dev loss was lowest.
    With `seeds`, only those seeds' folders (a sweep's --seeds: an earlier study's other seeds in the same
    folder are not averaged in); a run trained for other steps, another metric or another scope than its group
    is refused (scopes are compared within each source: a sweep entry names the option, a run the layers)."""
    seed_dirs = ([Path(folder) / f"seed{seed}" for seed in seeds] if seeds is not None
                 else sorted(p for p in Path(folder).glob("seed*") if p.is_dir()))
    groups: dict[str, list[dict]] = {}
    for record in (r for seed_dir in seed_dirs for r in _seed_records(seed_dir)):
        group = groups.setdefault(record["name"], [])
        for key in ("steps", "test_metric", "scope"):
            first = next((r for r in group if key != "scope" or r["source"] == record["source"]), None)
            if first is not None and record.get(key) != first.get(key):
                raise DlzoError(f"{Path(folder) / record['where']}: {key} {record.get(key)!r}, but {first['seed']}'s "
                                f"{record['name']} has {first.get(key)!r}; a mean over seeds needs one recipe")
        group.append(record)
    summary = {}
    for name, records in groups.items():
        test = spread([r["test_value"] for r in records])  # n: the seeds with a test figure
        shown = next((r for r in records if r["source"] == "run"), records[0])
        summary[name] = {"seeds": [r["seed"] for r in records], "n": test["n"], "scope": shown["scope"],
                         "steps": records[0]["steps"], "test": test, "metric": records[0]["test_metric"],
                         "dev_best": spread([r["dev_loss_best"] for r in records]),
                         "seconds_per_step": spread([r["seconds_per_step"] for r in records]),
                         "best_steps": [r["best_step"] for r in records]}
    return summary


def format_seed_summary(summary: dict[str, dict]) -> str:
    lines = ["| run | scope | steps | seeds | test mean ± std (SE) | best dev loss mean ± std (SE) | step of best dev (per seed) | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in sorted(summary.items()):
        step_s = row["seconds_per_step"]["mean"]
        lines.append(f"| {name} | {row['scope']} | {row['steps']} | {row['n']} | {format_spread(row['test'])} | "
                     f"{format_spread(row['dev_best'])} | {row['best_steps']} | "
                     f"{'-' if step_s is None else f'{step_s:.2f}'} |")
    return "\n".join(lines)


def _find_runs(folder) -> list:
    return sorted(p.parent for p in folder.rglob("results.json"))


def unfinished_lines(folder: Path) -> list[str]:
    """A table of the runs under `folder` that have started and not finished (run.json, no results.json): how
    far each got, its dev losses, whether a process holds it now, and what is left at its recent pace (training
    steps only: the evaluations still to come are not counted)."""
    rows = []
    for path in sorted(p.parent for p in folder.rglob("run.json")):
        if RunFolder(path).is_finished():  # results.json, or a race's finished recipe
            continue
        state = RunFolder(path).progress()
        dev = state["dev_losses"]
        last = f"{dev[max(dev)]:.4f} at step {max(dev)}" if dev else "-"
        best = f"{min(dev.values()):.4f}" if dev else "-"
        pace = state["seconds_per_step"]
        left = (state["steps"] or 0) - state["done"]
        eta = f"{pace:.1f} s/step, about {pace * left / 60:.0f} min of steps left" if pace else "-"
        if state["holder"]:
            who = f"running (process {state['holder']})"
        elif state["diverged"]:
            who = "diverged (a grid's rate: counted as infinitely bad)"
        elif state["optimizer"] != "zo":  # first-order runs keep no optimizer state on disk
            who = "stopped: starts again from step 0 (first-order runs do not resume)"
        else:
            who = f"stopped: dlzo train --resume {path}"
        rows.append(f"| {path.relative_to(folder) if path != folder else path.name} | {state['done']} of "
                    f"{state['steps']} | {last} | {best} | {eta} | {who} |")
    if not rows:
        return []
    return ["**Runs not finished**", "", "| run | steps logged | last dev loss | best dev loss | pace | state |",
            "|---|---|---|---|---|---|", *rows, ""]


def eval_lines(folder: Path) -> list[str]:
    """One line per eval.json under the folder (and a blank line after them, if any)."""
    lines = []
    for file in sorted(folder.rglob("eval.json")):
        e = json.loads(file.read_text())
        if "data" in e:  # `dlzo eval --data`: your own rows, no task metric
            lines.append(f"- eval {file.parent.name}: {own_eval_line(e)}")
        else:
            lines.append(f"- eval {file.parent.name}: {e['task']} {e['metric']} {e['value']:.4f} on "
                         f"{e['num_examples']} examples ({e.get('icl', 0)}-shot)")
    return lines + [""] if lines else []


def _sweep_lines(data: dict) -> list[str]:
    """A sweep.json's table and verdict; while --only processes have runs left, the runs it waits for."""
    verdict = (f"waiting for {', '.join(data['pending'])} (not finished yet)" if data.get("pending")
               else data.get("verdict") or sweep_verdict(data))
    return ["**Layer sweep**", "", "```", format_sweep(data), "```", "", f"Verdict: {verdict}", ""]


def report(folders: list[str], out: str) -> str:
    """Markdown with the tables and pictures found in the given output folders."""
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    pictures = target.parent / (target.stem + "_files")
    pictures.mkdir(exist_ok=True)

    copied: set[Path] = set()

    def picture(source: Path, caption: str) -> str:
        copy = pictures / f"{source.parent.name}-{source.name}"
        for n in range(2, len(copied) + 2):  # two folders of one name (a/sweep, b/sweep): both pictures kept
            if copy not in copied:
                break
            copy = pictures / f"{source.parent.name}-{n}-{source.name}"
        copied.add(copy)
        shutil.copyfile(source, copy)
        return f"![{caption}]({os.path.relpath(copy, target.parent)})\n"

    lines = ["# dlzo report", ""]
    all_runs = []
    for folder in map(Path, folders):
        if not folder.exists():
            raise DlzoError(f"report: folder {folder} does not exist")
        lines += [f"## {folder}", ""]
        probe = folder / "probe.json"
        if probe.exists():
            data = json.loads(probe.read_text())
            lines += [f"**Probe** ({data['model']}, {data['num_tokens']} tokens, {data['dtype']}): dominant layer "
                      f"**{data['dominant_layer'] if data['dominant_layer'] is not None else 'none (no massive activations)'}**",
                      "", "| layer | max abs | median abs | ratio |", "|---|---|---|---|"]
            lines += [f"| {s['index']} | {s['max_abs']:.4g} | {s['median_abs']:.4g} | {s['ratio']:.4g} |" for s in data["layers"]]
            lines.append("")
            if (folder / "probe.png").exists():
                lines.append(picture(folder / "probe.png", "probe"))
        sens = folder / "sensitivity.json"
        if sens.exists():
            data = json.loads(sens.read_text())
            lines += [f"**Perturbation sensitivity** (eps {data['eps']}, {data['seeds']} seeds x {data['batches']} batches): "
                      f"most sensitive layer **{data['most_sensitive_layer']}**", "",
                      "| layer | mean abs(L+ - L-)/2eps | std |", "|---|---|---|"]
            lines += [f"| {d['layer']} | {d['mean']:.4g} | {d['std']:.4g} |" for d in data["layers"]]
            lines.append("")
            for name in ("sensitivity.png", "propagation.png"):
                if (folder / name).exists():
                    lines.append(picture(folder / name, name[:-4]))
        try:
            seeds = seed_summary(folder)
        except DlzoError as err:  # one group mixing recipes: said, and the rest of the report still written
            seeds, lines = {}, lines + [f"**Across seeds**: not summarised: {err}", ""]
        if seeds:
            lines += [f"**Across seeds** ({folder})", "", format_seed_summary(seeds), ""]
        sweep_file = folder / "sweep.json"
        if sweep_file.exists():
            lines += _sweep_lines(json.loads(sweep_file.read_text()))
            if (folder / "sweep.png").exists():
                lines.append(picture(folder / "sweep.png", "sweep"))
        runs = _find_runs(folder)
        if runs:
            lines += ["**Runs**", "", "| run | scope | optimizer | steps | test | dev loss start -> best | s/step |",
                      "|---|---|---|---|---|---|---|"]
            for run in runs:
                r = RunFolder(run).results()
                test = f"{r['test_metric']} {r['test_value']:.4f}" if r["test_value"] is not None else "-"
                lines.append(f"| {run.name} | {r['scope']} | {r['optimizer']} | {r['steps']} | {test} | "
                             f"{r['dev_loss_start']:.4f} -> {r['dev_loss_best']:.4f} | {r['seconds_per_step']} |")
            lines.append("")
            all_runs += runs
        unfinished = unfinished_lines(folder)
        if unfinished:  # also on the terminal: `dlzo report SWEEP` is how a long study is looked in on
            print(f"{folder}\n" + "\n".join(unfinished))
        lines += unfinished + eval_lines(folder)
    if all_runs:
        plot_loss_curves(all_runs, pictures / "loss_curves.png")
        lines += ["## Loss curves", "", f"![loss curves]({os.path.relpath(pictures / 'loss_curves.png', target.parent)})", ""]
    text = "\n".join(lines)
    atomic_write_text(target, text)
    return text

