"""Choosing and measuring layers: which decoder layer to tune, and how strongly each one moves the loss.

- `choose_dominant_layer`: the probe's layer (massive activations, dlzo.model.probe); when the probe finds none,
  the most perturbation-sensitive layer of a quick measurement (`QUICK_SENSITIVITY`).
- `layer_sensitivity`: per-layer |L(θ+εz_l) - L(θ-εz_l)| / 2ε, inference only.
- `propagation`: how far a one-layer perturbation travels through the later layers.
- `layer_parameters`: the named tensors of one decoder layer.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dlzo.data.examples import Example
from dlzo.engine.fastpath import BranchedForward
from dlzo.engine.scoring import EncodedBatch, encode, fast_layout, hidden_states
from dlzo.engine.zo import ZOOptimizer
from dlzo.model.loading import decoder_layers
from dlzo.model.probe import find_dominant_layer

# The quick measurement behind --scope dominant's fallback (the demo shows the same one, so that its
# picture and the trained layer agree): 2 directions x the first 2 training batches of 16.
QUICK_SENSITIVITY = {"seeds": 2, "batches": 2, "batch_size": 16}


@dataclass
class LayerSensitivity:
    layer: int
    mean: float  # mean over seeds and batches of |L(θ+εz_l) - L(θ-εz_l)| / 2ε
    std: float
    values: list[float]


def layer_parameters(model: nn.Module, layer: int) -> list[tuple[str, nn.Parameter]]:
    block_params = {id(p) for p in decoder_layers(model)[layer].parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in block_params]


def leading_batches(model: nn.Module, tokenizer, examples: list, batch_size: int, count: int,
                    device: torch.device | None = None, skip: int = 0) -> list[EncodedBatch]:
    """`count` batches of `examples` after the first `skip` ones, encoded as the trainer's fast path does
    (fewer when the examples run out: a small file of your own may not fill two batches)."""
    device = device or next(model.parameters()).device
    layout = fast_layout(model, tokenizer)
    return [encode(tokenizer, examples[i * batch_size : (i + 1) * batch_size], layout=layout).to(device)
            for i in range(skip, skip + count) if i * batch_size < len(examples)]


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batches: list, eps: float = 1e-3, seeds: int = 3,
                      layers: list[int] | None = None, progress=None, first_seed: int = 0,
                      distribution: str = "gaussian", pair_loss: Callable | None = None) -> list[LayerSensitivity]:
    """Inference only: for each layer, perturb it alone along `seeds` directions (seeds first_seed, ...) on
    each batch. `pair_loss(runner, batch, plus, minus, cache)` gives (L+, L-) of one batch; by default dlzo's
    task loss of an EncodedBatch (`BranchedForward.loss_pair`); dlzo.training.hf_trainer passes the model's own loss."""
    pair_loss = pair_loss or (lambda runner, batch, plus, minus, cache:
                              runner.loss_pair(batch, plus, minus, prefix_cache=cache))
    chosen = range(len(decoder_layers(model))) if layers is None else layers
    results = []
    # the unperturbed layers below layer l give the same hidden states for every l, seed and branch:
    # computing them once per batch makes the measurement about a third cheaper on a 30-layer model
    prefix_caches = [{} for _ in batches]
    for layer in chosen:
        named = layer_parameters(model, layer)
        runner = BranchedForward(model, [n for n, _ in named])
        probe = ZOOptimizer(named, lr=0.0, eps=eps, seed=10_000 + layer, distribution=distribution)
        values = []
        for seed in range(first_seed, first_seed + seeds):
            plus, minus, _ = probe.perturbed(seed)
            for batch, cache in zip(batches, prefix_caches):
                loss_plus, loss_minus = pair_loss(runner, batch, plus, minus, cache)
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
        probe.add_noise(seed, eps)
        try:
            perturbed = outputs()
        finally:
            for (_, p), original in zip(named, saved):
                p.data.copy_(original)
        matrix.append([float((a - b).norm() / b.norm().clamp_min(1e-12)) if j >= layer else 0.0
                       for j, (a, b) in enumerate(zip(perturbed, clean))])
    return matrix


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rho of two per-layer measurements (average ranks for ties): 1 when they order the
    layers the same way, about 0 when one says nothing about the other."""
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    norm = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / norm if norm else 0.0


def probed_layer(model: nn.Module, tokenizer, texts: list[str] | None = None,
                 rule: str = "sun") -> tuple[int | None, str]:
    """(the probe's layer by `rule`, why) or (None, why not): the first step of choosing the dominant layer,
    shared by `dlzo train` and `dlzo.ZOTrainer`."""
    if tokenizer is None:
        return None, "no tokenizer for the probe"
    result = find_dominant_layer(model, tokenizer, texts, rule=rule)
    if result.dominant_layer is None:
        return None, f"probe found no massive activations (its closest layer was {result.closest_layer.index})"
    if rule == "sun":  # the wording of earlier runs' run.json, kept
        s = result.layers[result.dominant_layer]
        return result.dominant_layer, (f"probe: first layer with massive activations "
                                       f"(max|h| {s.max_abs:.3g}, {s.ratio:.3g}x the median)")
    return result.dominant_layer, f"probe, {rule} rule: {result.reason}"


def choose_dominant_layer(model: nn.Module, tokenizer, train: list[Example], eps: float,
                          device: torch.device | None = None, rule: str = "sun") -> tuple[int, str]:
    """The probe's layer by `rule` (sun or onset, dlzo.model.probe); when the rule finds none, the most
    perturbation-sensitive layer of a quick measurement."""
    layer, why = probed_layer(model, tokenizer, [e.prompt + e.continuations[e.label] for e in train[:64]], rule)
    if layer is not None:
        return layer, why
    batches = leading_batches(model, tokenizer, train, QUICK_SENSITIVITY["batch_size"], QUICK_SENSITIVITY["batches"],
                              device)
    sensitivity = layer_sensitivity(model, batches, eps=eps, seeds=QUICK_SENSITIVITY["seeds"])
    best = max(sensitivity, key=lambda s: s.mean)
    return best.layer, ("probe found no massive activations; fell back to the most perturbation-sensitive layer "
                        f"(mean |L+ - L-|/2eps = {best.mean:.3g}, layers: "
                        + ", ".join(f"{s.layer}:{s.mean:.3g}" for s in sensitivity) + ")")
