"""A tuned model written back as a GGUF file, for llama.cpp and Ollama users who started from one.

The base GGUF's metadata (architecture, hyperparameters, tokenizer, chat template) is copied as it is; every
tensor the base holds is written again from the tuned model's weights, in the asked type: f16, q8_0 (llama.cpp's
8-bit blocks, quantized by the `gguf` package) or f32. One-dimensional tensors (norms, biases) stay f32, as
llama.cpp's own converter keeps them. The names come from transformers' own GGUF <-> Hugging Face map, and
Llama-architecture q/k rows are permuted back into llama.cpp's rotary layout (transformers un-permutes them when
it reads a GGUF), so that transformers reads the written file back to the same logits.

Only a GGUF base has the tokenizer metadata llama.cpp needs; for a Hugging Face base, export a merged folder and
convert it with llama.cpp's `convert_hf_to_gguf.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dlzo.choices import GGUF_TYPES, GgufType  # noqa: F401 (re-exported: the names callers import from here)
from dlzo.errors import DlzoError, first_line

# architectures whose tensors transformers' GGUF reader only renames (llama: it also undoes the q/k permutation,
# which write_gguf redoes); others transform tensors on the way in (fused qkv, norm offsets) and are refused
_PLAIN_ARCHITECTURES = ("qwen2", "qwen3")


def _llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py), the inverse of transformers'
    LlamaTensorProcessor._reverse_permute_weights."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _field_value(reader, name: str):
    field = reader.fields.get(name)
    return field.contents() if field is not None else None


def _tensor_type(gguf_type: str, array: np.ndarray):
    """The GGML type a tensor is written in: 1-D tensors and rows llama.cpp's blocks do not divide stay f32."""
    from gguf import GGMLQuantizationType as T

    if array.ndim < 2 or gguf_type == "f32":
        return T.F32
    if gguf_type == "q8_0" and array.shape[-1] % 32 == 0:
        return T.Q8_0
    return T.F16


def _file_type(gguf_type: str) -> int:
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[gguf_type]


def _hf_names(model: nn.Module, architecture: str) -> dict[str, str]:
    """GGUF tensor name -> the model's state-dict name, by transformers' own map (the one its loader used)."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    return get_gguf_hf_weights_map(model, TensorProcessor(), model_type=architecture)


def write_gguf(model: nn.Module, base_gguf: str | Path, out: str | Path, gguf_type: str = "f16") -> Path:
    """Write `model` (a tuned copy of the model in `base_gguf`) to `out` as GGUF of `gguf_type`."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise DlzoError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    base_gguf, out = Path(base_gguf), Path(out)
    try:
        reader = gguf.GGUFReader(base_gguf)
    except Exception as err:  # the reader raises assorted errors for truncated or foreign files
        raise DlzoError(f"cannot read GGUF file {base_gguf}: {first_line(err)}") from None
    architecture = str(_field_value(reader, gguf.Keys.General.ARCHITECTURE))
    if architecture != "llama" and architecture not in _PLAIN_ARCHITECTURES:
        raise DlzoError(f"GGUF export of architecture {architecture!r} is not supported (llama, "
                        f"{', '.join(_PLAIN_ARCHITECTURES)}); export a merged folder and convert it with llama.cpp")
    names = _hf_names(model, architecture)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    missing = [t.name for t in reader.tensors if names.get(t.name) not in state]
    if missing:
        raise DlzoError(f"{base_gguf} holds tensors the model does not ({', '.join(missing[:3])}): is the run's base "
                        f"model this file?")
    heads = (model.config.num_attention_heads, getattr(model.config, "num_key_value_heads", None)
             or model.config.num_attention_heads)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, architecture)
    _copy_metadata(reader, writer, gguf_type)
    for tensor in reader.tensors:
        array = state[names[tensor.name]].to(torch.float32).cpu().numpy()
        if architecture == "llama" and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            array = _llama_permute(array, heads[0], heads[1] if ".attn_k." in tensor.name else heads[0])
        kind = _tensor_type(gguf_type, array)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, np.ascontiguousarray(array, dtype=np.float32))
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tensor.name, np.ascontiguousarray(array, dtype=np.float16))
        else:
            writer.add_tensor(tensor.name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)  # a killed export leaves no half-written file under the asked name
    return out


def _copy_metadata(reader, writer, gguf_type: str) -> None:
    """Every key of the base but the ones the writer sets itself, with general.file_type set to the new type."""
    import gguf

    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(_file_type(gguf_type))
