"""`dlzo replay`: rebuild a run's tuned tensors from the base model and its trajectory log alone."""

from __future__ import annotations

from pathlib import Path

import torch

from dlzo.checkpoint import load_tensors, save_tensors
from dlzo.errors import DlzoError
from dlzo.options import ReplayConfig
from dlzo.prepare import make_zo_optimizer, tuned_tensors
from dlzo.run import build_for_run, read_jsonl


def replay(run: str | Path, base_model: str | None = None, upto: int | None = None) -> dict[str, torch.Tensor]:
    """The tuned tensors after the logged steps (all, or those before `upto`), bit-identical to training."""
    run = Path(run)
    prepared, record = build_for_run(run, base_model)
    tensors = tuned_tensors(prepared.model, prepared.scope)
    zo = make_zo_optimizer(prepared)
    round_trip = record["perturbation"] == "arithmetic"
    for entry in read_jsonl(run / "trajectory.jsonl"):
        if upto is not None and entry["step"] >= upto:
            break
        zo.replay_step([int(s) for s in entry["seeds"]], entry["grads"], entry["lr"], entry["skipped"], round_trip,
                       entry.get("curvatures"))
    return {name: t.detach().clone() for name, t in tensors.items()}


def replay_command(config: ReplayConfig) -> None:
    run = Path(config.run)
    if not (run / "trajectory.jsonl").exists():
        raise DlzoError(f"--run {run}: no trajectory.jsonl there")
    rebuilt = replay(run, config.base or None)
    if config.to:
        save_tensors(config.to, rebuilt)
    final = run / "final.safetensors"
    if not final.exists():
        print(f"replayed {len(rebuilt)} tensors (no final.safetensors to compare with)")
        return
    trained = load_tensors(final)
    same = all(torch.equal(rebuilt[n].cpu(), trained[n]) for n in trained)
    worst = max(float((rebuilt[n].float() - trained[n].float()).abs().max()) for n in trained)
    print(f"replayed {len(rebuilt)} tensors; bit-identical to final.safetensors: {same} (max |diff| {worst:.3g})")
    if not same:
        raise DlzoError("replay differs from the trained weights (different device type or library versions?)")
