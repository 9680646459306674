"""A model's shape from its config alone: the config of a hub id, a folder or a GGUF file (metadata only, no
tensor read), and the model built on the meta device (no memory, no weights) to list every tensor by module.

`dlzo plan` (dlzo.model.memory_plan) sizes its predictions from this; nothing here downloads or loads weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from dlzo.errors import DlzoError, first_line
from dlzo.model.loading import decoder_layers_with_path, resolve_model_source

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Heads that make a causal LM, in a config's `architectures` (GPT-2's is GPT2LMHeadModel).
CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass(frozen=True)
class TensorShape:
    """One parameter: its name, shape, and whether it is the weight of an nn.Linear other than the LM head
    (what --quantize packs when it is frozen: dlzo.model.quantize.frozen_linears)."""

    name: str
    shape: tuple[int, ...]
    linear: bool

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class ModelShape:
    """Every parameter of a decoder model (tied tensors once), grouped by decoder layer, plus the sizes the
    activations depend on."""

    name: str
    layers: tuple[tuple[TensorShape, ...], ...]  # the decoder layers' own tensors, layer 0 first
    outside: tuple[TensorShape, ...]  # embeddings, final norm, LM head (when not tied), anything else
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors())

    def tensors(self) -> list[TensorShape]:
        return [t for layer in self.layers for t in layer] + list(self.outside)

    def layer_parameters(self, index: int) -> int:
        return sum(t.numel for t in self.layers[index])


def read_config(model: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of --model (hub id, folder with config.json, .gguf file or short name), weights untouched: a
    GGUF file's metadata is read, its tensors are not dequantized."""
    from transformers import AutoConfig

    source = resolve_model_source(model)
    try:
        if source.kind == "gguf":
            path = Path(source.location)
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            config = AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    except Exception as err:  # hub (offline), malformed JSON, foreign GGUF: each raises its own type
        where = "not a local folder, and the Hugging Face Hub did not provide it (offline?)" \
            if source.kind == "hub" else first_line(err)
        raise DlzoError(f"cannot read the config of {model}: {where}") from None
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # dlzo loads the weights dequantized; --quantize says how they are kept
    return config


def check_decoder(config: PretrainedConfig, name: str) -> None:
    """A one-line DlzoError unless `config` is a decoder-only causal LM."""
    from transformers import AutoModelForCausalLM

    kind = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise DlzoError(f"{name}: {kind} is an encoder-decoder model, not a decoder (dlzo tunes decoder-only LMs)")
    heads = getattr(config, "architectures", None) or []
    if heads and not any(h.endswith(CAUSAL_HEADS) for h in heads):
        raise DlzoError(f"{name}: {kind} ({', '.join(heads)}) is not a decoder (dlzo tunes decoder-only causal LMs)")
    if getattr(config, "is_decoder", True) is False:  # BERT-like configs carry the flag; decoder-only ones lack it
        raise DlzoError(f"{name}: {kind} is an encoder (is_decoder false), not a decoder (dlzo tunes decoder-only "
                        f"causal LMs)")
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise DlzoError(f"{name}: {kind} has no causal-LM class in transformers, so it is not a decoder dlzo can tune")


def meta_model(config: PretrainedConfig, trust_remote_code: bool = False) -> nn.Module:
    """The model of `config` on the meta device: every tensor's shape and dtype, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def model_shape(config: PretrainedConfig, name: str, trust_remote_code: bool = False) -> ModelShape:
    """The parameters of `config`'s model, counted on the meta device and grouped by decoder layer."""
    check_decoder(config, name)
    model = meta_model(config, trust_remote_code)
    path, blocks = decoder_layers_with_path(model)
    head = model.get_output_embeddings()
    linear = {id(m.weight) for m in model.modules() if type(m) is nn.Linear and m is not head}
    seen: set[int] = set()

    def shapes(module: nn.Module, prefix: str) -> tuple[TensorShape, ...]:
        found = []
        for local, param in module.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                found.append(TensorShape(prefix + local, tuple(param.shape), id(param) in linear))
        return tuple(found)

    layers = tuple(shapes(block, f"{path}.{index}.") for index, block in enumerate(blocks))
    outside = shapes(model, "")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    intermediate = next((getattr(text, key) for key in ("intermediate_size", "ffn_dim", "n_inner")
                         if getattr(text, key, None)), 4 * hidden)
    return ModelShape(name=name, layers=layers, outside=outside, hidden_size=hidden,
                      intermediate_size=int(intermediate), vocab_size=int(text.vocab_size), num_heads=heads,
                      num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
                      head_dim=int(getattr(text, "head_dim", None) or hidden // heads))
