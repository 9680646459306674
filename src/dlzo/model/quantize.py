"""Quantized frozen layers (`--quantize int8|int4`): every nn.Linear outside the tuned scope holds its weight in
8 or 4 bits through torchao (PyTorch's quantization library; the choice, measured against bitsandbytes and
optimum-quanto: docs/benchmarks.md, "Quantized frozen layers").

Why it pays here: a ZO step only runs forwards and the frozen layers never change, so they are exactly the
weights QLoRA quantizes, without even a backward pass through them. The tuned tensors stay in the working dtype
(with float32 masters in half precision: dlzo.engine.master), so the update and the perturbation are exact.

Both modes are weight-only: the forward multiplies the activations, untouched, by the dequantized weight. That
is what a ZO step needs: the loss stays a smooth function of the tuned tensors, so L(θ+εz) - L(θ-εz) is not
lost in rounding, and a sequence's output does not depend on the other rows of its batch, so the frozen-prefix
cache (computed on other batches) and the fast path's 2B-row forward give the losses of plain forwards.
bitsandbytes' int8 layer (LLM.int8) quantizes the activations too, with outlier columns chosen per batch: on
stories260K the projected gradients of a cached and an uncached run then differed by up to 3x (they agree to
1% in float and with both modes here).

  int8  torchao `Int8WeightOnlyConfig`: one signed byte an element, a float32 scale and an int8 zero point
        per output row (symmetric, round to nearest); CPU and CUDA.
  int4  torchao `NF4Tensor` (QLoRA's NormalFloat4): half a byte an element in blocks of 64, each block's
        absmax quantized again to a byte (a scale per 256 blocks in the working dtype: QLoRA's double
        quantization); pure PyTorch, so CPU and CUDA alike. torchao's packed int4 formats need CUDA (or
        bfloat16 and mslk); on an x86 CPU its int4 (`IntxWeightOnlyConfig`) keeps one value a byte.

What is not quantized, and why:
  - the tuned tensors (they change every step);
  - the output embedding (LM head): most small models tie it to the input embedding (SmolLM2, Qwen2.5-0.5B),
    so a quantized head would be a second copy; and the loss is read from its logits. transformers'
    quantization integrations leave it out by default for the same reason;
  - embeddings, norms and biases (not linear weights).

The quantized values are a function of the float weights alone (round to nearest, no calibration, no random
numbers), so a run, its resume, its replay and `dlzo eval --run` rebuild the very same frozen model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from dlzo.choices import QUANTIZE_HELP, QUANTIZE_MODES, Quantize  # noqa: F401 (re-exported)
from dlzo.errors import DlzoError

INT4_BLOCK = 64  # elements sharing one absmax (QLoRA's default; smaller where a weight needs it: nf4_blocks)
INT4_SCALER_BLOCK = 256  # int4 absmax values sharing one scale (QLoRA's double quantization)
QUANTIZED_AS = {"int8": "int8 (torchao, weight-only per row)", "int4": "4-bit NF4 (torchao)"}
DEVICES = ("cpu", "cuda")  # where both torchao formats run (checked here on CPU; CUDA by tests marked cuda)


# torchao's import logs, on a CPU build of torch, that its CUDA kernels failed to load, and torch warns about the
# enums it registers: a dozen lines, and peft imports torchao at every dlzo start when it is installed. This
# module is imported before peft (dlzo.training.config), so the lines are silenced from the start.
for _logger in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_logger).setLevel(logging.ERROR)


def _torchao():
    import torchao.quantization

    return torchao.quantization


def quantized_bytes(rows: int, inputs: int, mode: str, dtype_bytes: int = 4) -> int:
    """Bytes a `rows x inputs` linear weight takes under `mode` (the layout `dlzo plan` counts; `dtype_bytes`:
    the working dtype's): int8 one byte an element plus a float32 scale and an int8 zero point a row; int4 half
    a byte an element, a byte an absmax block (64 elements), a scale in the working dtype per scaler block (256
    absmax values; both smaller where a weight needs: nf4_blocks) and 17 more (the 16 NF4 levels and a mean);
    none: the working dtype."""
    elements = rows * inputs
    if mode == "int8":
        return elements + 5 * rows
    if mode == "int4":
        block, scaler_block = nf4_blocks(elements)
        blocks = elements // block
        return elements // 2 + blocks + dtype_bytes * (blocks // scaler_block + 17)
    if mode == "none":
        return dtype_bytes * elements
    raise DlzoError(f"--quantize {mode!r} is not one of {', '.join(QUANTIZE_MODES)}")


def _power_of_two_dividing(count: int, at_most: int) -> int:
    size = at_most
    while count % size:
        size //= 2
    return size


def nf4_blocks(elements: int) -> tuple[int, int]:
    """(elements per absmax, absmax values per scale) of a weight of `elements`: QLoRA's 64 and 256, halved
    until they divide the weight (torchao's NF4 needs whole blocks: SmolLM2's k_proj, 192 x 576, has 1,728
    blocks of 64, so its scales cover 64 blocks each)."""
    block = _power_of_two_dividing(elements, INT4_BLOCK)
    return block, _power_of_two_dividing(elements // block, INT4_SCALER_BLOCK)


def check_quantize(mode: str, device: torch.device | str) -> None:
    """A mode this installation can run on `device`: else one line, before any work."""
    if mode not in QUANTIZE_MODES:
        raise DlzoError(f"--quantize {mode!r} is not one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return
    kind = torch.device(device).type
    if kind not in DEVICES:
        raise DlzoError(f"--quantize {mode}: torchao's weight-only {mode} runs on {' and '.join(DEVICES)} here, "
                        f"not --device {device}")
    try:
        _torchao()
    except ImportError as err:
        raise DlzoError(f"--quantize {mode} needs torchao (pip install torchao): {err}") from None


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a linear layer holding a quantized weight."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and type(weight).__module__.startswith("torchao.")


def quantize_linear(linear: nn.Linear, mode: str, device: torch.device | str | None = None) -> nn.Module:
    """A layer computing `linear` with its weight quantized, on `device` (default: the weight's). The float
    weight is not kept."""
    ao = _torchao()
    target = torch.device(device) if device is not None else linear.weight.device
    weight = linear.weight.detach().to(target)
    layer = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    if mode == "int8":
        layer.weight = nn.Parameter(weight, requires_grad=False)
        ao.quantize_(layer, ao.Int8WeightOnlyConfig(set_inductor_config=False))  # no global torch settings
    elif mode == "int4":
        layer.weight = nn.Parameter(ao.to_nf4(weight.contiguous(), *nf4_blocks(weight.numel())), requires_grad=False)
    else:
        raise DlzoError(f"--quantize {mode!r} cannot quantize a layer (int8 or int4)")
    layer.weight.requires_grad_(False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(target), requires_grad=False)
    return layer


def frozen_linears(model: nn.Module, tuned: Iterable[str]) -> list[str]:
    """Names of the nn.Linear modules to quantize: none of their parameters tuned, not the output embedding,
    not quantized already (LoRA's adapters are tuned, their base layers are not)."""
    tuned = set(tuned)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module is head or is_quantized(module):
            continue
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        if not any(p in tuned for p in own):
            names.append(name)
    return names


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_frozen(model: nn.Module, tuned: Iterable[str], mode: str) -> list[str]:
    """Quantize every frozen nn.Linear of `model` in place (`tuned`: the names of the tuned parameters);
    returns the quantized modules' names. Peak memory: the model plus one layer's float weight."""
    if mode == "none":
        return []
    check_quantize(mode, next(model.parameters()).device)
    names = frozen_linears(model, tuned)
    for name in names:
        replace_module(model, name, quantize_linear(model.get_submodule(name), mode))
    return names


def quantized_holding(model: nn.Module, tuned: Iterable[str]) -> list[str]:
    """Names of the quantized modules holding a parameter named in `tuned` (to be read back in float)."""
    tuned = set(tuned)
    return [name for name, module in model.named_modules() if is_quantized(module)
            and any(f"{name}.{p}" in tuned for p, _ in module.named_parameters())]


def logical_parameters(model: nn.Module) -> int:
    """The model's parameter count, each tensor once (torchao's quantized weights keep their logical shape)."""
    return sum(p.numel() for p in model.parameters())


def dequantized_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight a layer computes with, in `dtype` (for tests and measurements)."""
    weight = module.weight.detach()
    if is_quantized(module):
        weight = weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight.dequantize()
    return weight.to(dtype)


def weight_bytes(module: nn.Module) -> int:
    """Bytes a layer's weight takes in memory, every part of a quantized one included."""
    return tensor_bytes(module.weight)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor, or of the plain tensors a torchao tensor is made of."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()
