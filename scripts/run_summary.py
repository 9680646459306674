"""Summaries of finished `dlzo train` runs over seeds, for the figures in docs/ (mean ± std, each seed's value).

    python scripts/run_summary.py table OUT.json NAME=RUN_s0,RUN_s1,RUN_s2 [NAME=...]
        results.json of each run: test metric, best dev loss (or dev metric / reward), seconds a step, the mean
        |g| of its ZO steps (trajectory.jsonl), and the
        peak RSS a run's log recorded (a line "maxrss_kb N", as `/usr/bin/time -f "maxrss_kb %M"` writes it,
        in RUN.log beside the folder), per name.
    python scripts/run_summary.py curves OUT.png NAME=RUN_s0,... [NAME=...]
        the dev metric of every run against its step (metrics.jsonl), one colour per name.
    python scripts/run_summary.py screen OUT.json NAME=RUN [NAME=...]
        a dev-loss screen: each run's dev values by step, the value at its last evaluation (what a grid judges)
        and its best, and its seconds a step.
    python scripts/run_summary.py depth OUT.png LAYER=RUN_s0,RUN_s1 [LAYER=...]
        test metric and best dev loss (mean ± std over seeds, each seed a dot) against the tuned layer; the
        table beside it as OUT.json. A layer may instead name a sweep's summary, LAYER=SEEDS.json:RUN (a
        `dlzo sweep` seeds.json and one of its runs, e.g. layer11): its seeds' test and best dev loss.

Reads only what the runs wrote; nothing is trained here.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

DEV_KEYS = ("dev_reward", "dev_accuracy", "dev_f1", "dev_exact_match", "dev_loss")  # the first a run logs


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
            "values": [round(v, 4) for v in values]}


def peak_rss(run: Path) -> float | None:
    log = run.with_name(run.name + ".log")
    if not log.exists():
        return None
    lines = [line for line in log.read_text().splitlines() if line.startswith("maxrss_kb ")]
    return int(lines[-1].split()[1]) * 1024 if lines else None


def summary(runs: list[Path]) -> dict:
    results = [json.loads((run / "results.json").read_text()) for run in runs]
    row = {"runs": [str(run) for run in runs]}
    for key in ("test_value", "dev_loss_start", "dev_loss_best", "reward_start", "reward_best",
                "dev_accuracy_start", "dev_accuracy_best", "seconds_per_step"):
        values = [r[key] for r in results if key in r]
        if len(values) == len(results):
            row[key] = spread(values)
    # the mean |g| of a run's ZO steps: how large the estimate is beside the forward's rounding (half precision)
    grads = [[abs(g) for r in records(run / "trajectory.jsonl") for g in r["grads"]]
             for run in runs if (run / "trajectory.jsonl").exists()]
    if len(grads) == len(runs) and all(grads):
        row["mean_abs_grad"] = spread([sum(g) / len(g) for g in grads])
    peaks = [peak_rss(run) for run in runs]
    if all(p is not None for p in peaks):
        row["peak_rss_bytes"] = spread(peaks)
    return row


def sweep_row(spec: str) -> dict:
    """One run of a `dlzo sweep` seeds.json ("PATH.json:RUN"), in `summary`'s keys: its run folders may be gone."""
    path, _, name = spec.rpartition(":")
    run = json.loads(Path(path).read_text())["runs"][name]
    return {"runs": [spec], "test_value": spread(run["test"]["values"]), "dev_loss_best": spread(run["dev_best"]["values"])}


def parse(pairs: list[str]) -> dict[str, list[Path]]:
    named = {}
    for pair in pairs:
        name, _, folders = pair.partition("=")
        if not folders:
            raise SystemExit(f"run_summary: {pair!r} is not NAME=RUN,RUN,...")
        named[name] = [Path(f) for f in folders.split(",")]
    return named


def dev_records(run: Path) -> tuple[str, list[dict]]:
    """The dev metric a run logs (the first of DEV_KEYS) and its evaluation records."""
    logged = [r for r in records(run / "metrics.jsonl") if any(k in r for k in DEV_KEYS)]
    return next(k for k in DEV_KEYS if k in logged[0]), logged


def curves(out: Path, named: dict[str, list[Path]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for colour, (name, runs) in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), named.items()):
        for index, run in enumerate(runs):
            key, logged = dev_records(run)
            axis.plot([r["step"] for r in logged], [r[key] for r in logged], color=colour, alpha=0.8,
                      marker="o", markersize=3, label=name if index == 0 else None)
            axis.set_ylabel(key.replace("_", " "))
    axis.set_xlabel("step")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def screen(named: dict[str, list[Path]]) -> dict:
    rows = {}
    for name, runs in named.items():
        for run in runs:
            key, logged = dev_records(run)
            values = {r["step"]: round(r[key], 4) for r in logged}
            finished = (run / "results.json").exists()  # a run stopped early (diverging) has its evaluations only
            results = json.loads((run / "results.json").read_text()) if finished else {}
            rows[name] = {"run": str(run), "metric": key, "by_step": values, "last": values[max(values)],
                          "best": min(values.values()), "finished": finished,
                          "seconds_per_step": results.get("seconds_per_step")}
    return rows


def depth(out: Path, named: dict[str, list[Path]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {int(layer): sweep_row(str(runs[0])) if len(runs) == 1 and ".json:" in str(runs[0]) else summary(runs)
            for layer, runs in named.items()}
    out.with_suffix(".json").write_text(json.dumps({str(k): rows[k] for k in sorted(rows)}, indent=1) + "\n")
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, key, label in ((axes[0], "test_value", "test accuracy"), (axes[1], "dev_loss_best", "best dev loss")):
        layers = sorted(rows)
        means = [rows[k][key]["mean"] for k in layers]
        spreads = [rows[k][key]["std"] or 0.0 for k in layers]
        axis.errorbar(layers, means, yerr=spreads, marker="o", capsize=3)
        for k in layers:
            axis.scatter([k] * len(rows[k][key]["values"]), rows[k][key]["values"], color="grey", s=8, zorder=3)
        axis.set_xlabel("tuned layer")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] not in ("table", "curves", "depth", "screen"):
        raise SystemExit(__doc__)
    what, out, named = argv[0], Path(argv[1]), parse(argv[2:])
    out.parent.mkdir(parents=True, exist_ok=True)
    if what == "curves":
        curves(out, named)
    elif what == "depth":
        depth(out, named)
    elif what == "screen":
        out.write_text(json.dumps(screen(named), indent=1) + "\n")
    else:
        out.write_text(json.dumps({name: summary(runs) for name, runs in named.items()}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
