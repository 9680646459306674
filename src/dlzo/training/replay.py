"""Rebuild a run's tuned tensors from the base model and its trajectory log alone; for a hizoo run, also what
its diagonal Hessian estimate learned (`hessian_summary`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from dlzo.engine.zo import ZOOptimizer
from dlzo.training.prepare import make_zo_optimizer, tuned_tensors
from dlzo.training.run_folder import read_jsonl
from dlzo.training.run_model import build_for_run


def replay(run: str | Path, base_model: str | None = None, upto: int | None = None) -> dict[str, torch.Tensor]:
    """The tuned tensors after the logged steps (all, or those before `upto`), bit-identical to training."""
    return replay_with_optimizer(run, base_model, upto)[0]


def replay_with_optimizer(run: str | Path, base_model: str | None = None, upto: int | None = None
                          ) -> tuple[dict[str, torch.Tensor], ZOOptimizer]:
    """replay, and the ZOOptimizer that re-applied the steps (its state: momentum, Adam's moments, HiZOO's D)."""
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
    return {name: t.detach().clone() for name, t in tensors.items()}, zo


def hessian_summary(zo: ZOOptimizer, curvatures: list[float], samples: int = 200_000) -> dict:
    """What a hizoo run's Hessian estimate D holds, over all tuned elements: its mean, the step scale
    mean(1/sqrt(D)), and the spread of log D against the spread it would have if D held no per-element
    curvature at all. Each step multiplies D_i by 1 - α + α·c·z_i²; if the scalar c (the curvature along the
    whole direction) carries nothing about element i, log D_i is a sum of independent terms whose variance
    follows from the logged c alone (computed here over `samples` draws of z²). A measured spread equal to
    that one means D's differences between elements are the noise of z², not curvature. Accumulated tensor by
    tensor (a float64 copy of one tensor at a time)."""
    count, total, log_total, log_squares, scale_total = 0, 0.0, 0.0, 0.0, 0.0
    low, high = math.inf, -math.inf
    for tensor in zo.hessian.values():
        hessian = tensor.double()
        log_hessian = hessian.log()
        count += hessian.numel()
        total += float(hessian.sum())
        log_total += float(log_hessian.sum())
        log_squares += float(log_hessian.square().sum())
        scale_total += float(hessian.rsqrt().sum())
        low, high = min(low, float(hessian.min())), max(high, float(hessian.max()))
    log_mean = log_total / count
    log_var = (log_squares - count * log_mean**2) / (count - 1) if count > 1 else 0.0
    z2 = torch.randn(samples, generator=torch.Generator().manual_seed(0), dtype=torch.float64).square()
    alpha = zo.hessian_smooth
    noise_var = sum(float(torch.log1p(-alpha + alpha * c * z2).var()) for c in curvatures)
    return {"hessian_smooth": alpha, "steps": zo.step_count, "elements": count,
            "D_mean": total / count, "D_min": low, "D_max": high,
            "step_scale_mean": scale_total / count, "log_D_std": max(log_var, 0.0) ** 0.5,
            "log_D_std_if_noise_only": noise_var**0.5,
            "curvature_median": float(torch.tensor(curvatures).median()) if curvatures else None}

