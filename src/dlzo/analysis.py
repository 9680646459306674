"""The paper's analyses: per-layer perturbation sensitivity and how a layer's perturbation propagates."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from dlzo.config import option, same_as
from dlzo.errors import DlzoError
from dlzo.fastpath import BranchedForward
from dlzo.models import decoder_layers
from dlzo.scoring import EncodedBatch, hidden_states
from dlzo.train import TrainConfig
from dlzo.zo import ZOOptimizer


@dataclass
class LayerSensitivity:
    layer: int
    mean: float  # mean over seeds and batches of |L(θ+εz_l) - L(θ-εz_l)| / 2ε
    std: float
    values: list[float]


def layer_parameters(model: nn.Module, layer: int) -> list[tuple[str, nn.Parameter]]:
    block_params = {id(p) for p in decoder_layers(model)[layer].parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in block_params]


# The quick measurement behind --scope dominant's fallback (the demo shows the same one, so that its
# picture and the trained layer agree): 2 directions x the first 2 training batches of 16.
QUICK_SENSITIVITY = {"seeds": 2, "batches": 2, "batch_size": 16}


def leading_batches(model: nn.Module, tokenizer, examples: list, batch_size: int, count: int,
                    device=None) -> list[EncodedBatch]:
    """The first `count` batches of `examples`, encoded as the trainer's fast path encodes them."""
    from dlzo.scoring import encode, fast_layout

    device = device or next(model.parameters()).device
    layout = fast_layout(model, tokenizer)
    return [encode(tokenizer, examples[i * batch_size : (i + 1) * batch_size], layout=layout).to(device)
            for i in range(count)]


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batches: list[EncodedBatch], eps: float = 1e-3, seeds: int = 3,
                      layers: list[int] | None = None, progress=None) -> list[LayerSensitivity]:
    """Inference only: for each layer, perturb it alone along `seeds` directions on each batch."""
    chosen = range(len(decoder_layers(model))) if layers is None else layers
    results = []
    # the unperturbed layers below layer l give the same hidden states for every l, seed and branch:
    # computing them once per batch makes the measurement about a third cheaper on a 30-layer model
    prefix_caches = [{} for _ in batches]
    for layer in chosen:
        named = layer_parameters(model, layer)
        runner = BranchedForward(model, [n for n, _ in named])
        probe = ZOOptimizer(named, lr=0.0, eps=eps, seed=10_000 + layer)
        values = []
        for seed in range(seeds):
            zs = [probe.sample(seed, i, p) for i, (_, p) in enumerate(named)]
            plus = {n: p.detach() + eps * z for (n, p), z in zip(named, zs)}
            minus = {n: p.detach() - eps * z for (n, p), z in zip(named, zs)}
            for batch, cache in zip(batches, prefix_caches):
                loss_plus, loss_minus = runner.loss_pair(batch, plus, minus, prefix_cache=cache)
                values.append(abs(float(loss_plus - loss_minus)) / (2 * eps))
        results.append(LayerSensitivity(layer, statistics.fmean(values),
                                        statistics.pstdev(values) if len(values) > 1 else 0.0, values))
        if progress is not None:
            progress.update(1)
    return results


@torch.no_grad()
def propagation(model: nn.Module, batch: EncodedBatch, eps: float = 1e-3, seed: int = 0,
                layers: list[int] | None = None) -> list[list[float]]:
    """matrix[l][j] = ||h_j(θ+εz_l) - h_j(θ)|| / ||h_j(θ)|| for the output h_j of every layer j
    (0 where j < l: a perturbation cannot reach earlier layers)."""
    blocks = decoder_layers(model)
    chosen = range(len(blocks)) if layers is None else layers
    mask = (batch.attention_mask if batch.attention_mask is not None else torch.ones_like(batch.input_ids)).bool()

    def outputs() -> list[torch.Tensor]:
        captured = []
        handles = [b.register_forward_hook(lambda _m, _i, o: captured.append((o[0] if isinstance(o, tuple) else o)[mask]))
                   for b in blocks]
        try:
            hidden_states(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    clean = outputs()
    matrix = []
    for layer in chosen:
        named = layer_parameters(model, layer)
        probe = ZOOptimizer(named, lr=0.0, eps=eps, seed=20_000 + layer, exact_restore=True)
        saved = [p.detach().clone() for _, p in named]
        for index, (_, p) in enumerate(named):
            p.data.add_(probe.sample(seed, index, p), alpha=eps)
        try:
            perturbed = outputs()
        finally:
            for (_, p), original in zip(named, saved):
                p.data.copy_(original)
        matrix.append([float((a - b).norm() / b.norm().clamp_min(1e-12)) if j >= layer else 0.0
                       for j, (a, b) in enumerate(zip(perturbed, clean))])
    return matrix


# --------------------------------------------------------------------------------------------- sweep


@dataclass
class SweepConfig:
    model: str = option("", "model to sweep (hub id, folder, .gguf, short name)")
    task: str = same_as(TrainConfig, "task")
    data_dir: str = same_as(TrainConfig, "data_dir")
    out: str = option("out/sweep", "sweep folder: sweep.json, sweep.png and one run folder per scope")
    layers: str = option("all", "layers to tune alone: all, or K1,K2,... (the probe's layer is always added)")
    references: str = option("full,lora", "reference runs: any of full, lora, adamw (first-order, full model)")
    steps: int = option(200, "steps of every run")
    batch_size: int = same_as(TrainConfig, "batch_size")
    lr: float = option(1e-5, "learning rate of the one-layer runs")
    full_lr: float = option(-1.0, "learning rate of full MeZO (-1: same as --lr)")
    lora_lr: float = option(-1.0, "learning rate of ZO-LoRA (-1: same as --lr)")
    adamw_lr: float = option(1e-5, "learning rate of the first-order reference")
    eps: float = same_as(TrainConfig, "eps")
    seed: int = option(0, "run seed, the same for every run")
    num_train: int = same_as(TrainConfig, "num_train")
    num_dev: int = same_as(TrainConfig, "num_dev")
    num_test: int = same_as(TrainConfig, "num_test")
    eval_every: int = same_as(TrainConfig, "eval_every", default=50)
    dtype: str = same_as(TrainConfig, "dtype")
    quiet: bool = option(True, "no per-step progress bars")


def _sweep_runs(config: SweepConfig, num_layers: int, probe_layer: int | None) -> list[tuple[str, dict]]:
    if config.layers == "all":
        layers = list(range(num_layers))
    else:
        try:
            layers = sorted({int(k) for k in config.layers.split(",") if k.strip()})
        except ValueError:
            raise DlzoError(f"--layers {config.layers!r} is neither 'all' nor a list like 0,1,11") from None
        bad = [k for k in layers if not 0 <= k < num_layers]
        if bad:
            raise DlzoError(f"--layers: layer {bad[0]} does not exist (0..{num_layers - 1})")
    if probe_layer is not None and probe_layer not in layers:
        layers = sorted(layers + [probe_layer])
    runs = [(f"layer{k:02d}", {"scope": f"layer:{k}", "lr": config.lr}) for k in layers]
    pick = lambda value: config.lr if value < 0 else value  # noqa: E731
    for reference in [r.strip() for r in config.references.split(",") if r.strip()]:
        if reference == "full":
            runs.append(("full", {"scope": "full", "lr": pick(config.full_lr)}))
        elif reference == "lora":
            runs.append(("lora", {"scope": "lora", "lr": pick(config.lora_lr)}))
        elif reference == "adamw":
            runs.append(("adamw", {"scope": "full", "lr": config.adamw_lr, "optimizer": "adamw"}))
        else:
            raise DlzoError(f"--references: {reference!r} is not full, lora or adamw")
    return runs


def sweep(config: SweepConfig) -> dict:
    """Tune each layer alone (plus references) with the same seeds, steps and data; resumable."""
    import json
    from pathlib import Path

    from dlzo.checkpoint import atomic_write_json
    from dlzo.models import load_model, load_tokenizer
    from dlzo.probe import find_dominant_layer
    from dlzo.tasks import load_task, task_splits
    from dlzo.train import train

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    probe_file = out / "probe.json"
    task = load_task(config.task, config.data_dir)
    if probe_file.exists():
        probe = json.loads(probe_file.read_text())
    else:
        splits = task_splits(task, 0, config.num_train, None if config.num_dev < 0 else config.num_dev, config.num_test)
        model, tokenizer = load_model(config.model, dtype=config.dtype), load_tokenizer(config.model)
        texts = [e.prompt + e.continuations[e.label] for e in splits.train[:64]]
        probe = find_dominant_layer(model, tokenizer, texts).to_json()
        atomic_write_json(probe_file, probe)
        del model
    probe_layer = probe["dominant_layer"]
    runs = _sweep_runs(config, len(probe["layers"]), probe_layer)
    entries = []
    for name, overrides in tqdm(runs, desc="sweep", disable=False):
        run_dir = out / "runs" / name
        results_file = run_dir / "results.json"
        if not results_file.exists():
            train_config = TrainConfig(
                model=config.model, task=config.task, data_dir=config.data_dir, out=str(run_dir),
                steps=config.steps, batch_size=config.batch_size, eps=config.eps, seed=config.seed,
                num_train=config.num_train, num_dev=config.num_dev, num_test=config.num_test,
                eval_every=config.eval_every, dtype=config.dtype, quiet=config.quiet, **overrides)
            if (run_dir / "run.json").exists():
                train_config.resume = str(run_dir)  # an interrupted sweep continues where it stopped
            train(train_config)
        results = json.loads(results_file.read_text())
        entries.append({"name": name, "scope": overrides["scope"], "optimizer": overrides.get("optimizer", "zo"),
                        "layer": int(name[5:]) if name.startswith("layer") else None, "lr": overrides["lr"],
                        "test_metric": results["test_value"], "metric": results["test_metric"],
                        "dev_loss_start": results["dev_loss_start"], "dev_loss_end": results["dev_loss_best"],
                        "steps": results["steps"], "seconds": results["train_seconds"],
                        "seconds_per_step": results["seconds_per_step"]})
        summary = {"model": config.model, "task": config.task, "probe_layer": probe_layer, "config": asdict(config),
                   "runs": entries}
        atomic_write_json(out / "sweep.json", summary)  # saved as each run finishes
    summary["verdict"] = sweep_verdict(summary)
    atomic_write_json(out / "sweep.json", summary)
    plot_sweep(summary, out / "sweep.png")
    print(format_sweep(summary))
    print(summary["verdict"])
    return summary


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
    return "; ".join(parts)


def format_sweep(summary: dict) -> str:
    lines = [f"{'run':>8}  {'lr':>8}  {'test':>7}  {'dev start':>9}  {'dev best':>9}  {'drop':>8}  {'s/step':>7}"]
    for e in summary["runs"]:
        mark = "  <= probe" if e["layer"] is not None and e["layer"] == summary["probe_layer"] else ""
        lines.append(f"{e['name']:>8}  {e['lr']:8.1e}  {e['test_metric']:7.4f}  {e['dev_loss_start']:9.4f}  "
                     f"{e['dev_loss_end']:9.4f}  {e['dev_loss_start'] - e['dev_loss_end']:8.4f}  "
                     f"{e['seconds_per_step']:7.3f}{mark}")
    return "\n".join(lines)


def plot_sweep(summary: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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


# --------------------------------------------------------------------------------------------- sensitivity


@dataclass
class SensitivityConfig:
    model: str = option("", "model (hub id, folder, .gguf, short name)")
    task: str = option("sst2", "task whose training batches are used")
    data_dir: str = same_as(TrainConfig, "data_dir")
    out: str = option("out/sensitivity", "folder for sensitivity.json, sensitivity.png, propagation.png")
    seeds: int = option(3, "directions per layer")
    batches: int = option(2, "training batches per direction")
    batch_size: int = same_as(TrainConfig, "batch_size")
    eps: float = same_as(TrainConfig, "eps")
    dtype: str = same_as(TrainConfig, "dtype")


def sensitivity(config: SensitivityConfig) -> dict:
    """Inference only: per-layer |L(θ+εz_l) - L(θ-εz_l)|/2ε, and how a layer's perturbation propagates."""
    from pathlib import Path

    from dlzo.checkpoint import atomic_write_json
    from dlzo.models import load_model, load_tokenizer
    from dlzo.scoring import encode
    from dlzo.tasks import load_task

    model, tokenizer = load_model(config.model, dtype=config.dtype), load_tokenizer(config.model)
    train_examples = load_task(config.task, config.data_dir).splits(seed=0).train
    device = next(model.parameters()).device
    batches = leading_batches(model, tokenizer, train_examples, config.batch_size, config.batches, device)
    num_layers = len(decoder_layers(model))
    with tqdm(total=num_layers, desc="sensitivity") as bar:
        per_layer = layer_sensitivity(model, batches, config.eps, config.seeds, progress=bar)
    matrix = propagation(model, encode(tokenizer, train_examples[: config.batch_size]).to(device), config.eps)
    data = {"model": config.model, "task": config.task, "eps": config.eps, "seeds": config.seeds,
            "batches": config.batches,
            "layers": [{"layer": s.layer, "mean": s.mean, "std": s.std, "values": s.values} for s in per_layer],
            "most_sensitive_layer": max(per_layer, key=lambda s: s.mean).layer,
            "propagation": matrix}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sensitivity.json", data)
    plot_sensitivity(data, out / "sensitivity.png", out / "propagation.png")
    for s in per_layer:
        print(f"layer {s.layer:>3}: |L+ - L-|/2eps mean {s.mean:9.4g}  std {s.std:9.4g}")
    print(f"most sensitive layer: {data['most_sensitive_layer']}; wrote {out / 'sensitivity.json'}")
    return data


def plot_sensitivity(data: dict, bars_path, heatmap_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


# --------------------------------------------------------------------------------------------- report


def _find_runs(folder) -> list:
    return sorted(p.parent for p in folder.rglob("results.json"))


def plot_loss_curves(runs: list, path) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        points = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"dev_loss"' in line]
        if points:
            ax.plot([p["step"] for p in points], [p["dev_loss"] for p in points], "o-", ms=3, label=run.name)
    ax.set_xlabel("step")
    ax.set_ylabel("dev loss")
    ax.set_title("Dev loss during training")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(folders: list[str], out: str) -> str:
    """Markdown with the tables and pictures found in the given output folders."""
    import json
    import os
    import shutil
    from pathlib import Path

    from dlzo.checkpoint import atomic_write_text

    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    pictures = target.parent / (target.stem + "_files")
    pictures.mkdir(exist_ok=True)

    def picture(source: Path, caption: str) -> str:
        copy = pictures / f"{source.parent.name}-{source.name}"
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
        sweep_file = folder / "sweep.json"
        if sweep_file.exists():
            data = json.loads(sweep_file.read_text())
            lines += ["**Layer sweep**", "", "```", format_sweep(data), "```", "",
                      f"Verdict: {data.get('verdict') or sweep_verdict(data)}", ""]
            if (folder / "sweep.png").exists():
                lines.append(picture(folder / "sweep.png", "sweep"))
        runs = _find_runs(folder)
        if runs:
            lines += ["**Runs**", "", "| run | scope | optimizer | steps | test | dev loss start -> best | s/step |",
                      "|---|---|---|---|---|---|---|"]
            for run in runs:
                r = json.loads((run / "results.json").read_text())
                test = f"{r['test_metric']} {r['test_value']:.4f}" if r["test_value"] is not None else "-"
                lines.append(f"| {run.name} | {r['scope']} | {r['optimizer']} | {r['steps']} | {test} | "
                             f"{r['dev_loss_start']:.4f} -> {r['dev_loss_best']:.4f} | {r['seconds_per_step']} |")
            lines.append("")
            all_runs += runs
        evals = sorted(folder.rglob("eval.json"))
        for file in evals:
            e = json.loads(file.read_text())
            lines.append(f"- eval {file.parent.name}: {e['task']} {e['metric']} {e['value']:.4f} on "
                         f"{e['num_examples']} examples ({e.get('icl', 0)}-shot)")
        if evals:
            lines.append("")
    if all_runs:
        plot_loss_curves(all_runs, pictures / "loss_curves.png")
        lines += ["## Loss curves", "", f"![loss curves]({os.path.relpath(pictures / 'loss_curves.png', target.parent)})", ""]
    text = "\n".join(lines)
    atomic_write_text(target, text)
    return text
