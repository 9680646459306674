"""Getting tuned weights out of a run, in forms other tools read:

- a merged Hugging Face folder (`dlzo export`): the base weights with the tuned tensors (LoRA merged);
- only what was tuned (`dlzo export --adapter`): a standard peft adapter folder for LoRA scopes, or the tuned
  tensors under the model's own parameter names plus `tuned.json` (base model, hash of the base values of
  those tensors) for layer scopes, which `load_tuned(base_model, folder)` applies: megabytes, not a copy of
  the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from dlzo.choices import EXPORT_DTYPES as EXPORT_DTYPE_NAMES
from dlzo.engine.scope import add_lora, parse_scope
from dlzo.errors import DlzoError
from dlzo.fields import comma_list
from dlzo.model.checkpoint import atomic_write_json, checked_load, save_tensors
from dlzo.model.gguf_export import GGUF_TYPES, write_gguf
from dlzo.model.loading import resolve_model_source
from dlzo.training.prepare import load_into
from dlzo.training.run_folder import RunFolder
from dlzo.training.run_model import build_for_run, load_checkpoint_of_run

TUNED_FILE, TUNED_JSON = "tuned.safetensors", "tuned.json"


EXPORT_DTYPES = {name: getattr(torch, name) for name in EXPORT_DTYPE_NAMES}  # --dtype's names (dlzo.choices)


def merged_model(run: str | Path, which: str = "best") -> tuple[nn.Module, object]:
    """The run's model with its tuned tensors in place (LoRA merged), and its tokenizer. A run trained with
    --quantize is merged into the base model's full-precision frozen layers (as QLoRA adapters are merged):
    a plain model any tool loads, not the quantized one the run scored (`dlzo eval --run` rebuilds that)."""
    quantized = RunFolder(Path(run), "--run").record()["config"].get("quantize", "none")
    if quantized != "none":
        print(f"the run trained against --quantize {quantized} frozen layers; the export holds them in full "
              f"precision, as the base model does")
    prepared = load_checkpoint_of_run(run, which, quantize="none" if quantized != "none" else "")
    if prepared.masters:  # the folder holds the model's own dtype: the float32 masters cast, as its forward ran
        prepared.masters.remove()
    model = prepared.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config.use_cache = True  # dlzo turns the KV cache off for training; the exported model generates
    return model, prepared.tokenizer


def export(run: str | Path, to: str | Path, which: str = "best", dtype: str = "") -> Path:
    """Write a merged Hugging Face folder (base weights + tuned tensors, LoRA merged) that plain transformers
    loads, in `dtype` (float32, bfloat16, float16; empty: the dtype the run's model was in)."""
    if dtype and dtype not in EXPORT_DTYPES:
        raise DlzoError(f"--dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    model, tokenizer = merged_model(run, which)
    if dtype:
        model = model.to(EXPORT_DTYPES[dtype])
    to = Path(to)
    model.save_pretrained(to, safe_serialization=True)
    tokenizer.save_pretrained(to)
    return to


def export_gguf(run: str | Path, out: str | Path, which: str = "best", gguf_type: str = "f16") -> Path:
    """Write the merged model as one GGUF file (f16, q8_0 or f32), with its base GGUF's metadata and tokenizer:
    for llama.cpp and Ollama. The run's base model must be a GGUF file (a Hugging Face base has no tokenizer
    metadata llama.cpp reads: export a merged folder and convert it with llama.cpp's convert_hf_to_gguf.py)."""
    if gguf_type not in GGUF_TYPES:
        raise DlzoError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    base = RunFolder(run, "--run").config().get("model", "")
    source = resolve_model_source(base)
    if source.kind != "gguf":
        raise DlzoError(f"--gguf: the run's base model {base!r} is not a GGUF file; export a merged folder (--to) "
                        f"and convert it with llama.cpp's convert_hf_to_gguf.py")
    model, _ = merged_model(run, which)
    return write_gguf(model, source.location, out, gguf_type)


def base_hash(model: nn.Module, names: list[str]) -> str:
    """sha256 over the named tensors' bytes (sorted by name): which base a set of tuned tensors replaces."""
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode())
        digest.update(params[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_adapter(run: str | Path, to: str | Path, which: str = "best") -> Path:
    """Only the tuned tensors: a peft adapter folder (LoRA scopes) or tuned.safetensors + tuned.json."""
    run, to = Path(run), Path(to)
    checkpoint = run / f"{which}.safetensors"
    if not checkpoint.exists():  # before the model is loaded: minutes on a large one
        raise DlzoError(f"--run {run}: {checkpoint.name} not found")
    prepared, record = build_for_run(run, None)
    if parse_scope(record["config"]["scope"]).uses_lora:
        load_into(prepared.model, checked_load(checkpoint))
        prepared.model.save_pretrained(to, safe_serialization=True)  # adapter_config.json + adapter_model.safetensors
        return to
    names = prepared.scope.names
    fingerprint = base_hash(prepared.model, names)
    tensors = checked_load(checkpoint)
    save_tensors(to / TUNED_FILE, tensors)
    atomic_write_json(to / TUNED_JSON, {"base_model": record["config"]["model"], "base_tensors_sha256": fingerprint,
                                        "scope": record["scope"], "checkpoint": which, "run": str(run),
                                        "layer_choice": record.get("layer_choice", {}), "names": names})
    return to


def load_tuned(base_model: nn.Module, folder: str | Path, which: str = "best") -> nn.Module:
    """Apply tuned tensors to a loaded base model and return it: `folder` is an `export --adapter` folder of a
    layer scope (tuned.json), or a run folder (its `which` checkpoint; LoRA runs get their adapters back)."""
    folder = Path(folder)
    if (folder / TUNED_JSON).exists():
        meta = json.loads((folder / TUNED_JSON).read_text())
        params = dict(base_model.named_parameters())
        missing = [name for name in meta["names"] if name not in params]
        if missing or base_hash(base_model, meta["names"]) != meta["base_tensors_sha256"]:
            raise DlzoError(f"{folder} was tuned from a different base model than the one given "
                            f"(its base: {meta['base_model']})")
        load_into(base_model, checked_load(folder / TUNED_FILE))
        return base_model
    if (folder / "adapter_config.json").exists():  # a LoRA run's `export --adapter`: peft's own format
        raise DlzoError(f"{folder} is a peft adapter (a LoRA run's export --adapter): load it with "
                        f"peft.PeftModel.from_pretrained(base_model, {str(folder)!r})")
    run = RunFolder(folder)
    if not run.is_started():
        raise DlzoError(f"{folder} is neither an `dlzo export --adapter` folder (tuned.json) nor a run folder")
    record = run.record()
    config = record["config"]
    tensors = checked_load(folder / f"{which}.safetensors")
    model = base_model
    if parse_scope(config["scope"]).uses_lora:
        torch.manual_seed(config["seed"])  # the same adapters as training made them (A is random)
        layers = [record["layer_choice"]["layer"]] if config["scope"] == "dominant-lora" else None
        targets = comma_list(config.get("lora_targets", "")) or None
        model = add_lora(base_model, layers, config["lora_r"], config["lora_alpha"], targets)
    missing = [n for n in tensors if n not in dict(model.named_parameters())]
    if missing:
        raise DlzoError(f"{folder}: the base model has no parameter {missing[0]} (a different architecture?)")
    load_into(model, tensors)
    return model

