"""A model ready to tune: load it, choose the dominant layer when the scope asks for one, add LoRA adapters,
and resolve the scope to its tensors. Training, replay, resume, export and eval of a run all build their
model here, so they see the same tensors in the same order."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from dlzo.data.examples import Example
from dlzo.engine.layer_choice import choose_dominant_layer
from dlzo.engine.scope import Scope, add_lora, parse_scope, select
from dlzo.engine.zo import ZOOptimizer
from dlzo.model.loading import load_model, load_tokenizer
from dlzo.training.config import TrainConfig


@dataclass
class Prepared:
    config: TrainConfig
    model: nn.Module
    tokenizer: object
    scope: Scope
    layer_choice: dict  # {"layer": K, "reason": "..."} for the dominant scopes, else {}


def prepare_model(config: TrainConfig, train_examples: list[Example], layer_choice: dict | None = None) -> Prepared:
    """Load the model and resolve the scope; a resumed or replayed run reuses its recorded dominant layer."""
    model = load_model(config.model, dtype=config.dtype, device=config.device,
                       trust_remote_code=config.trust_remote_code, device_map=config.device_map or None)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    spec = parse_scope(config.scope)
    layers = spec.layers
    choice = dict(layer_choice or {})
    if spec.needs_dominant_layer:
        if "layer" not in choice:
            started = time.perf_counter()  # the choice is inference on training texts: a race counts it
            layer, reason = choose_dominant_layer(model, tokenizer, train_examples, config.eps, rule=config.rule)
            choice = {"layer": layer, "reason": reason, "seconds": round(time.perf_counter() - started, 3)}
        layers = [choice["layer"]]
    if spec.uses_lora:
        torch.manual_seed(config.seed)  # LoRA's A is random: replay and resume must rebuild the same adapters
        targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()] or None
        model = add_lora(model, layers if spec.kind == "dominant-lora" else None, config.lora_r, config.lora_alpha,
                         targets)
    scope = select(model, spec, layers, config.params)
    return Prepared(config, model, tokenizer, scope, choice)


def make_zo_optimizer(prepared: Prepared, exact_restore: bool = True) -> ZOOptimizer:
    """The run's ZOOptimizer over its tuned tensors (training, replay and resume build it here alike)."""
    config, scope = prepared.config, prepared.scope
    return ZOOptimizer(list(tuned_tensors(prepared.model, scope).items()), lr=config.lr, eps=config.eps, q=config.q,
                       weight_decay=config.weight_decay, seed=config.seed, distribution=config.distribution,
                       exact_restore=exact_restore, layer_groups=scope.layer_groups,
                       sampled_layers=scope.sampled_layers, update_rule=config.zo_update, beta1=config.beta1,
                       beta2=config.beta2, estimator=config.estimator,
                       hessian_smooth=config.hessian_smooth)


def tuned_tensors(model: nn.Module, scope: Scope) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name] for name in scope.names}


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors (by parameter name) into the model's own parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
