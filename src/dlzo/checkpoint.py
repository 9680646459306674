"""Atomic file writes and safetensors checkpoints of the tuned tensors only."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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
