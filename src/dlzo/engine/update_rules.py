"""How the SPSA estimate d = mean g·z becomes a step, beside plain SGD: which tensors get no weight decay,
FZOO's normalization by the spread of the step's estimates, ZO-Muon's orthogonalized matrices and Adam's
moments (ZO-AdaMM). Each is a pure function of the step's logged estimates and the state it is given, so replay
rebuilds it bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from dlzo.choices import ESTIMATORS, UPDATE_RULES


def check_update_rule(update_rule: str, estimator: str, q: int, distribution: str, sampled_layers: int,
                      mask_fraction: float) -> None:
    """ValueError for a rule the other options cannot serve (ZOOptimizer's checks; the CLI's name its flags)."""
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"update_rule must be one of {', '.join(UPDATE_RULES)}, not {update_rule!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, not {estimator!r}")
    if update_rule == "hizoo" and estimator != "two-sided":
        raise ValueError("update_rule hizoo needs the two-sided estimator (its curvature uses L+, L- and L0)")
    if update_rule == "hizoo" and sampled_layers:
        raise ValueError("update_rule hizoo with LeZO's sampled layers would shrink the D of every layer a "
                         "direction leaves out (z = 0 there)")
    if update_rule == "normalized" and q < 2:
        raise ValueError("update_rule normalized divides by the spread of the q directions' estimates: q >= 2")
    if update_rule == "orthogonal" and (distribution != "lowrank" or mask_fraction):
        raise ValueError("update_rule orthogonal (ZO-Muon) works inside the lowrank directions' subspace: "
                         "distribution lowrank, no mask")


def no_decay(name: str) -> bool:
    """MeZO applies no weight decay to biases and normalisation weights."""
    lowered = name.lower()
    return "bias" in lowered or "norm" in lowered or ".ln" in lowered or "ln_" in lowered


def normalized(grads: list[float]) -> list[float]:
    """FZOO's normalized step (arXiv 2506.09034): the q projected gradients divided by their standard deviation
    (unbiased), so the step's size is set by the rate alone. FZOO divides by the spread of the q losses
    L(θ+εz_d); with one-sided estimates those are ε·g_d + L(θ), whose spread is ε times that of the g_d,
    and its step Σ(L_d - L(θ))·z_d / (q·σ) is then mean(g_d·z_d) / std(g). All equal: no step."""
    mean = sum(grads) / len(grads)
    spread = math.sqrt(sum((g - mean) ** 2 for g in grads) / (len(grads) - 1))
    return [g / spread if spread > 0 else 0.0 for g in grads]


def orthogonalized(direction: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """ZO-Muon's step (arXiv 2602.17155) for one tensor, as a new tensor of unit RMS per element, so that the
    rate alone sets the step's size as with the normalized rule. A matrix's direction D is replaced by its polar
    factor U·Vᵀ (its thin SVD with every singular value above the rank tolerance set to 1; ZO-Muon's five
    Newton-Schulz iterations approximate it, their singular values landing in about [0.7, 1.2]); a vector's is
    only rescaled. `basis`, orthonormal columns spanning D's rows (the low-rank directions' subspace, as ZO-Muon's
    P), makes it exact and cheap: polar(D) = polar(D·B)·Bᵀ costs an SVD of rows x r, where a dense SVD costs
    about min(rows, cols) / r times more. The tolerance is torch.linalg.matrix_rank's (largest
    singular value x largest side x the dtype's epsilon): the float rounding of a rank-r sum must not become
    extra unit directions."""
    work = direction.float() if direction.dtype in (torch.float16, torch.bfloat16) else direction
    if work.dim() != 2:
        rms = work.square().mean().sqrt()
        return (work / rms).to(direction.dtype) if rms > 0 else torch.zeros_like(direction)
    basis = None if basis is None else basis.to(work.dtype)
    left, values, right = torch.linalg.svd(work if basis is None else work @ basis, full_matrices=False)
    count = int((values > values[0] * max(work.shape) * torch.finfo(work.dtype).eps).sum())
    if not count:
        return torch.zeros_like(direction)
    polar = left[:, :count] @ right[:count]
    if basis is not None:
        polar = polar @ basis.T
    return polar.mul_(math.sqrt(work.numel() / count)).to(direction.dtype)


def adam_update(param: torch.Tensor, direction: torch.Tensor, state: list[torch.Tensor], lr: float, beta1: float,
                beta2: float, eps: float, updates: int) -> None:
    """m <- β1·m + (1-β1)·d, v <- β2·v + (1-β2)·d², θ <- θ - lr·m̂ / (sqrt(v̂) + eps); `state` is [m, v] and
    `updates` the applied updates so far, this one included (the bias correction's step)."""
    first, second = state
    first.mul_(beta1).add_(direction, alpha=1 - beta1)
    second.mul_(beta2).addcmul_(direction, direction, value=1 - beta2)
    correction1 = 1 - beta1 ** updates
    correction2 = 1 - beta2 ** updates
    denominator = second.div(correction2).sqrt_().add_(eps)
    param.data.addcdiv_(first, denominator, value=-lr / correction1)


def rate_from_weights(tensors: Iterable[torch.Tensor], per_rms: float) -> float:
    """--lr-per-rms: the rate as `per_rms` times the root mean square of the tuned matrices' elements (vectors
    left out). With the normalized or orthogonal step, whose size is the rate's alone, a step then moves each
    weight by about the same fraction of its typical size on any model: 0.05 was fitted on SmolLM2-135M's layer
    11 (RMS 0.194, lr 9.7e-3) and trained Qwen2.5-0.5B's layers 3 and 23 (RMS 0.026 and 0.016) past plain SPSA's
    grid-best (docs/benchmarks.md, "A rate without a grid")."""
    squares, count = 0.0, 0
    for tensor in tensors:
        if tensor.dim() == 2:
            squares += tensor.detach().double().square().sum().item()
            count += tensor.numel()
    if not count:
        raise ValueError("--lr-per-rms needs a tuned matrix to measure")
    return per_rms * math.sqrt(squares / count)
