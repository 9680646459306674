"""`dlzo plan`: will it fit? The predicted peak memory of inference, a layer-scope ZO step, full MeZO and AdamW
for a model's config alone (dlzo.model.memory_plan), against this machine's RAM and the visible GPU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import psutil
import torch

from dlzo.engine.master import MasterPolicy
from dlzo.engine.scope import parse_scope
from dlzo.errors import DlzoError
from dlzo.fields import at_least_one, check_choices, option, same_as
from dlzo.model.loading import resolve_dtype
from dlzo.model.memory_plan import PlanInputs, plan, total
from dlzo.model.quantize import Quantize
from dlzo.model.shape import ModelShape, model_shape, read_config
from dlzo.studies.bench import SHAPES, shape_config
from dlzo.training.config import ModelOptions, TrainConfig

CUDA_CONTEXT_BYTES = 2**30  # what the CUDA context and kernels take on a GPU beside the allocator's tensors
ROWS = {
    "inference": "inference (a forward, full-vocabulary logits)",
    "zo_step": "ZO step of the scope (prefix cached)",
    "full_mezo": "full MeZO step",
    "adamw": "AdamW, every tensor",
    "adamw_layer": "AdamW, the scope's layers",
    "adamw_layer_checkpointed": "AdamW, the scope, --gradient-checkpointing",
}


@dataclass
class PlanConfig(ModelOptions):
    model: str = option("", "hub id, folder with config.json, .gguf file or short name: only its config is read "
                            "(no weights)")
    shape: str = option("", f"instead of --model, one of dlzo bench's random-init shapes: {', '.join(SHAPES)}")
    quantize: Quantize = same_as(TrainConfig, "quantize")
    scope: str = option("dominant", "full | dominant | layer:K | layers:K1,K2 (dominant: the layer of --layer)")
    layer: int = option(-1, "the tuned layer of --scope dominant (its choice needs the weights: dlzo probe); "
                            "default 1")
    batch_size: int = same_as(TrainConfig, "batch_size")
    max_length: int = option(64, "tokens of every sequence (rows padded to it; dlzo bench's --seq)")
    cached_sequences: int = option(0, "sequences whose frozen-prefix output the cache holds (dlzo train: every "
                                      "train and dev sequence, up to --prefix-cache-mb); 0: one batch, as dlzo "
                                      "bench's layer_cached")
    master_weights: MasterPolicy = same_as(TrainConfig, "master_weights")
    json: bool = option(False, "print one JSON object (bytes) instead of the table")

    def validate(self) -> None:
        self.validate_model_options()
        if bool(self.model) == bool(self.shape):
            raise DlzoError("dlzo plan needs one of --model or --shape")
        if self.shape and self.shape not in SHAPES:
            raise DlzoError(f"--shape {self.shape!r} is not one of {', '.join(SHAPES)}")
        check_choices(self)
        at_least_one(self, "batch_size", "max_length")
        if self.cached_sequences < 0:
            raise DlzoError(f"--cached-sequences must not be negative, not {self.cached_sequences}")
        spec = parse_scope(self.scope)
        if spec.kind not in ("full", "dominant", "layers"):
            raise DlzoError(f"--scope {self.scope}: dlzo plan predicts full, dominant, layer:K and layers:K1,K2")


def tuned_layers(config: PlanConfig, shape: ModelShape) -> tuple[tuple[int, ...], str]:
    """The scope's decoder layers (() for full) and what to say about them."""
    spec = parse_scope(config.scope)
    count = len(shape.layers)
    if spec.kind == "full":
        return (), "full scope: every tensor tuned, nothing quantized"
    if spec.kind == "dominant":
        layers = [config.layer if config.layer >= 0 else 1]
    else:
        layers = spec.layers
    for layer in layers:
        if not 0 <= layer < count:
            raise DlzoError(f"--layer/--scope: layer {layer} is outside {shape.name}'s layers 0..{count - 1}")
    if spec.kind == "dominant" and config.layer < 0:
        return (1,), "dominant: predicted for layer 1; the probe picks the layer from the weights (pass --layer K)"
    if spec.kind == "dominant":
        return tuple(layers), f"dominant: layer {layers[0]} (--layer)"
    return tuple(layers), f"tuned layers {', '.join(map(str, layers))}"


def capacity() -> dict[str, int | None]:
    """This machine's RAM and the first visible GPU's memory (None without one), in bytes."""
    gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    return {"ram": psutil.virtual_memory().total, "gpu": gpu}


def plan_device(device: str) -> str:
    """cpu or cuda: what the figures are for. A GPU need not be here to plan for one (--device cuda)."""
    kind = device.split(":")[0]
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind not in ("cpu", "cuda"):
        raise DlzoError(f"--device {device}: dlzo plan predicts for cpu or cuda")
    return kind


def predict(config: PlanConfig, baseline: int) -> dict:
    """Everything `dlzo plan` prints, as one dict of bytes: the figures for --device at the top level, both
    devices' under "cpu" and "cuda", and whether each fits this machine's RAM and its first GPU."""
    config.validate()
    name = config.model or f"random-init {config.shape}"
    hf_config = read_config(config.model, config.trust_remote_code) if config.model else shape_config(config.shape)
    shape = model_shape(hf_config, name, config.trust_remote_code)
    layers, scope_note = tuned_layers(config, shape)
    device = plan_device(config.device)
    dtype = resolve_dtype(config.dtype, torch.device(device))
    inputs = PlanInputs(dtype_bytes=torch.finfo(dtype).bits // 8, quantize=config.quantize, tuned_layers=layers,
                        batch_size=config.batch_size, max_length=config.max_length,
                        cached_sequences=config.cached_sequences or config.batch_size,
                        master_weights=config.master_weights, device=device, baseline_bytes=baseline)
    on_cpu = plan(shape, replace(inputs, device="cpu"))
    on_gpu = plan(shape, replace(inputs, device="cuda", baseline_bytes=0))
    parts = on_cpu if device == "cpu" else on_gpu
    room = capacity()
    fits = {key: {"ram": total(on_cpu[key]) <= room["ram"],
                  "gpu": None if room["gpu"] is None else total(on_gpu[key]) + CUDA_CONTEXT_BYTES <= room["gpu"]}
            for key in parts}
    return {"model": name, "parameters": shape.parameters, "layers": len(shape.layers),
            "dtype": str(dtype).removeprefix("torch."), "device": device, "inputs": asdict(inputs),
            **{key: total(value) for key, value in parts.items()},
            "cpu": {key: total(value) for key, value in on_cpu.items()},
            "cuda": {key: total(value) for key, value in on_gpu.items()},
            "parts": parts, "fits": fits, "capacity": room, "scope": scope_note}


def _size(count: int | None) -> str:
    return "-" if count is None else f"{count / 2**30:.2f} GiB"


def plan_command(config: PlanConfig) -> dict:
    """Print the plan (a table, or JSON with --json) and return it."""
    baseline = psutil.Process().memory_info().rss  # before any config is read: Python, torch, transformers, dlzo
    result = predict(config, baseline)
    if config.json:
        print(json.dumps(result, indent=1))
        return result
    inputs, room = result["inputs"], result["capacity"]
    print(f"{result['model']}: {result['parameters'] / 1e6:,.1f}M parameters, {result['layers']} layers; "
          f"{result['dtype']}, --quantize {inputs['quantize']}, --master-weights {inputs['master_weights']}; "
          f"{result['scope']}; batch {inputs['batch_size']} x {inputs['max_length']} tokens")
    print(f"{'predicted peak':46} {'CPU (RSS)':>10} {'GPU':>10}  {'fits RAM':>8} {'fits GPU':>8}")
    for key, label in ROWS.items():
        fit = result["fits"][key]
        gpu = "-" if fit["gpu"] is None else ("yes" if fit["gpu"] else "no")
        print(f"{label:46} {_size(result['cpu'][key]):>10} {_size(result['cuda'][key]):>10}  "
              f"{'yes' if fit['ram'] else 'no':>8} {gpu:>8}")
    print(f"CPU: this process's {_size(inputs['baseline_bytes'])} before any tensor (Python, torch, transformers, "
          f"dlzo) included, as dlzo bench's resident-memory peak includes it; RAM {_size(room['ram'])}. GPU: "
          f"torch.cuda.max_memory_allocated's count (tensors only); a fit adds {_size(CUDA_CONTEXT_BYTES)} for "
          f"the CUDA context to it; GPU memory {_size(room['gpu'])}")
    if inputs["quantize"] != "none":
        print(f"--quantize {inputs['quantize']}: the full-scope rows quantize nothing (every weight is tuned)")
    return result
