"""A model loaded with its linear layers quantized as they are read (`--quantize int8|int4`): the model is built
with no memory (accelerate's `init_empty_weights`), then its tensors come from the checkpoint one at a time,
each linear weight quantized as soon as it is read (dlzo.model.quantize), so no full-precision copy of the
model ever exists. Peak memory: the quantized model plus the largest single tensor in float32.

Where the tensors come from:
  - a folder or hub id with safetensors files: read tensor by tensor (the files are memory-mapped);
  - a GGUF file: read straight from the file, each tensor dequantized alone with the `gguf` package and
    transformers' GGUF name map and tensor processors (the same float32 values as the cached float32
    conversion of dlzo.model.loading, which a float run loads), never through that conversion: a 4 GB Q4
    file of a 7B model would otherwise become 28 GB of float32 first (twice over, while it is converted).
    When a float run has already left the conversion in the cache, its safetensors are read instead (the
    same values, without dequantizing every tensor again);
  - anything else (.bin checkpoints, tensors whose names the model does not use): the ordinary float load,
    then each linear quantized in place (peak: the float model), with a line saying so.

The tuned layer is not known when the model is loaded (the dominant layer is chosen on the loaded model), so
every linear but the LM head is quantized first and the tuned ones are read again from the checkpoint in the
working dtype (`reload_float`): they start from the same values as in a float run, not from dequantized ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import skip_init

from dlzo.errors import DlzoError, first_line
from dlzo.model.loading import (
    ModelSource,
    converted_gguf,
    decoder_layers_with_path,
    load_model,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)
from dlzo.model.quantize import (
    QUANTIZED_AS,
    check_quantize,
    frozen_linears,
    is_quantized,
    quantize_linear,
    replace_module,
)


class SafetensorsWeights:
    """The tensors of a folder's safetensors files, by name."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), "pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), file))

    def names(self) -> set[str]:
        return set(self.files)

    def read(self, wanted: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each tensor copied out of the file, the file opened for it alone: safetensors maps the whole file,
        and while any tensor of it is alive every page read so far stays in the process's memory (SmolLM2:
        the 540 MB float32 conversion stayed resident beside its quantized copy)."""
        from safetensors import safe_open

        for file in sorted({self.files[n] for n in wanted if n in self.files}):
            with safe_open(str(file), "pt") as handle:
                names = [n for n in handle.keys() if n in wanted]
            for name in names:
                with safe_open(str(file), "pt") as handle:
                    tensor = handle.get_tensor(name).clone()
                yield name, tensor


class GGUFWeights:
    """The tensors of a GGUF file under the model's names, each dequantized to float32 when read."""

    def __init__(self, path: str, model: nn.Module):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self.reader = GGUFReader(path)
        self.parsed = load_gguf_checkpoint(path, return_tensors=False)
        architecture = read_field(self.reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=self.parsed["config"])
        self.mapping = get_gguf_hf_weights_map(model, self.processor)

    def names(self) -> set[str]:
        return {self.mapping[t.name] for t in self.reader.tensors if t.name in self.mapping}

    def _forget_pages(self) -> None:
        """Drop the file pages read so far from the process (the reader maps the whole file: a 4 GB GGUF would
        otherwise end up counted in full); they are clean, and read again from the file if needed."""
        mapped = getattr(self.reader.data, "_mmap", None)  # numpy.memmap's own mmap object
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)

    def read(self, wanted: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        self.parsed["tensors"] = {}  # where the processors of mixture-of-experts models put what they split
        for tensor in self.reader.tensors:
            if tensor.name in self.mapping and self.mapping[tensor.name] not in wanted:
                continue
            result = self.processor.process(weights=dequantized(tensor), name=tensor.name,
                                            tensor_key_mapping=self.mapping, parsed_parameters=self.parsed)
            if result.name in self.mapping and self.mapping[result.name] in wanted:
                weights = result.weights  # a view of the mapped file (float32 tensors) is copied, once
                owned = weights.flags.writeable and weights.flags.c_contiguous and weights.base is None
                yield self.mapping[result.name], torch.from_numpy(weights if owned else np.array(weights))
            self._forget_pages()
            for name in list(self.parsed["tensors"]):
                value = self.parsed["tensors"].pop(name)
                if name in wanted:
                    yield name, value


DEQUANTIZE_ROWS_BYTES = 1 << 24  # a GGUF tensor is dequantized 16 MB of its rows at a time


def dequantized(tensor) -> np.ndarray:
    """A GGUF tensor in float32, dequantized a slice of rows at a time into one array: `gguf`'s numpy
    dequantization makes several float32 temporaries the size of its input (measured: SmolLM2's 113 MB
    embedding cost about 0.5 GB at once), so slices keep them small."""
    from gguf import dequantize

    data = tensor.data
    if data.ndim < 2 or data.nbytes <= DEQUANTIZE_ROWS_BYTES:
        return dequantize(data, tensor.tensor_type)
    step = max(1, DEQUANTIZE_ROWS_BYTES // data[0].nbytes)
    first = dequantize(data[:step], tensor.tensor_type)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:step] = first
    for start in range(step, data.shape[0], step):
        out[start : start + step] = dequantize(data[start : start + step], tensor.tensor_type)
    return out


class ModelWeights:
    """The tensors of a model already loaded in full precision (the fallback: its memory is held until the
    tuned tensors have been read back)."""

    def __init__(self, model: nn.Module):
        self.tensors = dict(model.state_dict())

    def names(self) -> set[str]:
        return set(self.tensors)

    def read(self, wanted: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in wanted:
            if name in self.tensors:
                yield name, self.tensors[name]


def _config(source: ModelSource, trust_remote_code: bool):
    from transformers import AutoConfig

    if source.kind == "gguf" and converted_gguf(source.location):
        return AutoConfig.from_pretrained(converted_gguf(source.location))
    if source.kind == "gguf":
        path = Path(source.location)
        try:
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as err:  # gguf raises assorted errors for truncated or foreign files
            raise DlzoError(f"cannot read GGUF file {path}: {first_line(err)}") from None
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the GGUF's own: dlzo reads the weights dequantized
        return config
    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DlzoError(f"cannot read the config of {source.location}: {first_line(err)}") from None


def _weights(source: ModelSource, model: nn.Module) -> SafetensorsWeights | GGUFWeights | None:
    """The streamed tensors of the checkpoint, or None when they cannot be streamed. A GGUF file whose float32
    conversion is already cached (a float run made it) is read from there: the same values, memory-mapped,
    without dequantizing every tensor again."""
    if source.kind == "gguf":
        converted = converted_gguf(source.location)
        return SafetensorsWeights(converted) if converted else GGUFWeights(source.location, model)
    folder = Path(source.location)
    if source.kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors"]))
        except Exception:  # offline, gated, no such repository: the ordinary load says which
            return None
    if not any(folder.glob("*.safetensors")):
        return None
    return SafetensorsWeights(folder)


def wanted_tensors(model: nn.Module) -> set[str]:
    """Every parameter (a tied one once) and persistent buffer the checkpoint must provide."""
    names = {name for name, _ in model.named_parameters()}
    for module_name, module in model.named_modules():
        for name in module._buffers:
            if name not in module._non_persistent_buffers_set:
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def load_quantized(name_or_path: str, quantize: str, dtype: str | torch.dtype = "auto",
                   device: str | torch.device = "auto", trust_remote_code: bool = False) -> nn.Module:
    """The model of `name_or_path` in eval mode with every linear but the LM head quantized (`quantize`), the
    rest in `dtype` on `device`; `model.dlzo_weights` reads its tensors again (`reload_float`)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(name_or_path)
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    check_quantize(quantize, target_device)
    with init_empty_weights():  # parameters on the meta device (no memory), buffers real
        model = AutoModelForCausalLM.from_config(_config(source, trust_remote_code), dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code)
    model.tie_weights()  # a tied LM head is the embedding, which the checkpoint holds (outside init_empty_weights,
    # whose parameter hook would make a new meta tensor of it)
    weights = _weights(source, model)
    wanted = wanted_tensors(model)
    if weights is None or not wanted <= weights.names():
        missing = "no safetensors file" if weights is None else f"no tensor {sorted(wanted - weights.names())[0]}"
        print(f"--quantize: {source.location} has {missing} to read tensor by tensor; loading it in {torch_dtype} "
              f"first and quantizing in place")
        full = load_model(name_or_path, dtype=torch_dtype, device="cpu", trust_remote_code=trust_remote_code)
        weights = ModelWeights(full)
    quantized = set(frozen_linears(model, ()))
    fill(model, weights, wanted, quantized, quantize, torch_dtype, target_device)
    print(f"--quantize {quantize}: {len(quantized)} linear layers held in {QUANTIZED_AS[quantize]} as they were "
          f"read; the LM head, embeddings and norms in {str(torch_dtype).removeprefix('torch.')}; the tuned "
          f"layers are read again in {str(torch_dtype).removeprefix('torch.')}")
    model.tie_weights()
    empty = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise DlzoError(f"--quantize: {source.location} provides no tensor {empty[0]}")
    for module in model.modules():  # the buffers built with the model (rotary frequencies) join it
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(target_device)
    model.config.use_cache = False
    model.dlzo_source, model.dlzo_weights = source.location, weights
    return model.eval()


def fill(model: nn.Module, weights, wanted: set[str], quantized: set[str], quantize: str, dtype: torch.dtype,
         device: torch.device) -> None:
    """Put each wanted tensor into the model as it is read: the weights of the `quantized` linear modules
    quantized (with their bias), every other floating tensor in `dtype`, all on `device`."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in weights.read(wanted):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if value.is_floating_point():
            value = value.to(dtype)
        if module_name not in quantized:
            _put(module, attr, value.to(device))
            continue
        parts = pending.setdefault(module_name, {})
        parts[attr] = value
        if "weight" in parts and ("bias" in parts or module.bias is None):
            del pending[module_name]
            replace_module(model, module_name, quantize_linear(_linear(module, parts), quantize, device))
            trim_heap()


def _put(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _linear(module: nn.Module, parts: dict[str, torch.Tensor]) -> nn.Linear:
    """A plain nn.Linear holding `parts` (weight and bias), on the CPU, for the quantizer to read."""
    linear = nn.Linear(module.in_features, module.out_features, bias="bias" in parts, device="meta")
    linear.weight = nn.Parameter(parts["weight"], requires_grad=False)
    if "bias" in parts:
        linear.bias = nn.Parameter(parts["bias"], requires_grad=False)
    return linear


def reload_float(model: nn.Module, modules: Iterable[str]) -> None:
    """Read the named quantized modules back from the checkpoint as plain nn.Linear layers in the model's
    working dtype (the tuned ones: dlzo.training.prepare)."""
    modules = list(modules)
    if not modules:
        return
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    device = next(model.parameters()).device
    parts: dict[str, dict[str, torch.Tensor]] = {m: {} for m in modules}
    wanted = {f"{m}.{attr}" for m in modules for attr in ("weight", "bias")}
    for name, value in inner.dlzo_weights.read(wanted):
        module_name, _, attr = name.rpartition(".")
        parts[module_name][attr] = value.to(device, dtype)
    for name in modules:
        linear = _linear(model.get_submodule(name), parts[name])
        replace_module(model, name, linear.to(device))


def release_weights(model: nn.Module) -> None:
    """Drop the checkpoint reader (and, for the fallback, the full-precision copy it holds)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
    inner.dlzo_weights = None
    trim_heap()


def trim_heap() -> None:
    """Hand the C heap's freed blocks back to the system (glibc's malloc_trim; elsewhere nothing). Each float32
    weight read and quantized leaves its blocks freed but kept by the allocator: measured on Qwen2.5-0.5B's
    GGUF with int8, 3.6 GB of anonymous memory after the load against 1.7 GB once trimmed (the model's tensors
    are 1.4 GB), and that excess stayed for the whole run."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def layer_in_float(model: nn.Module, layer: int) -> None:
    """Read decoder layer `layer`'s quantized linears back in the working dtype (dlzo bench's tuned layer)."""
    path, blocks = decoder_layers_with_path(model)
    if not 0 <= layer < len(blocks):
        raise DlzoError(f"--layer {layer}: the model has layers 0..{len(blocks) - 1}")
    prefix = f"{path}.{layer}."
    reload_float(model, [name for name, m in model.named_modules() if name.startswith(prefix) and is_quantized(m)])
    release_weights(model)


def random_quantized(config, dtype: torch.dtype, device: torch.device, quantize: str, float_layer: int) -> nn.Module:
    """A random-init model of `config` (transformers' own initialisation, module by module) with every linear
    but the LM head and those of decoder layer `float_layer` quantized as it is made: a 7B shape never exists
    in full precision (dlzo bench --shape llama2-7b --quantize int4)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    check_quantize(quantize, device)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    path, blocks = decoder_layers_with_path(model)
    if not 0 <= float_layer < len(blocks):
        raise DlzoError(f"--layer {float_layer}: the model has layers 0..{len(blocks) - 1}")
    keep = f"{path}.{float_layer}."
    quantized = {name for name in frozen_linears(model, ()) if not name.startswith(keep)}
    for name, module in list(model.named_modules()):
        if name in quantized:
            linear = skip_init(nn.Linear, module.in_features, module.out_features, bias=module.bias is not None,
                               dtype=dtype)
            model._init_weights(linear)
            replace_module(model, name, quantize_linear(linear, quantize, device))
        elif any(p.device.type == "meta" for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)
    model.tie_weights()
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    model.config.use_cache = False
    return model.eval()
