"""Atomic file writes and safetensors checkpoints of the tuned tensors only."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dlzo.errors import DlzoError, first_line


def _atomic_replace(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(staging)
        with open(staging, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staging, path)  # a crash leaves either the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(staging):
            os.unlink(staging)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(staging: str) -> None:
        with open(staging, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_replace(Path(path), write)


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors, atomically."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    _atomic_replace(Path(path), lambda staging: save_file(cpu, staging, metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def checked_load(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint; a damaged file is one line naming it and what to do."""
    try:
        return load_tensors(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise _damaged(path, err) from None


def checkpoint_metadata(path: str | Path) -> dict:
    try:
        with safe_open(str(path), "pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise _damaged(path, err) from None


def _damaged(path: str | Path, err: Exception) -> DlzoError:
    return DlzoError(f"checkpoint {path} cannot be read ({first_line(err)}); delete it to resume "
                     f"from the trajectory log alone (dlzo replays every logged step)")


_MODEL_FILES = ("config.json", "adapter_config.json", "tuned.json")


def check_output(path: str | Path, flag: str, folder: bool) -> None:
    """One line naming `flag` when `path` cannot be written as a folder (`folder`) or as a file: a part of it
    above is a file, or it exists as the other kind (transformers' save_pretrained only logs that and returns,
    so an export reported success and wrote nothing)."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise DlzoError(f"{flag} {path}: {parent} is a file, not a folder")
    if folder and path.exists() and not path.is_dir():
        raise DlzoError(f"{flag} {path}: a file of that name exists; name a folder")
    if folder and path.is_dir():
        # an earlier export's files would stay beside the new ones: transformers loads an adapter_config.json
        # it finds onto merged weights (the change applied twice), load_tuned reads an old tuned.json
        held = sorted(p.name for p in path.iterdir() if p.name in _MODEL_FILES or p.suffix == ".safetensors")
        if held:
            raise DlzoError(f"{flag} {path}: that folder already holds a model ({', '.join(held[:3])}); name a new "
                            f"or empty folder")
    if not folder and path.is_dir():
        raise DlzoError(f"{flag} {path}: that is a folder; name a .safetensors file")
