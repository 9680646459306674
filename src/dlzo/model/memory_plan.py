"""Predicted peak memory of dlzo's steps from a model's shape alone (`dlzo plan`): nothing is loaded or run.

Each prediction is a sum of named parts (bytes), so a table can show where the memory goes and a test can add
the same parts by hand:

  weights      every tensor in the dtype it is held in: the working dtype; under --quantize each frozen
               nn.Linear but the LM head in torchao's layout (dlzo.model.quantize.quantized_bytes; the head and
               the embeddings stay in the working dtype); a float32 master of each tuned tensor with masters
  baseline     the process before any tensor (Python, torch, transformers, dlzo): on a CPU the resident memory a
               measurement (RSS) includes; on a GPU the allocator's peak leaves it out (0)
  cache        the frozen prefix: the hidden states the tuned layer receives, for every cached sequence
  perturb      the ZO step's perturbed tensors: z, θ+εz, θ-εz of the tuned layer in the working dtype, or with
               masters only one tensor's float32 z and its cast at a time (dlzo.engine.master)
  activations  what the forward (or forward and backward) holds at its peak, from per-token sizes below
  dequant      under --quantize, the largest frozen linear dequantized by its forward (torchao's weight-only
               layers multiply by the whole weight dequantized)
  grads/state  AdamW: a gradient and two moments per tuned element, in the tuned tensors' dtype (the gradients
               appear as the backward frees the saved activations: `activations` is what the backward's start
               holds beyond them, or the step's temporaries)
  overhead     what the allocator holds beyond live tensors: on a CPU the runtime a first forward adds and the
               freed blocks glibc keeps (calibrated against `dlzo bench`, docs/benchmarks.md); on a GPU cuBLAS's
               workspace (max_memory_allocated counts tensors only)

The activation sizes follow a Llama-style block (RMSNorm, attention with grouped KV heads, gated MLP): per token
of a forward without gradients, the residual stream and one normed copy, plus the larger of attention's q, k, v
and output or the gated MLP's three intermediates; a forward's logits are the whole vocabulary at every position
for `inference` (the model's own forward, as `dlzo bench` runs it) and only the answer positions in training
(dlzo.engine.scoring), so there they are left out. With gradients each layer keeps its inputs for the backward
(the block's tensors listed in `saved_per_token`). SDPA is assumed not to materialise the T x T scores (flash or
memory-efficient kernels on CUDA, the flash kernel on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dlzo.model.quantize import quantized_bytes
from dlzo.model.shape import ModelShape, TensorShape

# On a CPU, calibrated against `dlzo bench` and an AdamW step on this machine (docs/benchmarks.md): what the
# model's construction and a first forward add beyond the tensors (thread pools, kernel caches, heap the
# allocator keeps), and the freed blocks glibc keeps resident during a step, a fraction of its activations.
CPU_RUNTIME_BYTES = 64 * 2**20
CPU_QUANTIZED_RUNTIME_BYTES = 32 * 2**20  # torchao's first quantized forwards (measured: 33 MiB)
CPU_SLACK_FORWARD = 0.5
CPU_SLACK_BACKWARD = 0.5
# On a GPU torch.cuda.max_memory_allocated counts tensors (no process, no freed blocks), and cuBLAS's workspace,
# which torch takes from the same allocator (up to 32 MiB on Hopper)
CUDA_WORKSPACE_BYTES = 32 * 2**20


@dataclass(frozen=True)
class PlanInputs:
    """What a prediction depends on besides the model's shape."""

    dtype_bytes: int = 4  # the working dtype: 4 float32, 2 bfloat16/float16
    quantize: str = "none"  # linear weights outside the tuned layers: none, int8, int4
    tuned_layers: tuple[int, ...] = (1,)  # the layer scope's decoder layers
    batch_size: int = 16
    max_length: int = 64  # tokens of each sequence (every row padded to it)
    cached_sequences: int = 16  # sequences whose frozen-prefix output the cache holds
    master_weights: str = "auto"  # auto (half precision, layer scopes), on (full scope too), off
    device: str = "cpu"  # cpu: resident memory (baseline + overhead included); cuda: allocator peak
    baseline_bytes: int = 0  # the process before any tensor (CPU)


def masters_on(inputs: PlanInputs, full_scope: bool) -> bool:
    """dlzo.engine.master's policy: float32 masters of half-precision tuned tensors; auto leaves out the full scope."""
    if inputs.dtype_bytes >= 4 or inputs.master_weights == "off":
        return False
    return inputs.master_weights == "on" or not full_scope


def weight_bytes(shape: ModelShape, inputs: PlanInputs, tuned: set[int] | None, masters: bool) -> int:
    """Every tensor as held: tuned layers (None: all) in the working dtype or as float32 masters, each frozen
    nn.Linear but the LM head quantized under --quantize, the rest (embeddings, norms) in the working dtype."""
    total = 0
    for index, layer in enumerate(shape.layers):
        is_tuned = tuned is None or index in tuned
        for tensor in layer:
            total += tensor_bytes(tensor, inputs, is_tuned, masters)
    for tensor in shape.outside:
        total += tensor_bytes(tensor, inputs, tuned is None, masters)
    return total


def tensor_bytes(tensor: TensorShape, inputs: PlanInputs, is_tuned: bool, masters: bool) -> int:
    if is_tuned:
        return tensor.numel * (4 if masters else inputs.dtype_bytes)
    if tensor.linear and inputs.quantize != "none":
        return quantized_bytes(tensor.shape[0], tensor.shape[1], inputs.quantize, inputs.dtype_bytes)
    return tensor.numel * inputs.dtype_bytes


def dequant_bytes(shape: ModelShape, inputs: PlanInputs) -> int:
    """What a quantized linear's forward adds: torchao's weight-only layers multiply by the weight dequantized
    whole, at the largest linear. int8: the weight in the working dtype. int4 (NF4Tensor.get_original_weight):
    both nibbles of every byte as int64 indices (8 bytes an element), the looked-up, scaled and stacked values
    (3 x the working dtype) and a byte of shifted codes. Measured on a 11008 x 4096 layer on this CPU: 2.0 and
    15.1 bytes an element in bfloat16, 4.1 and 21.1 in float32 (these formulas: 2, 15, 4 and 21)."""
    linears = [t for layer in shape.layers for t in layer if t.linear]
    if inputs.quantize == "none" or not linears:
        return 0
    per_element = inputs.dtype_bytes if inputs.quantize == "int8" else 9 + 3 * inputs.dtype_bytes
    return largest(linears) * per_element


def forward_per_token(shape: ModelShape, w: int) -> int:
    """Bytes a token holds at the peak of one decoder layer's forward without gradients: the residual stream
    and its normed copy, the larger of attention (q, k, v, output) and the gated MLP (activation, up, their
    product), and RMSNorm's float32 intermediates in half precision."""
    attention = 2 * shape.num_heads * shape.head_dim + 2 * shape.num_kv_heads * shape.head_dim
    mlp = 3 * shape.intermediate_size
    norm = 2 * 4 * shape.hidden_size if w < 4 else 0
    return w * (2 * shape.hidden_size + max(attention, mlp)) + norm


def saved_per_token(shape: ModelShape, w: int, weights_grad: bool) -> int:
    """Bytes a token leaves saved for the backward in one decoder layer (counted with saved_tensors_hooks on a
    Llama block): each RMSNorm's float32 input and its 1/rms, RoPE's cos and sin, q, k and v (k and v at the
    KV heads' width: SDPA's grouped-query path), SDPA's output and log-sum-exp, and the gated MLP's activation
    input, activation and up projection. A layer whose weights get gradients also keeps every linear's input
    and each norm's normed copy (what the weight gradients need)."""
    h, heads, kv, dim = shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim
    attention = w * (2 * heads * dim + 2 * kv * dim + 2 * dim) + 4 * heads
    kept = 2 * (4 * h + 4) + attention + 3 * w * shape.intermediate_size
    if weights_grad:  # the normed copy and the linear input of both norms, and down_proj's input
        kept += 2 * 2 * w * h + w * shape.intermediate_size
    return kept


def backward_per_token(shape: ModelShape, w: int) -> int:
    """Bytes a token holds in gradients while one layer's backward runs (the gradients of its input, its
    MLP's intermediates and its attention)."""
    return w * (3 * shape.hidden_size + 2 * shape.intermediate_size)


def largest(tensors: list[TensorShape]) -> int:
    return max((t.numel for t in tensors), default=0)


def cpu_parts(inputs: PlanInputs, activations: int, slack: float = CPU_SLACK_FORWARD,
              quantized: bool = True) -> dict[str, int]:
    """On a CPU the process baseline, the runtime a first forward adds (a quantized one more) and the
    allocator's slack; on a GPU the cuBLAS workspace. `quantized`: the step runs quantized layers if
    --quantize asks (not the full scope's)."""
    if inputs.device != "cpu":
        return {"baseline": 0, "overhead": CUDA_WORKSPACE_BYTES}
    runtime = CPU_RUNTIME_BYTES + (CPU_QUANTIZED_RUNTIME_BYTES if quantized and inputs.quantize != "none" else 0)
    return {"baseline": inputs.baseline_bytes, "overhead": runtime + int(slack * activations)}


def inference(shape: ModelShape, inputs: PlanInputs) -> dict[str, int]:
    """One forward of the batch through the model prepared for the layer step (frozen linears quantized, the
    tuned layer in the working dtype), with the whole vocabulary's logits at every position: `dlzo bench`'s
    inference variant."""
    w, tokens = inputs.dtype_bytes, inputs.batch_size * inputs.max_length
    per_token = max(forward_per_token(shape, w), w * (2 * shape.hidden_size + shape.vocab_size))
    activations = tokens * per_token
    return {"weights": weight_bytes(shape, inputs, set(inputs.tuned_layers), False),
            "activations": activations, "dequant": dequant_bytes(shape, inputs), **cpu_parts(inputs, activations)}


def zo_step(shape: ModelShape, inputs: PlanInputs) -> dict[str, int]:
    """One ZO step of the layer scope on the fast path with the frozen prefix cached (dlzo train's default,
    `dlzo bench`'s layer_cached): the ±ε branches as one forward of 2B rows from the tuned layer up."""
    w, tokens = inputs.dtype_bytes, inputs.batch_size * inputs.max_length
    tuned = set(inputs.tuned_layers)
    masters = masters_on(inputs, full_scope=False)
    tuned_tensors = [t for i in sorted(tuned) for t in shape.layers[i]]
    if masters:  # one tensor's float32 z (the sum made in its buffer) and its cast at a time
        perturb = largest(tuned_tensors) * (4 + w)
    else:  # z, θ+εz and θ-εz of every tuned tensor, and one tensor's ε·z while they are made
        perturb = 3 * sum(t.numel for t in tuned_tensors) * w + largest(tuned_tensors) * w
    activations = 2 * tokens * (forward_per_token(shape, w) + w * shape.hidden_size)
    return {"weights": weight_bytes(shape, inputs, tuned, masters),
            "cache": inputs.cached_sequences * inputs.max_length * shape.hidden_size * w,
            "perturb": perturb, "activations": activations, "dequant": dequant_bytes(shape, inputs),
            **cpu_parts(inputs, activations)}


def full_mezo(shape: ModelShape, inputs: PlanInputs) -> dict[str, int]:
    """One step of full MeZO: every tensor perturbed in place one at a time (one z of the largest tensor at
    once), the forward over B rows with answer-only logits. Nothing is quantized: every tensor is tuned."""
    w, tokens = inputs.dtype_bytes, inputs.batch_size * inputs.max_length
    masters = masters_on(inputs, full_scope=True)
    activations = tokens * forward_per_token(shape, w)
    return {"weights": weight_bytes(shape, inputs, None, masters),
            "perturb": largest(shape.tensors()) * (4 if masters else w),
            "activations": activations, **cpu_parts(inputs, activations, quantized=False)}


def adamw(shape: ModelShape, inputs: PlanInputs, first_layer: int | None = None,
          checkpointed: bool = False) -> dict[str, int]:
    """One first-order AdamW step (dlzo train --optimizer adamw: answer-only logits). first_layer None: every
    tensor tuned; else the layer scope, whose backward runs from the top down to `first_layer` only: the tuned
    layers keep what their weight gradients need, the frozen layers above only what the input gradients need.
    `checkpointed` (dlzo train --gradient-checkpointing): every layer from the lowest tuned one up keeps only
    its input, and the backward recomputes one layer at a time, so the peak is at the layer whose own saved
    tensors and the inputs up to it weigh most (the top frozen layer, or a tuned one)."""
    w, tokens = inputs.dtype_bytes, inputs.batch_size * inputs.max_length
    full = first_layer is None
    tuned = set(range(len(shape.layers))) if full else set(inputs.tuned_layers)
    masters = masters_on(inputs, full_scope=full)
    tuned_tensors = shape.tensors() if full else [t for i in sorted(tuned) for t in shape.layers[i]]
    tuned_elements = sum(t.numel for t in tuned_tensors)
    element = 4 if masters else w
    start = 0 if full else first_layer
    if checkpointed:  # recomputing layer i: the inputs of layers start..i and i's own saved tensors
        saved = max((index - start + 1) * w * shape.hidden_size + saved_per_token(shape, w, index in tuned)
                    for index in range(start, len(shape.layers)))
    else:
        frozen_above = len(shape.layers) - start - len(tuned)
        saved = len(tuned) * saved_per_token(shape, w, True) + frozen_above * saved_per_token(shape, w, False)
    backward = tokens * (saved + backward_per_token(shape, w))
    if masters:  # each module's cast of its master is what its linear keeps for the input gradient
        backward += tuned_elements * w
    grads = tuned_elements * element
    # the step: CUDA's foreach AdamW makes one temporary per tuned element; the CPU's loop one tensor's worth
    step = tuned_elements * element if inputs.device != "cpu" else 2 * largest(tuned_tensors) * element
    # the gradients appear as the backward frees what the forward saved, and the step comes after: the peak is
    # the larger of the backward's start (all saved) and the step (all gradients and the step's temporaries)
    # (a quantized frozen layer's forward and backward dequantize its weight: nothing is frozen in the full scope)
    return {"weights": weight_bytes(shape, inputs, None if full else tuned, masters),
            "state": 2 * tuned_elements * element, "grads": grads, "activations": max(backward - grads, step),
            "dequant": 0 if full else dequant_bytes(shape, inputs),
            **cpu_parts(inputs, backward, CPU_SLACK_BACKWARD, quantized=not full)}


def plan(shape: ModelShape, inputs: PlanInputs) -> dict[str, dict[str, int]]:
    """Every prediction by its parts: name -> {part: bytes}; `total(parts)` is the peak. With no tuned layers
    (the full scope) the layer-scope figures are the full scope's."""
    if not inputs.tuned_layers:  # every tensor tuned: none is quantized
        inputs = replace(inputs, quantize="none")
        whole = adamw(shape, inputs)
        return {"inference": inference(shape, inputs), "zo_step": full_mezo(shape, inputs),
                "full_mezo": full_mezo(shape, inputs), "adamw": whole, "adamw_layer": whole,
                "adamw_layer_checkpointed": adamw(shape, inputs, checkpointed=True)}
    first = min(inputs.tuned_layers)
    return {
        "inference": inference(shape, inputs),
        "zo_step": zo_step(shape, inputs),
        "full_mezo": full_mezo(shape, inputs),
        "adamw": adamw(shape, inputs),
        "adamw_layer": adamw(shape, inputs, first),
        "adamw_layer_checkpointed": adamw(shape, inputs, first, checkpointed=True),
    }


def total(parts: dict[str, int]) -> int:
    return sum(parts.values())
