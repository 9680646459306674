"""The paper's analyses: per-layer perturbation sensitivity and how a layer's perturbation propagates."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

from dlzo.fastpath import BranchedForward
from dlzo.models import decoder_layers
from dlzo.scoring import EncodedBatch, hidden_states
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


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batches: list[EncodedBatch], eps: float = 1e-3, seeds: int = 3,
                      layers: list[int] | None = None, progress=None) -> list[LayerSensitivity]:
    """Inference only: for each layer, perturb it alone along `seeds` directions on each batch."""
    chosen = range(len(decoder_layers(model))) if layers is None else layers
    results = []
    for layer in chosen:
        named = layer_parameters(model, layer)
        runner = BranchedForward(model, [n for n, _ in named])
        probe = ZOOptimizer(named, lr=0.0, eps=eps, seed=10_000 + layer)
        values = []
        for seed in range(seeds):
            zs = [probe.sample(seed, i, p) for i, (_, p) in enumerate(named)]
            plus = {n: p.detach() + eps * z for (n, p), z in zip(named, zs)}
            minus = {n: p.detach() - eps * z for (n, p), z in zip(named, zs)}
            for batch in batches:
                loss_plus, loss_minus = runner.loss_pair(batch, plus, minus)
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
