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

from dlzo.engine.checkpoint import atomic_write_json, save_tensors
from dlzo.engine.scope import add_lora, parse_scope
from dlzo.errors import DlzoError
from dlzo.training.prepare import load_into
from dlzo.training.run_folder import build_for_run, checked_load, load_checkpoint_of_run

TUNED_FILE, TUNED_JSON = "tuned.safetensors", "tuned.json"


def export(run: str | Path, to: str | Path, which: str = "best") -> Path:
    """Write a merged Hugging Face folder (base weights + tuned tensors, LoRA merged) that plain transformers loads."""
    prepared = load_checkpoint_of_run(run, which)
    model = prepared.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    to = Path(to)
    model.config.use_cache = True  # dlzo turns the KV cache off for training; the exported model generates
    model.save_pretrained(to, safe_serialization=True)
    prepared.tokenizer.save_pretrained(to)
    return to


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
    if not (folder / "run.json").exists():
        raise DlzoError(f"{folder} is neither an `dlzo export --adapter` folder (tuned.json) nor a run folder")
    record = json.loads((folder / "run.json").read_text())
    config = record["config"]
    tensors = checked_load(folder / f"{which}.safetensors")
    model = base_model
    if parse_scope(config["scope"]).uses_lora:
        torch.manual_seed(config["seed"])  # the same adapters as training made them (A is random)
        layers = [record["layer_choice"]["layer"]] if config["scope"] == "dominant-lora" else None
        targets = [t.strip() for t in config.get("lora_targets", "").split(",") if t.strip()] or None
        model = add_lora(base_model, layers, config["lora_r"], config["lora_alpha"], targets)
    missing = [n for n in tensors if n not in dict(model.named_parameters())]
    if missing:
        raise DlzoError(f"{folder}: the base model has no parameter {missing[0]} (a different architecture?)")
    load_into(model, tensors)
    return model

