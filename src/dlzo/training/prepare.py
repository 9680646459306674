"""A model ready to tune: load it, choose the dominant layer when the scope asks for one, add LoRA adapters,
and resolve the scope to its tensors, with float32 masters in place of half-precision ones (dlzo.engine.master).
Training, replay, resume, export and eval of a run all build their model here, so they see the same tensors in
the same order."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dlzo.data.examples import Example
from dlzo.engine.layer_choice import choose_dominant_layer
from dlzo.engine.master import HALF, MasterWeights, install_masters, round_trip_drift
from dlzo.engine.scope import Scope, add_lora, parse_scope, select
from dlzo.engine.zo import ZOOptimizer
from dlzo.errors import DlzoError
from dlzo.fields import comma_list
from dlzo.model.loading import load_model, load_tokenizer
from dlzo.model.quantize import is_quantized, logical_parameters, quantized_holding
from dlzo.model.quantized_load import load_quantized, release_weights, reload_float
from dlzo.training.config import TrainConfig


@dataclass
class Prepared:
    config: TrainConfig
    model: nn.Module
    tokenizer: object
    scope: Scope
    layer_choice: dict  # {"layer": K, "reason": "..."} for the dominant scopes, else {}
    masters: MasterWeights | None = None  # float32 masters of the tuned tensors of a half-precision model


def prepare_model(config: TrainConfig, train_examples: list[Example], layer_choice: dict | None = None,
                  dev_examples: list[Example] | None = None, generation: bool = False) -> Prepared:
    """Load the model and resolve the scope; a resumed or replayed run reuses its recorded dominant layer.
    `dev_examples` and `generation`: what `--rule screen` compares its candidate layers on."""
    if config.quantize != "none":  # the frozen linears quantized as they are read (dlzo.model.quantized_load)
        model = load_quantized(config.model, config.quantize, dtype=config.dtype, device=config.device,
                               trust_remote_code=config.trust_remote_code)
    else:
        model = load_model(config.model, dtype=config.dtype, device=config.device,
                           trust_remote_code=config.trust_remote_code, device_map=config.device_map or None)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code,
                               convert_gguf=config.quantize == "none")
    spec = parse_scope(config.scope)
    layers = spec.layers
    choice = dict(layer_choice or {})
    if spec.needs_dominant_layer:
        if "layer" not in choice:
            started = time.perf_counter()  # the choice is inference on training texts: a race counts it
            choice = choose_dominant_layer(model, tokenizer, train_examples, config.eps, rule=config.rule,
                                           dev=dev_examples, lr=config.lr, seed=config.seed,
                                           distribution=config.distribution, generation=generation,
                                           max_length=config.max_length)
            choice["seconds"] = round(time.perf_counter() - started, 3)
        layers = [choice["layer"]]
    if spec.uses_lora:
        torch.manual_seed(config.seed)  # LoRA's A is random: replay and resume must rebuild the same adapters
        targets = comma_list(config.lora_targets) or None
        model = add_lora(model, layers if spec.kind == "dominant-lora" else None, config.lora_r, config.lora_alpha,
                         targets)
    scope = select(model, spec, layers, config.params)
    if config.quantize != "none":
        scope = tuned_in_float(model, scope, lambda: select(model, spec, layers, config.params))
    masters = install_masters(model, scope.names, config.master_weights, spec.kind)
    return Prepared(config, model, tokenizer, scope, choice, masters)


def tuned_in_float(model: nn.Module, scope: Scope, reselect: Callable[[], Scope]) -> Scope:
    """--quantize: the quantized layers holding tuned tensors read back from the checkpoint in the working dtype
    (every linear was quantized at load, before the layer was chosen) and the scope resolved again on them;
    its parameter count is the model's unpacked one."""
    layers = quantized_holding(model, scope.names)
    reload_float(model, layers)
    release_weights(model)
    if layers:
        scope = reselect()
    if not any(is_quantized(module) for module in model.modules()):
        raise DlzoError(f"--quantize: --scope {scope.description} tunes every linear layer, none is left frozen "
                        f"to quantize")
    scope.total = logical_parameters(model)
    return scope


def make_zo_optimizer(prepared: Prepared, exact_restore: bool = True) -> ZOOptimizer:
    """The run's ZOOptimizer over its tuned tensors (training, replay and resume build it here alike)."""
    config, scope = prepared.config, prepared.scope
    return ZOOptimizer(list(tuned_tensors(prepared.model, scope).items()), lr=config.lr, eps=config.eps, q=config.q,
                       weight_decay=config.weight_decay, seed=config.seed, distribution=config.distribution,
                       exact_restore=exact_restore, layer_groups=scope.layer_groups,
                       sampled_layers=scope.sampled_layers, update_rule=config.zo_update, beta1=config.beta1,
                       beta2=config.beta2, estimator=config.estimator,
                       hessian_smooth=config.hessian_smooth, rank=config.lowrank_rank,
                       lazy_steps=config.lowrank_lazy, mask_fraction=config.zo_mask,
                       working_dtypes=prepared.masters.working if prepared.masters else None)


def tuned_tensors(model: nn.Module, scope: Scope) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name] for name in scope.names}


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors (by parameter name) into the model's own parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def half_precision_warning(masters: MasterWeights | None, zo: ZOOptimizer, round_trip: bool, step: int) -> str | None:
    """The one-time warning of a run whose tuned tensors are half precision without float32 masters (the full
    scope, unless --master-weights on): updates below half a unit in the last place are rounded away and, in
    place (MeZO's +εz, -2εz, +εz), the weights do not come back; that drift is measured on step `step`'s first
    direction, with the same arithmetic, on a copy of one tensor at a time."""
    half = sorted({str(p.dtype).removeprefix("torch.") for _, p in zo.named if p.dtype in HALF})
    if masters or not half:
        return None
    text = (f"warning: the tuned tensors are {'/'.join(half)} without float32 masters: an update smaller than half "
            f"a unit in the last place of a weight is rounded away (at lr 1e-6, nearly all of them)")
    if round_trip:
        seed = zo.seeds_for_step(step)[0]
        drift, moved = round_trip_drift(zo.named, lambda index, like: zo.sample(seed, index, like), zo.eps)
        text += (f"; MeZO's in-place restore does not return the weights it started from: after step {step}'s "
                 f"+εz, -2εz, +εz they are off by up to {drift:.3g} ({100 * moved:.1f}% of the elements moved)")
    return text + ("; --master-weights on keeps a float32 master of every tuned tensor (+2 bytes a parameter)")
