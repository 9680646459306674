"""The ZO directions z, regenerated from seeds: never from the global RNG, so that any process (resume, replay,
another data-parallel rank) rebuilds exactly the z a step used.

A direction's seed comes from (run seed, step, direction) and each tensor's z from (direction seed, tensor index)
through splitmix64, on a dedicated torch.Generator per device.
"""

from __future__ import annotations

import math
import random

import torch

from dlzo.choices import DISTRIBUTIONS, Distribution

_MASK64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """splitmix64 over the values: well-spread 64-bit seeds from small integers."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 29
    return state & ((1 << 63) - 1)


def direction_seed(run_seed: int, step: int, direction: int) -> int:
    return mix(run_seed, step, direction)


def small_magnitudes(tensor: torch.Tensor, fraction: float) -> torch.Tensor:
    """The elements of `tensor` among the `fraction` of smallest magnitude (ties at the threshold included):
    Sparse-MeZO's mask (arXiv 2402.15751), which perturbs and updates only those."""
    magnitude = tensor.detach().abs().float()
    count = max(1, math.ceil(fraction * magnitude.numel()))
    return magnitude <= magnitude.flatten().kthvalue(count).values


class Directions:
    """z for each tensor of a direction: Gaussian, Rademacher or low-rank, over every tensor or, with LeZO
    (arXiv 2410.09823), over `sampled_layers` of the layer groups drawn from the direction's seed (so replay and
    resume draw the same ones).

    lowrank (LOZO, arXiv 2410.07698): a matrix's z is U·Vᵀ/sqrt(r) with U (rows x r) drawn from the direction's
    seed and V (columns x r) from `subspace`, a key the caller keeps for several steps (LOZO's lazy sampling of
    V), so every element still has unit variance but the step moves the matrix within a rank-r subspace that
    changes only every few steps; vectors (norms, biases) stay Gaussian."""

    def __init__(self, num_tensors: int, distribution: Distribution = "gaussian", layer_groups: list[int] | None = None,
                 sampled_layers: int = 0, rank: int = 4):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}, not {distribution!r}")
        if rank < 1:
            raise ValueError(f"the low-rank directions' rank must be at least 1, not {rank}")
        self.distribution, self.rank = distribution, rank
        self.layer_groups, self.sampled_layers = list(layer_groups or []), sampled_layers
        if self.layer_groups and len(self.layer_groups) != num_tensors:
            raise ValueError("layer_groups needs one group per tensor")
        self._active: tuple[int | None, set[int]] = (None, set())
        self._generators: dict[torch.device, torch.Generator] = {}

    def active(self, seed: int) -> set[int] | None:
        """The tensors direction `seed` perturbs: all (None), or those of its LeZO layers."""
        if not self.sampled_layers:
            return None
        if self._active[0] != seed:
            groups = sorted(set(self.layer_groups))
            chosen = set(random.Random(mix(seed, 0x1E20)).sample(groups, min(self.sampled_layers, len(groups))))
            self._active = (seed, {i for i, g in enumerate(self.layer_groups) if g in chosen})
        return self._active[1]

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator

    def _right(self, index: int, like: torch.Tensor, subspace: int) -> torch.Tensor:
        """lowrank: matrix `index`'s V (columns x r) in `subspace`, the same for every direction that shares it."""
        generator = self._generator(like.device).manual_seed(mix(subspace, index, 0x10_20))
        return torch.randn((like.shape[1], min(self.rank, *like.shape)), generator=generator, device=like.device,
                           dtype=like.dtype)

    def row_basis(self, index: int, like: torch.Tensor, subspace: int) -> torch.Tensor | None:
        """lowrank: orthonormal columns spanning the rows of every z of matrix `index` in `subspace` (the QR of
        its V), in which ZO-Muon's step is orthogonalized; None for a vector."""
        if self.distribution != "lowrank" or like.dim() != 2:
            return None
        right = self._right(index, like, subspace)
        return torch.linalg.qr(right.float() if right.dtype in (torch.float16, torch.bfloat16) else right).Q

    def sample(self, seed: int, index: int, like: torch.Tensor, subspace: int = 0) -> torch.Tensor:
        """z for tensor `index` of direction `seed`, shaped and typed like `like` (zero for a tensor outside the
        direction's LeZO layers); `subspace` keys the lowrank distribution's V."""
        active = self.active(seed)
        if active is not None and index not in active:
            return torch.zeros_like(like)
        generator = self._generator(like.device).manual_seed(mix(seed, index))
        if self.distribution == "lowrank" and like.dim() == 2:
            rank = min(self.rank, *like.shape)
            left = torch.randn((like.shape[0], rank), generator=generator, device=like.device, dtype=like.dtype)
            return (left @ self._right(index, like, subspace).T).mul_(rank ** -0.5)
        if self.distribution in ("gaussian", "lowrank"):
            return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return bits.mul_(2).sub_(1)
