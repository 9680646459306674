"""The zeroth-order optimizer: SPSA as in MeZO, with z regenerated from a seed.

    L+ = L(θ + εz),  L- = L(θ - εz),  g = (L+ - L-) / 2ε,  θ <- θ - lr·(g·z + wd·θ)

or, with `estimator="one-sided"`, g = (L(θ + εz) - L(θ)) / ε with L(θ) evaluated once per step and shared
by the q directions (q+1 evaluations instead of 2q; the estimate FZOO, arXiv 2506.09034, batches).

`update_rule` turns the estimate d = mean g·z (+ wd·θ) into a step: sgd (the line above, the default),
momentum (m <- β1·m + d, θ <- θ - lr·m), adam (ZO-AdaMM: Adam's moments of d, bias-corrected), normalized
(FZOO: the g divided by their spread over the q directions), orthogonal (ZO-Muon: a matrix's d replaced by its
polar factor, each step of RMS lr) or hizoo (HiZOO, arXiv 2402.15173: a diagonal Hessian estimate D per
element shapes the perturbation and the step; `step_hizoo`). The directions may be low-rank per matrix (LOZO)
or masked to small-magnitude weights (Sparse-MeZO; dlzo.engine.directions). All state lives over the tuned
tensors only and is a pure function of the base weights and the logged (seeds, grads, lr; hizoo also the
curvatures), so `replay_step` rebuilds it bit for bit (resume of a stateful run replays the whole log).

z comes from a dedicated torch.Generator seeded from (run seed, step, direction, tensor index), never
from the global RNG, so any process can rebuild it: resume, replay and data parallelism rely on it.

Two ways to evaluate the perturbed losses:
- `step(closure)`: in place. The closure computes the loss at the model's current weights. Small scopes
  restore θ by copying a saved copy (exact); the full scope uses MeZO's +ε/-2ε/+ε arithmetic (no copy),
  whose last +εz draws the z that the update then uses (three noise passes per step, not four).
- `step_functional(pair_loss)`: pair_loss(plus, minus) gets the perturbed tensors and returns (L+, L-),
  e.g. from one batched forward (dlzo.engine.fastpath); the model's weights are never perturbed in place.
- `step_one_sided(loss_at)`: loss_at(tensors or None) returns L at those tuned tensors (None: θ).

The public contract, which every other module uses (none reaches into private methods): the steps above and
`step_hizoo`, `finish`, `seeds_for_step` (for a caller that gathers the directions from several processes before
`finish`: dlzo.training.step), `perturbed(seed)`, `add_noise`, `apply_update` (bench times it alone),
`restore_and_update`, `replay_step` (replay and resume), `stateful` and `state_dict`/`load_state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from dlzo.choices import Distribution, Estimator, UpdateRule
from dlzo.engine.directions import Directions, direction_seed, mix, small_magnitudes
from dlzo.engine.master import PerturbedMasters
from dlzo.engine.update_rules import adam_update, check_update_rule, no_decay, normalized, orthogonalized


@dataclass
class StepResult:
    seeds: list[int]
    projected_grads: list[float]
    loss_plus: list[float]
    loss_minus: list[float]
    skipped: bool = False
    curvatures: list[float] | None = None  # hizoo: |L+ + L- - 2·L0| / 2ε² per direction, logged for replay

    @property
    def loss(self) -> float:
        return sum(p + m for p, m in zip(self.loss_plus, self.loss_minus)) / (2 * len(self.loss_plus))


class ZOOptimizer:
    """SPSA over a list of named tensors. Usable from any training loop, not only dlzo's trainer."""

    def __init__(
        self,
        params: Iterable[tuple[str, nn.Parameter]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        q: int = 1,
        weight_decay: float = 0.0,
        seed: int = 0,
        distribution: Distribution = "gaussian",
        exact_restore: bool = True,
        layer_groups: list[int] | None = None,
        sampled_layers: int = 0,
        update_rule: UpdateRule = "sgd",
        beta1: float = 0.9,
        beta2: float = 0.999,
        adam_eps: float = 1e-8,
        estimator: Estimator = "two-sided",
        hessian_smooth: float = 1e-6,
        working_dtypes: dict[str, torch.dtype] | None = None,
        rank: int = 4,
        lazy_steps: int = 50,
        mask_fraction: float = 0.0,
    ):
        self.named = list(params)
        if not self.named:
            raise ValueError("ZOOptimizer got no parameters to tune")
        self.lr, self.eps, self.q = lr, eps, q
        self.weight_decay, self.seed, self.distribution = weight_decay, seed, distribution
        self.exact_restore = exact_restore
        check_update_rule(update_rule, estimator, q, distribution, sampled_layers, mask_fraction)
        self.update_rule, self.beta1, self.beta2, self.adam_eps = update_rule, beta1, beta2, adam_eps
        self.estimator = estimator
        if lazy_steps < 1:
            raise ValueError(f"lazy_steps must be at least 1, not {lazy_steps}")
        if not 0 <= mask_fraction < 1:
            raise ValueError(f"mask_fraction must be in [0, 1), not {mask_fraction}")
        self.hessian_smooth, self.working_dtypes = hessian_smooth, working_dtypes
        self.rank, self.lazy_steps, self.mask_fraction = rank, lazy_steps, mask_fraction
        # Sparse-MeZO's mask: the smallest-magnitude fraction of each matrix, chosen once from the weights the
        # optimizer starts from (the base weights on resume and replay too: they build it before loading a step)
        self.masks = {i: small_magnitudes(p, mask_fraction) for i, (_, p) in enumerate(self.named)
                      if mask_fraction and p.dim() == 2}
        self.hessian: dict[int, torch.Tensor] = {}  # hizoo: tensor index -> D, the diagonal Hessian estimate
        self.moments: dict[int, list[torch.Tensor]] = {}  # tensor index -> [m] (momentum) or [m, v] (adam)
        self.updates = 0  # applied (not skipped) updates: Adam's bias-correction step
        self.directions = Directions(len(self.named), distribution, layer_groups, sampled_layers, rank)
        self.layer_groups, self.sampled_layers = self.directions.layer_groups, sampled_layers
        self.step_count = 0

    # -------------------------------------------------------------------------------- noise

    def active(self, seed: int) -> set[int] | None:
        """The tensors direction `seed` perturbs: all (None), or those of its LeZO layers."""
        return self.directions.active(seed)

    def sample(self, seed: int, index: int, like: torch.Tensor) -> torch.Tensor:
        """z for tensor `index` of direction `seed`, regenerated identically on any call: within the mask
        (mask_fraction), and for lowrank in the subspace of the current block of `lazy_steps` steps (the step
        count is the step being taken, in training and replay alike)."""
        z = self.directions.sample(seed, index, like, self._subspace())
        mask = self.masks.get(index)
        return z if mask is None else z.mul_(mask.to(z.device))

    def _subspace(self) -> int:
        """lowrank: the key of the current block of `lazy_steps` steps' V (0 for the other distributions)."""
        return mix(self.seed, self.step_count // self.lazy_steps) if self.distribution == "lowrank" else 0

    def add_noise(self, seed: int, scale: float) -> None:
        """θ += scale·z(seed), in place."""
        for index, (_, param) in enumerate(self.named):
            param.data.add_(self.sample(seed, index, param), alpha=scale)

    def perturbed(self, seed: int) -> tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], list | None]:
        """(θ+εz, θ-εz, z) of direction `seed`, as new tensors by name; θ itself is left alone. Over float32
        masters (`working_dtypes`: name -> the forward's dtype, dlzo.engine.master): (θ+εz, θ-εz, None), each
        tensor made in its working dtype when read."""
        if self.working_dtypes is not None:
            return self._at(seed, self.eps), self._at(seed, -self.eps), None
        zs = [self.sample(seed, i, p) for i, (_, p) in enumerate(self.named)]
        plus = {n: p.detach() + self.eps * z for (n, p), z in zip(self.named, zs)}
        minus = {n: p.detach() - self.eps * z for (n, p), z in zip(self.named, zs)}
        return plus, minus, zs

    def _at(self, seed: int, scale: float, hizoo: bool = False) -> PerturbedMasters:
        return PerturbedMasters(self.named, lambda i, like: self.sample(seed, i, like), scale, self.working_dtypes,
                                self._step_scale if hizoo else None)

    # -------------------------------------------------------------------------------- update

    def apply_update(self, seeds: list[int], grads: list[float], zs: list[list[torch.Tensor]] | None = None,
                     curvatures: list[float] | None = None) -> None:
        """θ <- θ - lr·(mean_d g_d·z_d + wd·θ). Replay calls this with the logged seeds and grads, so
        training and replay run the same arithmetic and give bit-identical weights."""
        if self.update_rule == "hizoo" and curvatures is None:
            raise ValueError("update_rule hizoo needs each direction's curvature (a log without them is not hizoo's)")
        self.updates += 1
        if self.update_rule == "normalized":
            grads = normalized(grads)
        for index, (name, param) in enumerate(self.named):
            if zs is not None:
                noise = [zs[d][index] for d in range(len(seeds))]
            else:  # sampled one at a time: a full-model step never holds more than one z per tensor
                noise = (self.sample(seed, index, param) for seed in seeds)
            if self.update_rule == "hizoo":
                noise = self._hizoo_directions(index, param, list(noise), curvatures)
            self._update_tensor(index, name, param, noise, grads, owned=zs is None or self.update_rule == "hizoo")

    def _step_scale(self, index: int, param: torch.Tensor) -> torch.Tensor | None:
        """hizoo: 1/sqrt(D) of tensor `index` in the weights' dtype, the scale of its perturbation and of its
        step (None: D is still 1)."""
        hessian = self.hessian.get(index)
        return None if hessian is None else hessian.rsqrt().to(param.dtype)

    def _hizoo_directions(self, index: int, param: torch.Tensor, zs: list[torch.Tensor],
                          curvatures: list[float]) -> list[torch.Tensor]:
        """D <- D·(1 - α + α·c_d·z_d²) for each direction in order, then z_d / sqrt(D) with the new D."""
        hessian = self.hessian.get(index)
        if hessian is None:
            # kept in at least float32: half-precision weights would round a 1e-6 smoothing step away
            dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
            hessian = self.hessian[index] = torch.ones_like(param, dtype=dtype)
        for z, curvature in zip(zs, curvatures):
            hessian.mul_(z.to(hessian.dtype).square().mul_(self.hessian_smooth * curvature).add_(1 - self.hessian_smooth))
        scale = self._step_scale(index, param)
        return [z * scale for z in zs]

    @property
    def stateful(self) -> bool:
        """Momentum and Adam carry state from step to step (not checkpointed: rebuilt by replaying the log);
        normalized and orthogonal are functions of each step's own estimates."""
        return self.update_rule not in ("sgd", "normalized", "orthogonal")

    def _update_tensor(self, index: int, name: str, param: torch.Tensor, noise: Iterable[torch.Tensor],
                       grads: list[float], owned: bool) -> None:
        count = len(grads)
        direction = None
        for z, grad in zip(noise, grads):
            term = z.mul_(grad / count) if owned else z * (grad / count)
            direction = term if direction is None else direction.add_(term)
        if self.update_rule == "orthogonal":  # ZO-Muon: the polar factor within the step's subspace, decay after
            basis = self.directions.row_basis(index, param, self._subspace())
            direction = orthogonalized(direction, basis)
        if self.weight_decay and not no_decay(name):
            direction.add_(param.data, alpha=self.weight_decay)
        if self.update_rule in ("sgd", "hizoo", "normalized", "orthogonal"):
            param.data.sub_(direction, alpha=self.lr)
        elif self.update_rule == "momentum":
            state = self.moments.get(index)
            if state is None:
                state = self.moments[index] = [direction]  # a fresh tensor: the first m is d itself
            else:
                state[0].mul_(self.beta1).add_(direction)
            param.data.sub_(state[0], alpha=self.lr)
        else:
            state = self.moments.get(index)
            if state is None:
                state = self.moments[index] = [torch.zeros_like(direction), torch.zeros_like(direction)]
            adam_update(param, direction, state, self.lr, self.beta1, self.beta2, self.adam_eps, self.updates)

    def restore_and_update(self, seed: int, grad: float) -> None:
        """The last +εz of MeZO's round trip and the update, from one z per tensor: the same arithmetic
        as restoring and then calling apply_update, with one noise pass over the weights instead of two."""
        if self.update_rule == "hizoo":
            raise ValueError("update_rule hizoo perturbs by copy (exact_restore), never by MeZO's round trip")
        self.updates += 1
        for index, (name, param) in enumerate(self.named):
            z = self.sample(seed, index, param)
            param.data.add_(z, alpha=self.eps)
            self._update_tensor(index, name, param, [z], [grad], owned=True)

    # -------------------------------------------------------------------------------- steps

    def seeds_for_step(self, step: int) -> list[int]:
        return [direction_seed(self.seed, step, d) for d in range(self.q)]

    @property
    def evaluations_per_step(self) -> int:
        """Loss evaluations (forwards) of one step on one batch: 2q two-sided; one-sided and HiZOO evaluate θ
        once, then q (one-sided) or 2q (HiZOO's ±) perturbed points."""
        if self.update_rule == "hizoo":
            return 2 * self.q + 1
        return self.q + 1 if self.estimator == "one-sided" else 2 * self.q

    @torch.no_grad()
    def step(self, closure: Callable[[], float | torch.Tensor], directions: list[int] | None = None,
             update: bool = True) -> StepResult:
        """Evaluate the closure at θ±εz for each direction (in place) and update θ.

        `directions` evaluates only some of the q directions and `update=False` leaves θ and the step count
        alone: perturbation-parallel training evaluates its share, gathers all (seed, g), then calls finish()."""
        if self.estimator == "one-sided" or self.update_rule == "hizoo":
            if not self.exact_restore:
                raise ValueError(f"{'hizoo' if self.update_rule == 'hizoo' else 'the one-sided estimator'} in place "
                                 f"needs exact_restore (θ copied back)")
            loss_at = self._in_place_loss_at(closure)
            if self.update_rule == "hizoo":
                return self.step_hizoo(loss_at, directions, update)
            return self.step_one_sided(loss_at, directions, update)
        seeds = self.seeds_for_step(self.step_count)
        chosen = range(self.q) if directions is None else directions
        plus, minus, grads = [], [], []
        backup = [p.detach().clone() for _, p in self.named] if self.exact_restore else None
        kept = None  # one direction's z, reused by the update
        restore_seed = None  # the full scope's last +εz, left to finish() to share a z with the update
        for d in chosen:
            seed = seeds[d]
            if backup is not None:
                zs = [self.sample(seed, i, p) for i, (_, p) in enumerate(self.named)]
                for (_, p), z, saved in zip(self.named, zs, backup):
                    p.data.copy_(saved).add_(z, alpha=self.eps)
                loss_plus = float(closure())
                for (_, p), z, saved in zip(self.named, zs, backup):
                    p.data.copy_(saved).add_(z, alpha=-self.eps)
                loss_minus = float(closure())
                for (_, p), saved in zip(self.named, backup):
                    p.data.copy_(saved)
                kept = zs if self.q == 1 else None
            else:
                self.add_noise(seed, self.eps)
                loss_plus = float(closure())
                self.add_noise(seed, -2 * self.eps)
                loss_minus = float(closure())
                if update and self.q == 1:
                    restore_seed = seed
                else:
                    self.add_noise(seed, self.eps)
            plus.append(loss_plus)
            minus.append(loss_minus)
            grads.append((loss_plus - loss_minus) / (2 * self.eps))
        result = StepResult([seeds[d] for d in chosen], grads, plus, minus)
        if not update:
            return result
        return self.finish(result, zs=[kept] if kept is not None else None, restore_seed=restore_seed)

    @torch.no_grad()
    def step_functional(
        self, pair_loss: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], tuple[float, float]],
        directions: list[int] | None = None, update: bool = True,
    ) -> StepResult:
        """Evaluate pair_loss(θ+εz, θ-εz) for each direction without touching θ, then update θ."""
        if self.update_rule == "hizoo":
            raise ValueError("update_rule hizoo also needs L(θ): use step_hizoo")
        all_seeds = self.seeds_for_step(self.step_count)
        seeds = all_seeds if directions is None else [all_seeds[d] for d in directions]
        plus, minus, grads = [], [], []
        for seed in seeds:
            theta_plus, theta_minus, zs = self.perturbed(seed)
            loss_plus, loss_minus = (float(v) for v in pair_loss(theta_plus, theta_minus))
            plus.append(loss_plus)
            minus.append(loss_minus)
            grads.append((loss_plus - loss_minus) / (2 * self.eps))
        result = StepResult(seeds, grads, plus, minus)
        if not update:
            return result
        return self.finish(result, zs=[zs] if len(seeds) == 1 and zs is not None else None)

    @torch.no_grad()
    def step_one_sided(self, loss_at: Callable[[dict[str, torch.Tensor] | None], float],
                       directions: list[int] | None = None, update: bool = True) -> StepResult:
        """The one-sided estimator: L0 = loss_at(None) (θ itself) once, then for each direction
        g = (loss_at(θ+εz) - L0) / ε. q directions cost q+1 evaluations instead of 2q; replay and resume
        need only the logged (seeds, g), as for the two-sided estimate."""
        all_seeds = self.seeds_for_step(self.step_count)
        seeds = all_seeds if directions is None else [all_seeds[d] for d in directions]
        base = float(loss_at(None))
        plus, grads, kept = [], [], None
        for seed in seeds:
            zs = None if self.working_dtypes is not None else [self.sample(seed, i, p) for i, (_, p) in enumerate(self.named)]
            at = self._at(seed, self.eps) if zs is None else {n: p.detach() + self.eps * z for (n, p), z in zip(self.named, zs)}
            loss_plus = float(loss_at(at))
            plus.append(loss_plus)
            grads.append((loss_plus - base) / self.eps)
            kept = zs if len(seeds) == 1 else None
        result = StepResult(seeds, grads, plus, [base] * len(seeds))
        if not update:
            return result
        return self.finish(result, zs=[kept] if kept is not None else None)

    @torch.no_grad()
    def step_hizoo(self, loss_at: Callable[[dict[str, torch.Tensor] | None], float],
                   directions: list[int] | None = None, update: bool = True) -> StepResult:
        """HiZOO's step (D starts at 1; α = `hessian_smooth`):

            u = z / sqrt(D),  L0 = L(θ),  L± = L(θ ± εu),  g = (L+ - L-) / 2ε,  c = |L+ + L- - 2·L0| / 2ε²
            D <- D·(1 - α + α·c·z²),  θ <- θ - lr·(g·z / sqrt(D) + wd·θ)

        c is the loss's curvature along u, and c·z²·D HiZOO's one-sample estimate of the Hessian's diagonal,
        smoothed into D; q > 1 directions update D in order and the step uses the D after the last. All three
        losses come from the same loss_at, so they round alike: c divides their difference by 2ε²."""
        if self.update_rule != "hizoo":
            raise ValueError(f"step_hizoo is the hizoo update rule's step, not {self.update_rule}'s")
        all_seeds = self.seeds_for_step(self.step_count)
        seeds = all_seeds if directions is None else [all_seeds[d] for d in directions]
        base = float(loss_at(None))
        plus, minus, grads, curvatures, kept = [], [], [], [], []
        for seed in seeds:
            if self.working_dtypes is not None:  # over masters: made when read, z drawn again by the update
                zs, theta_plus, theta_minus = None, self._at(seed, self.eps, True), self._at(seed, -self.eps, True)
            else:
                zs = [self.sample(seed, i, p) for i, (_, p) in enumerate(self.named)]
                steps = []
                for index, ((_, param), z) in enumerate(zip(self.named, zs)):
                    scale = self._step_scale(index, param)
                    steps.append(z * self.eps if scale is None else z * scale * self.eps)
                theta_plus = {n: p.detach() + s for (n, p), s in zip(self.named, steps)}
                theta_minus = {n: p.detach() - s for (n, p), s in zip(self.named, steps)}
            loss_plus, loss_minus = float(loss_at(theta_plus)), float(loss_at(theta_minus))
            plus.append(loss_plus)
            minus.append(loss_minus)
            grads.append((loss_plus - loss_minus) / (2 * self.eps))
            curvatures.append(abs(loss_plus + loss_minus - 2 * base) / (2 * self.eps**2))
            kept.append(zs)
        result = StepResult(seeds, grads, plus, minus, curvatures=curvatures)
        if not update:
            return result
        return self.finish(result, zs=None if self.working_dtypes is not None else kept)

    def _in_place_loss_at(self, closure: Callable[[], float | torch.Tensor]
                          ) -> Callable[[dict[str, torch.Tensor] | None], float]:
        """loss_at over the model's own weights: the given tensors written in, θ copied back after."""
        backup = [p.detach().clone() for _, p in self.named]

        def loss_at(tensors: dict[str, torch.Tensor] | None) -> float:
            if tensors is None:
                return float(closure())
            for name, param in self.named:
                param.data.copy_(tensors[name])
            try:
                return float(closure())
            finally:
                for (_, param), saved in zip(self.named, backup):
                    param.data.copy_(saved)

        return loss_at

    def finish(self, result: StepResult, zs: list[list[torch.Tensor]] | None = None,
               restore_seed: int | None = None) -> StepResult:
        """Apply the update of an evaluated step (all its directions, in order) and advance the step count.
        `zs`: the step's z, when the caller still holds them (one direction), so the update need not draw them
        again. `restore_seed`: that one direction's in-place round trip still owes its last +εz, added here."""
        values = result.loss_plus + result.loss_minus + result.projected_grads + (result.curvatures or [])
        if not all(math.isfinite(v) for v in values):
            result.skipped = True  # a non-finite loss must never reach the weights
            if restore_seed is not None:
                self.add_noise(restore_seed, self.eps)
        elif restore_seed is not None:
            self.restore_and_update(restore_seed, result.projected_grads[0])
        else:
            self.apply_update(result.seeds, result.projected_grads, zs, result.curvatures)
        self.step_count += 1
        return result

    @torch.no_grad()
    def replay_step(self, seeds: list[int], grads: list[float], lr: float, skipped: bool,
                    round_trip: bool = False, curvatures: list[float] | None = None) -> None:
        """Re-apply a logged step from its (seeds, projected grads, lr) alone: replay and resume.
        `round_trip`: the run perturbed in place with MeZO's +ε, -2ε, +ε arithmetic, whose float rounding
        the weights carry, so it is repeated here; the fused last +ε and update of `restore_and_update`
        give the same weights as a separate restore and `apply_update`."""
        if round_trip:
            for seed in seeds:
                self.add_noise(seed, self.eps)
                self.add_noise(seed, -2 * self.eps)
                self.add_noise(seed, self.eps)
        if not skipped:
            self.lr = lr
            self.apply_update(seeds, grads, curvatures=curvatures)
        self.step_count += 1

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "lr": self.lr, "eps": self.eps, "q": self.q, "seed": self.seed,
                "weight_decay": self.weight_decay, "distribution": self.distribution, "update_rule": self.update_rule,
                "beta1": self.beta1, "beta2": self.beta2, "updates": self.updates, "estimator": self.estimator,
                "hessian_smooth": self.hessian_smooth, "rank": self.rank, "lazy_steps": self.lazy_steps,
                "mask_fraction": self.mask_fraction}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
