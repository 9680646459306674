"""Every picture dlzo draws: the probe's max|h| per layer, a sweep's bars, a sensitivity measurement, a race's
curves and training loss curves (matplotlib, Agg backend, PNG).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import torch
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dlzo.model.checkpoint import atomic_write_json
from dlzo.model.probe import ProbeResult


def save_outputs(result: ProbeResult, folder: str | Path) -> None:
    """Write FOLDER/probe.json and FOLDER/probe.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "probe.json", result.to_json())
    plot(result, folder / "probe.png")


def plot(result: ProbeResult, path: str | Path) -> None:
    """Log-scale max and median |h| per layer, with the sun thresholds, the chosen layer and the
    onset layer marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    indices = [s.index for s in result.layers]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.semilogy(indices, [s.max_abs for s in result.layers], "o-", label="max |h|")
    ax.semilogy(indices, [s.median_abs for s in result.layers], "s-", label="median |h|")
    ax.semilogy(indices, [s.median_abs * result.rule["rel_threshold"] for s in result.layers], ":",
                color="gray", label=f"median x {result.rule['rel_threshold']:g} (ratio threshold)")
    ax.axhline(result.rule["abs_threshold"], color="red", ls="--", label=f"abs threshold {result.rule['abs_threshold']:g}")
    rule_name = result.rule.get("name", "sun")
    if result.dominant_layer is not None:
        ax.axvline(result.dominant_layer, color="green", lw=2, alpha=0.6,
                   label=f"dominant layer {result.dominant_layer} ({rule_name} rule)")
    onset = result.picks.get("onset")
    if onset is not None and onset in indices:
        ax.semilogy([onset], [result.layers[indices.index(onset)].max_abs], marker="*", ms=16, color="darkorange",
                    ls="none", label=f"onset layer {onset} (largest persistent jump)")
        if onset != result.dominant_layer:
            ax.axvline(onset, color="darkorange", ls="-.", lw=1.5, alpha=0.8)
    ax.set_xlabel("decoder layer (0-based), output of the block")
    ax.set_ylabel("|activation|")
    verdict = "no massive activations" if result.dominant_layer is None else f"dominant layer {result.dominant_layer}"
    verdict += f", {rule_name} rule"
    ax.set_title(f"Residual-stream magnitudes: {Path(str(result.model)).name} ({verdict})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(summary: dict, path: str | Path) -> None:
    layers = [e for e in summary["runs"] if e["layer"] is not None]
    refs = [e for e in summary["runs"] if e["layer"] is None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, label in ((axes[0], "test_metric", f"test {layers[0]['metric'] if layers else ''}"),
                           (axes[1], "drop", "dev-loss drop (start - best)")):
        values = [(e["dev_loss_start"] - e["dev_loss_end"]) if key == "drop" else e[key] for e in layers]
        colors = ["tab:green" if e["layer"] == summary["probe_layer"] else "tab:blue" for e in layers]
        ax.bar([e["layer"] for e in layers], values, color=colors)
        styles = {"full": ("red", "--"), "lora": ("purple", ":"), "adamw": ("black", "-.")}
        for ref in refs:
            value = (ref["dev_loss_start"] - ref["dev_loss_end"]) if key == "drop" else ref[key]
            color, style = styles.get(ref["name"], ("gray", "--"))
            ax.axhline(value, color=color, ls=style, label=f"{ref['name']} ({value:.3f})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
        ax.set_xlabel("tuned layer (green: the probe's layer)")
        ax.set_ylabel(label)
        if key == "test_metric" and layers:
            low = min(values + [r[key] for r in refs])
            ax.set_ylim(max(0.0, low - 0.05), None)
        if refs:
            ax.legend(fontsize=8)
    fig.suptitle(f"Per-layer ZO sweep: {summary['model']} on {summary['task']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sensitivity(data: dict, bars_path: str | Path, heatmap_path: str | Path) -> None:
    layers = [d["layer"] for d in data["layers"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(layers, [d["mean"] for d in data["layers"]], yerr=[d["std"] for d in data["layers"]], capsize=2)
    ax.set_xlabel("perturbed layer")
    ax.set_ylabel("|L(θ+εz) - L(θ-εz)| / 2ε  (mean ± std)")
    ax.set_title(f"ZO signal per layer: {data['model']} on {data['task']}")
    fig.tight_layout()
    fig.savefig(bars_path, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 6))
    matrix = torch.tensor(data["propagation"], dtype=torch.float64)
    # Layers before the perturbed one are exactly unchanged: grey them out rather than let log10(0) set the
    # colour scale and flatten the differences that matter.
    reached = matrix > 0
    logs = torch.where(reached, matrix.clamp_min(1e-300).log10(), torch.tensor(float("nan")))
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("lightgrey")
    image = ax.imshow(logs.numpy(), cmap=cmap, aspect="auto", origin="lower")
    fig.colorbar(image, label="log10 ||h_j(θ+εz_l) - h_j(θ)|| / ||h_j(θ)||  (grey: not reached)")
    ax.set_xlabel("layer j whose output is measured")
    ax.set_ylabel("perturbed layer l")
    ax.set_title("Propagation of a one-layer perturbation")
    fig.tight_layout()
    fig.savefig(heatmap_path, dpi=110)
    plt.close(fig)


def plot_race(report: dict, path: str | Path) -> None:
    """Test metric against training seconds, one line per recipe and seed (dlzo race), the target dashed and
    the upstream-style full MeZO estimate of time to target marked; with --dev-loss a second panel draws the
    dev loss against the same seconds, full MeZO's best dev loss dashed."""
    dev = any("dev_loss" in p for seed in report["results"].values() for r in seed.values() for p in r["curve"])
    fig, axes = plt.subplots(1, 2 if dev else 1, figsize=(14 if dev else 8, 4.5), squeeze=False)
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, name in enumerate(report["recipes"]):
        for number, results in enumerate(report["results"].values()):
            curve = results[name]["curve"]
            style = dict(ms=3, lw=1.2, alpha=0.85, color=colors[index % len(colors)],
                         label=name if number == 0 else None)
            ax.plot([p["seconds"] for p in curve], [p["metric"] for p in curve], "o-", **style)
            if dev:
                axes[0][1].plot([p["seconds"] for p in curve], [p.get("dev_loss") for p in curve], "o-", **style)
    ax.axhline(report["target"], ls="--", color="grey", lw=1, label=f"target {report['target']}")
    for number, ratios in enumerate(report["ratios"].values()):
        upstream = ratios["references"].get("upstream_full")
        if upstream:
            mark = "" if upstream["reached"] else " (at least)"
            ax.plot([upstream["seconds"]], [report["target"]], "x", color="black", ms=8,
                    label=f"upstream full MeZO, estimated{mark}" if number == 0 else None)
        best = ratios["references"].get("full_best_dev_loss")
        if dev and best:
            axes[0][1].axhline(best["dev_loss"], ls="--", color="grey", lw=1,
                               label="full MeZO's best dev loss" if number == 0 else None)
    for axis, label in zip(axes[0], ("test metric (fixed subset)", "dev loss")):
        axis.set_xscale("symlog", linthresh=1.0)
        axis.set_xlim(left=0)  # no negative seconds in the margin symlog would add
        axis.set_xlabel("training seconds (evaluation excluded)")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    ax.set_title("Time to accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The dev metric of runs trained on another objective than the loss (dlzo.evaluation.objectives), in this order.
OBJECTIVE_METRICS = ("dev_reward", "dev_accuracy", "dev_f1", "dev_exact_match")


def plot_loss_curves(runs: list[Path], path: str | Path) -> None:
    """Each run's dev loss by step; when every run logged one objective's dev metric (a reward, accuracy, F1 or
    exact match), that metric instead (its dev loss is only its negative)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    curves = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                    if '"dev_loss"' in line] for run in runs}
    shown = [points for points in curves.values() if points]
    key = next((k for k in OBJECTIVE_METRICS if shown and all(k in p for points in shown for p in points)), "dev_loss")
    for run, points in curves.items():
        if points:
            ax.plot([p["step"] for p in points], [p[key] for p in points], "o-", ms=3, label=run.name)
    label = key.removeprefix("dev_").replace("_", " ")
    ax.set_xlabel("step")
    ax.set_ylabel(f"dev {label}")
    ax.set_title(f"Dev {label} during training")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

