"""`dlzo demo` (what `make demo` runs): the paper's pipeline on the sample assets in a few minutes.

probe -> perturbation sensitivity -> zero-shot -> dominant-layer ZO vs full MeZO on SST-2 -> report.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from dlzo.data.benchmarks import load_task, task_splits
from dlzo.engine.layer_choice import QUICK_SENSITIVITY
from dlzo.evaluation.evaluate import evaluate
from dlzo.model.checkpoint import atomic_write_json
from dlzo.model.loading import SHORT_NAMES, load_model, load_tokenizer
from dlzo.model.probe import find_dominant_layer, format_table
from dlzo.studies.options import DemoConfig, SensitivityConfig
from dlzo.studies.plots import save_outputs
from dlzo.studies.report import report
from dlzo.studies.sensitivity import sensitivity
from dlzo.training.config import TrainConfig
from dlzo.training.loop import train
from dlzo.training.run_folder import RESUME, REUSE, RunFolder


def train_configs(config: DemoConfig, model_name: str, data_dir: str, out: Path) -> list[tuple[str, TrainConfig]]:
    """The demo's two training runs: dominant-layer ZO and full MeZO, (label, options)."""
    return [(label, TrainConfig(model=model_name, task="sst2", data_dir=str(data_dir), out=str(out / "runs" / label),
                                scope=scope, steps=config.steps, lr=lr, eps=config.eps, num_dev=config.num_dev,
                                num_test=config.num_test, eval_every=max(config.steps // 2, 1)))
            for label, scope, lr in (("dominant", "dominant", config.dominant_lr), ("full", "full", config.full_mezo_lr))]


def demo_assets(config: DemoConfig) -> tuple[str, str]:
    """(model, data dir): the sample assets in --shared when it has them (SmolLM2, else stories260k), otherwise
    --hub-model and SST-2 from the Hugging Face hub, so that a clone outside this project's machines runs too."""
    shared = Path(config.shared)
    if not (shared / "data" / "glue" / "SST-2").exists():
        print(f"no sample assets in {shared}: fetching {config.hub_model} and SST-2 from the Hugging Face hub "
              f"(cached by huggingface_hub; --shared names a folder that has them)")
        return config.hub_model, config.hub_data
    os.environ.setdefault("DLZO_SHARED", str(shared.resolve()))
    model_name = config.model
    if model_name.lower() in SHORT_NAMES and not (shared / SHORT_NAMES[model_name.lower()]).exists():
        print(f"{model_name} is not in {shared}; running the demo on stories260k instead")
        model_name = "stories260k"
    return model_name, str(shared / "data")


def run_demo(config: DemoConfig) -> dict:
    model_name, data_dir = demo_assets(config)
    out = Path(config.out)
    # what to do with each training run is decided before any work: a run kept from an earlier demo is
    # reused only if trained with these options (--steps too), or the headline would be an older run's
    plans = [(label, config_for, RunFolder(config_for.out).decide(config_for, study=True))
             for label, config_for in train_configs(config, model_name, data_dir, out)]
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    print(f"== 1/5 probe: which layer carries the first massive activations? ({model_name})")
    model, tokenizer = load_model(model_name), load_tokenizer(model_name)
    task = load_task("sst2", data_dir)
    splits = task_splits(task, 0, 1000, config.num_dev, config.num_test)
    texts = [e.prompt + e.continuations[e.label] for e in splits.train[:64]]
    result = find_dominant_layer(model, tokenizer, texts)
    print(format_table(result))
    save_outputs(result, out / "probe")

    print("== 2/5 zero-shot SST-2")
    zero_shot = evaluate(model, tokenizer, task, splits.test, 16)
    atomic_write_json(out / "zeroshot" / "eval.json", {**zero_shot.to_json(), "icl": 0})
    print(f"zero-shot accuracy {zero_shot.value:.4f} on {zero_shot.num_examples} examples")
    del model

    print("== 3/5 perturbation sensitivity per layer (inference only)")
    sensitivity(SensitivityConfig(model=model_name, task="sst2", data_dir=str(data_dir), out=str(out / "sensitivity"),
                                  eps=config.eps, **QUICK_SENSITIVITY))

    runs = {}
    for label, train_config, decision in plans:
        print(f"== {4 if label == 'dominant' else 5}/5 train: {label} ZO on SST-2, {config.steps} steps")
        if decision == REUSE:
            print(f"{train_config.out}: finished before with these options, its results reused")
            runs[label] = RunFolder(train_config.out).results()
            continue
        runs[label] = train(replace(train_config, resume=train_config.out if decision == RESUME else ""))

    report(
        [str(out / "probe"), str(out / "sensitivity"), str(out / "zeroshot"), str(out / "runs")],
        str(out / "report.md"),
    )
    dominant, full = runs["dominant"], runs["full"]
    speedup = full["seconds_per_step"] / dominant["seconds_per_step"]
    headline = {
        "model": model_name, "dominant_layer": result.dominant_layer, "trained_layer": dominant["layer"],
        "zero_shot_accuracy": zero_shot.value, "dominant_accuracy": dominant["test_value"],
        "full_mezo_accuracy": full["test_value"], "dominant_seconds_per_step": dominant["seconds_per_step"],
        "full_seconds_per_step": full["seconds_per_step"], "step_speedup": speedup,
        "wall_seconds": round(time.time() - started, 1),
    }
    atomic_write_json(out / "headline.json", headline)
    print("\n== headline")
    print(f"model {model_name}: probe's dominant layer {result.dominant_layer}; tuned layer {dominant['layer']}")
    print(f"SST-2 test accuracy ({config.num_test} examples): zero-shot {zero_shot.value:.3f}, "
          f"dominant-layer ZO {dominant['test_value']:.3f}, full MeZO {full['test_value']:.3f} "
          f"after {config.steps} steps each")
    print(f"step time: dominant-layer {dominant['seconds_per_step']:.2f}s vs full MeZO {full['seconds_per_step']:.2f}s "
          f"({speedup:.1f}x faster)")
    print(f"report: {out / 'report.md'}  (pictures in {out / 'report_files'})")
    return headline
