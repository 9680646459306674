"""One training step, for either optimizer: which examples a step sees, how its losses are evaluated (plain
or through the fast path), the ZO step and the first-order (AdamW) reference step."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import set_checkpoint_early_stop

from dlzo.data.examples import Example
from dlzo.engine import distributed as dist
from dlzo.engine.fastpath import BranchedForward, Scorer
from dlzo.engine.prefix import FrozenPrefix
from dlzo.engine.scope import Scope
from dlzo.engine.scoring import EncodedBatch, encode, loss_from_logprobs, token_logprobs
from dlzo.engine.zo import StepResult, ZOOptimizer
from dlzo.errors import DlzoError, first_line
from dlzo.evaluation.objectives import GenerationRunner, RunObjective
from dlzo.model.loading import decoder_layers


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> list[int]:
    """The examples of a step: a pure function of the step, so a resumed run sees the same batches."""
    per_epoch = max(num_examples // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    order = np.random.RandomState((seed * 1_000_003 + epoch) % 2**32).permutation(num_examples)
    return order[offset * batch_size : (offset + 1) * batch_size].tolist()


def step_batches(tokenizer, examples: list[Example], grad_accum: int, device: torch.device, *, fast_path: bool,
                 max_length: int, generation: bool, layout: str) -> list[EncodedBatch]:
    """A step's examples as `grad_accum` encoded micro-batches (one z is used across all of them)."""
    micro = max(len(examples) // grad_accum, 1)
    return [encode(tokenizer, examples[i : i + micro], pack_single_token=fast_path, max_length=max_length,
                   generation=generation, layout=layout).to(device)
            for i in range(0, len(examples), micro)]


class StepRunner:
    """Evaluates the training loss of a step's micro-batches, plain or through the fast path. `score` turns a
    forward's scored log-probabilities into the step's loss: the loss itself, or -accuracy (--objective
    accuracy, dlzo.evaluation.objectives)."""

    def __init__(self, model: nn.Module, scope: Scope, fast_path: bool, average_across_ranks: bool = True,
                 frozen: FrozenPrefix | None = None, score: Scorer = loss_from_logprobs):
        self.model, self.fast, self.average, self.score = model, fast_path, average_across_ranks, score
        self.branched = BranchedForward(model, scope.names, frozen) if fast_path and scope.layers else None

    @torch.no_grad()
    def loss(self, batches: list[EncodedBatch]) -> float:
        losses = [float(self.score(b, token_logprobs(self.model, b, full_logits=not self.fast))) for b in batches]
        local = sum(losses) / len(losses)
        return dist.mean_across_ranks(local) if self.average else local

    def step_prefix(self, batches: list[EncodedBatch]) -> FrozenPrefix | None:
        """The frozen layers' output for a step's batches: the run's cache, else one computed for this step
        only (its q+1 one-sided evaluations then share it); None when the first tuned layer is layer 0."""
        if self.branched.frozen is not None or self.branched.first_tuned < 1:
            return self.branched.frozen
        local = FrozenPrefix(self.model, self.branched.first_tuned, limit_bytes=2**62)
        for batch in batches:
            local.fill(batch)
        return local

    def loss_at(self, batches: list[EncodedBatch], tensors: dict | None, frozen: FrozenPrefix | None) -> float:
        local = sum(float(self.branched.loss_at(b, tensors, frozen, self.score)) for b in batches) / len(batches)
        return dist.mean_across_ranks(local) if self.average else local

    def loss_pair(self, batches: list[EncodedBatch], plus: dict, minus: dict) -> tuple[float, float]:
        pairs = [self.branched.loss_pair(b, plus, minus, score=self.score) for b in batches]
        local = (sum(float(p) for p, _ in pairs) / len(pairs), sum(float(m) for _, m in pairs) / len(pairs))
        return dist.mean_pair_across_ranks(local) if self.average else local


def step_runner(objective: RunObjective, model: nn.Module, tokenizer, scope: Scope, fast_path: bool,
                frozen: FrozenPrefix | None, average_across_ranks: bool, max_length: int, max_new_tokens: int,
                temperature: float) -> StepRunner | GenerationRunner:
    """What evaluates a step's L: a forward's loss or -accuracy (StepRunner), or -F1, -exact match or -reward of
    completions (GenerationRunner, whose batches are lists of examples)."""
    if objective.generates:
        return GenerationRunner(model, tokenizer, scope.names, fast_path and bool(scope.layers), objective,
                                max_new_tokens, max_length, temperature, average_across_ranks)
    return StepRunner(model, scope, fast_path, average_across_ranks, frozen, objective.score)


def zo_step(optimizer: ZOOptimizer, runner: StepRunner | GenerationRunner, batches: list,
            directions: list[int] | None = None) -> StepResult:
    """One SPSA step: L(θ±εz) on the batches, g = (L+ - L-)/2ε, θ -= lr·g·z (one-sided: L(θ+εz) and L(θ);
    hizoo: L(θ) and L(θ±εz/sqrt(D))).

    With `directions` (perturbation parallel) this rank evaluates only those; all ranks then gather every
    direction's (g, L+, L-) and apply the same updates in direction order."""
    update = directions is None
    result = evaluate_step(optimizer, runner, batches, directions, update)
    if update:
        return result
    grads, plus, minus = dist.gather_directions(optimizer.q, directions, result.projected_grads,
                                                result.loss_plus, result.loss_minus)
    return optimizer.finish(StepResult(optimizer.seeds_for_step(optimizer.step_count), grads, plus, minus))


def evaluate_step(optimizer: ZOOptimizer, runner: StepRunner | GenerationRunner, batches: list,
                  directions: list[int] | None = None, update: bool = True) -> StepResult:
    """The step's L at its perturbed points through the optimizer's step of the kind that fits (fast path:
    functional; one-sided and hizoo: one point at a time; else in place), updated unless `update` is False."""
    if runner.branched is not None and (optimizer.estimator == "one-sided" or optimizer.update_rule == "hizoo"):
        # hizoo: L(θ) and L(θ±εu) all from forwards of the same B rows, so they round alike on any kernel
        # (its curvature divides their difference by 2ε²; a 2B-row pair forward could round differently)
        frozen = runner.step_prefix(batches)
        stepper = optimizer.step_hizoo if optimizer.update_rule == "hizoo" else optimizer.step_one_sided
        result = stepper(lambda tensors: runner.loss_at(batches, tensors, frozen), directions, update)
    elif runner.branched is not None:
        pair: Callable = lambda plus, minus: runner.loss_pair(batches, plus, minus)  # noqa: E731
        result = optimizer.step_functional(pair, directions, update)
    else:
        result = optimizer.step(lambda: runner.loss(batches), directions, update)
    return result


class LayerCheckpointing:
    """--gradient-checkpointing: transformers' own activation checkpointing of the decoder layers from the lowest
    tuned one up (non-reentrant, so a layer whose input needs no gradient is fine): each keeps only its input
    for the backward, which recomputes its activations. The layers below get no gradient and run as they are.

    transformers checkpoints a layer only in training mode, and the step runs in eval mode (no dropout, the
    loss of the ZO runs): `active()` switches those layers alone to training mode (their submodules stay in
    eval) for the step's forwards, and the checkpointed forward and its recomputation run with the layers back
    in eval mode, where a layer that applies dropout in its own forward (OPT, Falcon) reads it."""

    def __init__(self, model: nn.Module, first_layer: int = 0):
        kwargs = {"use_reentrant": False, "context_fn": lambda: (self.eval_mode(), self.eval_mode())}
        try:
            if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        except ValueError as err:  # an architecture without transformers' checkpointing
            raise DlzoError(f"--gradient-checkpointing: {first_line(err)}") from None
        # transformers makes the embeddings' output require a gradient (for reentrant checkpointing): without
        # that hook the backward stops at the lowest tuned layer, as it does without checkpointing
        model.disable_input_require_grads()
        model.config.use_cache = False
        layers = list(decoder_layers(model))
        for layer in layers[:first_layer]:
            layer.gradient_checkpointing = False
        self.layers = [layer for layer in layers[first_layer:] if getattr(layer, "gradient_checkpointing", False)]
        if not self.layers:
            raise DlzoError(f"--gradient-checkpointing: {type(model).__name__}'s decoder layers are not "
                            f"transformers' checkpointing layers")

    @contextmanager
    def eval_mode(self) -> Iterator[None]:
        self._switch(False)
        try:
            yield
        finally:
            self._switch(True)

    @contextmanager
    def active(self) -> Iterator[None]:
        """The step's forwards and backwards: the checkpointed layers' own mode open to transformers' check.
        Each recomputation runs its layer to the end (torch stops it early, once it has the tensors the backward
        needs, by default): a float32 master's module (dlzo.engine.master) puts the master back in its hook
        after its forward, which an early stop would skip, leaving the cast in the model."""
        self._switch(True)
        try:
            with set_checkpoint_early_stop(False):
                yield
        finally:
            self._switch(False)

    def _switch(self, training: bool) -> None:
        for layer in self.layers:
            layer.training = training


def adamw_step(model: nn.Module, adam: torch.optim.Optimizer, batches: list[EncodedBatch],
               params: list[torch.Tensor], checkpointing: LayerCheckpointing | None = None) -> tuple[float, bool]:
    """First-order reference: backpropagation through the same loss (`checkpointing`: the layers' activations
    recomputed in the backward). Returns (loss, skipped)."""
    model.train(False)  # no dropout, same loss as the ZO runs
    adam.zero_grad(set_to_none=True)
    total = 0.0
    with torch.enable_grad(), checkpointing.active() if checkpointing is not None else nullcontext():
        for batch in batches:
            loss = loss_from_logprobs(batch, token_logprobs(model, batch)) / len(batches)
            loss.backward()
            total += float(loss.detach())
    if not math.isfinite(total):
        return total, True
    dist.average_gradients(params)
    adam.step()
    return total, False
