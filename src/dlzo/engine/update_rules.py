"""How the SPSA estimate d = mean g·z becomes a step, beside plain SGD: which tensors get no weight decay,
FZOO's normalization by the spread of the step's estimates, and Adam's moments (ZO-AdaMM). Each is a pure
function of the step's logged estimates and the state it is given, so replay rebuilds it bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


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
    left out). With the normalized step, whose size is the rate's alone, a step then moves each weight by about
    the same fraction of its typical size on any model: 0.05 was fitted on SmolLM2-135M's layer 11 (RMS 0.194,
    lr 9.7e-3) and trained Qwen2.5-0.5B's layer 3 (RMS 0.026, lr 1.3e-3) past plain SPSA's grid-best
    (docs/benchmarks.md, "A rate without a grid")."""
    squares, count = 0.0, 0
    for tensor in tensors:
        if tensor.dim() == 2:
            squares += tensor.detach().double().square().sum().item()
            count += tensor.numel()
    if not count:
        raise ValueError("--lr-per-rms needs a tuned matrix to measure")
    return per_rms * math.sqrt(squares / count)
