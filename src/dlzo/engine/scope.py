"""Which tensors a run tunes: `--scope` (full, dominant, layer:K, layers:K1,K2, lora, dominant-lora)
narrowed by `--params` (all, mlp, attn, or a regex)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from dlzo.choices import ScopeSpec
from dlzo.choices import parse_scope as parse_scope  # the syntax, read with the tensors it selects
from dlzo.errors import DlzoError
from dlzo.model.loading import decoder_layers, decoder_layers_with_path, num_parameters

# Module-path segments, so that e.g. post_attention_layernorm is neither attention nor MLP.
_ATTENTION = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention)\.")
_MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn|fc1|fc2)\.")


def _param_filter(spec: str):
    if spec == "all":
        return lambda name: True
    if spec == "mlp":
        return lambda name: bool(_MLP.search(name))
    if spec == "attn":
        return lambda name: bool(_ATTENTION.search(name))
    try:
        pattern = re.compile(spec)
    except re.error as err:
        raise DlzoError(f"--params {spec!r} is neither all/mlp/attn nor a valid regex ({err})") from None
    return lambda name: bool(pattern.search(name))


@dataclass
class Scope:
    """The resolved set of tuned tensors."""

    description: str
    names: list[str]
    layers: list[int]  # decoder layers holding tuned tensors (empty when anything lies outside them)
    tuned: int
    total: int
    layer_groups: list[int] = field(default_factory=list)  # lezo: the decoder layer of each tuned tensor
    sampled_layers: int = 0  # lezo: layers perturbed per step

    @property
    def fraction(self) -> float:
        return self.tuned / max(self.total, 1)


def lora_target_modules(model: nn.Module) -> list[str]:
    """q_proj/v_proj where the model has them (Llama, Qwen, Mistral, OPT ...), else peft's default."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if {"q_proj", "v_proj"} <= names:
        return ["q_proj", "v_proj"]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    targets = defaults.get(getattr(model.config, "model_type", ""), None)
    if not targets:
        raise DlzoError(f"no default LoRA target modules for {type(model).__name__}; pass --lora-targets")
    return list(targets)


def add_lora(model: nn.Module, layers: list[int] | None, r: int = 8, alpha: int = 16,
             targets: list[str] | None = None) -> nn.Module:
    """Wrap the model with peft LoRA adapters (dropout 0: a ZO step must see a deterministic loss)."""
    from peft import LoraConfig, get_peft_model

    path, _ = decoder_layers_with_path(model)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets or lora_target_modules(model),
                        layers_to_transform=layers, layers_pattern=path.rsplit(".", 1)[-1] if layers else None)
    return get_peft_model(model, config)


def select(model: nn.Module, spec: ScopeSpec, layers: list[int], params: str = "all") -> Scope:
    """Mark the chosen tensors trainable and return them. `layers` is spec.layers or the dominant layer."""
    keep = _param_filter(params)
    blocks = decoder_layers(model)
    for layer in layers:
        if not 0 <= layer < len(blocks):
            raise DlzoError(f"--scope: layer {layer} does not exist (the model has layers 0..{len(blocks) - 1})")
    layer_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    names = []
    for name, param in model.named_parameters():
        if spec.uses_lora:
            chosen = "lora_" in name
        elif spec.kind == "full":
            chosen = keep(name)
        elif spec.kind == "lezo":  # every decoder layer; each step perturbs K of them (dlzo.engine.zo layer groups)
            chosen = id(param) in layer_of and keep(name)
        else:
            chosen = layer_of.get(id(param)) in layers and keep(name)
        param.requires_grad_(chosen)
        if chosen:
            names.append(name)
    if not names:
        raise DlzoError(f"--scope {spec.kind} with --params {params!r} selects no tensors")
    params_by_name = dict(model.named_parameters())
    tuned_layers = sorted({layer_of.get(id(params_by_name[n]), -1) for n in names})
    if -1 in tuned_layers:
        tuned_layers = []
    tuned = sum(params_by_name[n].numel() for n in names)
    if spec.kind == "lezo" and spec.sampled_layers > len(blocks):
        raise DlzoError(f"--scope lezo:{spec.sampled_layers}: the model has only {len(blocks)} layers")
    label = {"full": "full", "lora": "lora", "lezo": f"lezo:{spec.sampled_layers}"}.get(spec.kind, f"{spec.kind} {layers}")
    groups = [layer_of[id(params_by_name[n])] for n in names] if spec.kind == "lezo" else []
    return Scope(description=label, names=names, layers=tuned_layers, tuned=tuned, total=num_parameters(model),
                 layer_groups=groups, sampled_layers=spec.sampled_layers)
