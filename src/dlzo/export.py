"""Getting tuned weights out of a run: a merged Hugging Face folder (`dlzo export`)."""

from __future__ import annotations

from pathlib import Path

from dlzo.options import ExportConfig
from dlzo.run import load_checkpoint_of_run


def export(run: str | Path, to: str | Path, which: str = "best") -> Path:
    """Write a merged Hugging Face folder (base weights + tuned tensors, LoRA merged) that plain transformers loads."""
    prepared = load_checkpoint_of_run(run, which)
    model = prepared.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    to = Path(to)
    model.save_pretrained(to, safe_serialization=True)
    prepared.tokenizer.save_pretrained(to)
    return to


def export_command(config: ExportConfig) -> None:
    print(f"wrote a merged Hugging Face folder to {export(config.run, config.to, config.checkpoint)}")
