"""`dlzo sensitivity`: per-layer ZO signal |L(θ+εz_l) - L(θ-εz_l)|/2ε and how a layer's perturbation
propagates, measured by inference only on a task's first training batches (dlzo.engine.layer_choice does the measuring)."""

from __future__ import annotations

import time
from pathlib import Path

from tqdm import tqdm

from dlzo.data.benchmarks import load_task
from dlzo.data.user_data import load_user_data
from dlzo.engine.layer_choice import layer_sensitivity, leading_batches, propagation, rank_correlation
from dlzo.engine.scoring import encode
from dlzo.model.checkpoint import atomic_write_json
from dlzo.model.loading import decoder_layers, load_model, load_tokenizer, resolve_model_source
from dlzo.studies.options import SensitivityConfig
from dlzo.studies.plots import plot_sensitivity


def sensitivity(config: SensitivityConfig) -> dict:
    """Inference only: per-layer |L(θ+εz_l) - L(θ-εz_l)|/2ε, and how a layer's perturbation propagates."""
    config.validate()
    if config.data:  # your own rows, read (with the tokenizer, for chat templates) before the model loads
        config.validate_data_options()
        resolve_model_source(config.model)
        train_examples = load_user_data(config.data, load_tokenizer(config.model), config.data_format,
                                        config.columns).train
    else:
        train_examples = load_task(config.task, config.data_dir).splits(seed=0).train
    model, tokenizer = load_model(config.model, dtype=config.dtype), load_tokenizer(config.model)
    device = next(model.parameters()).device
    batches = leading_batches(model, tokenizer, train_examples, config.batch_size, config.batches, device)
    num_layers = len(decoder_layers(model))
    started = time.time()
    with tqdm(total=num_layers, desc="sensitivity") as bar:
        per_layer = layer_sensitivity(model, batches, config.eps, config.seeds, progress=bar)
    seconds = time.time() - started
    stability = measure_stability(config, model, tokenizer, train_examples, per_layer, seconds) if config.stability else None
    matrix = propagation(model, encode(tokenizer, train_examples[: config.batch_size]).to(device), config.eps)
    data = {"model": config.model, "task": config.data or config.task, "eps": config.eps, "seeds": config.seeds,
            "batches": config.batches,
            "layers": [{"layer": s.layer, "mean": s.mean, "std": s.std, "values": s.values} for s in per_layer],
            "most_sensitive_layer": max(per_layer, key=lambda s: s.mean).layer, "seconds": round(seconds, 1),
            "propagation": matrix, **({"stability": stability} if stability else {})}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sensitivity.json", data)
    plot_sensitivity(data, out / "sensitivity.png", out / "propagation.png")
    for s in per_layer:
        print(f"layer {s.layer:>3}: |L+ - L-|/2eps mean {s.mean:9.4g}  std {s.std:9.4g}")
    print(f"most sensitive layer: {data['most_sensitive_layer']}; wrote {out / 'sensitivity.json'}")
    if stability:
        print(f"a second measurement (directions {config.seeds}.., batches {config.batches}..) ranks the layers with "
              f"Spearman rho {stability['rank_correlation']:.3f}; its most sensitive layer: "
              f"{stability['most_sensitive_layer']}; {stability['seconds']:.0f} s per measurement")
    return data


def measure_stability(config: SensitivityConfig, model, tokenizer, examples: list, first: list,
                      seconds: float) -> dict:
    """The same measurement on disjoint directions and batches, and how alike the two rankings are."""
    batches = leading_batches(model, tokenizer, examples, config.batch_size, config.batches, skip=config.batches)
    with tqdm(total=len(first), desc="sensitivity, second measurement") as bar:
        second = layer_sensitivity(model, batches, config.eps, config.seeds, progress=bar, first_seed=config.seeds)
    return {"rank_correlation": rank_correlation([s.mean for s in first], [s.mean for s in second]),
            "most_sensitive_layer": max(second, key=lambda s: s.mean).layer,
            "second_means": [s.mean for s in second], "seconds": round(seconds, 1)}
