"""`dlzo.ZOTrainer`: a `transformers.Trainer` that fine-tunes with zeroth-order SPSA (MeZO), forward only,
on one dominant decoder layer unless told otherwise. A Trainer script becomes a ZO script by changing
`Trainer` to `dlzo.ZOTrainer` and adding `zo_args=dlzo.ZOArguments(...)`; see docs/hf-trainer.md.

How the Trainer's machinery is reused, not replaced (the inner loop is transformers' own):
- `training_step` evaluates the model's own loss (from the batch's `labels`, -100 ignored) at θ+εz and θ-εz
  for one micro-batch and keeps the pair; it never calls backward. Scopes inside decoder layers take the
  fast path (dlzo.engine.fastpath.BranchedForward.pair_model_loss: both branches in one forward of 2B rows).
- The optimizer the loop steps is a `ZOStepOptimizer`: one placeholder tensor, no model parameter and no
  state. Its `step()` is the ZO update: the losses of all micro-batches of the optimizer step (one z for
  all of them: the seed is a function of the optimizer step) are averaged, weighted by their label-token
  counts, into one projected gradient, and θ <- θ - lr·(g·z + wd·θ) is applied with the lr that
  transformers' scheduler set in `param_groups[0]["lr"]`.
- Checkpoints are the Trainer's: the model weights, the scheduler, the RNG state, trainer_state.json, and
  optimizer.pt, which here holds the ZO state (step count, seed, tuned tensor names). z never comes from
  the global RNG, so a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from dlzo.data.prompts import batch_examples, prompt_batch
from dlzo.engine.fastpath import BranchedForward, swapped_tensors
from dlzo.engine.layer_choice import (
    QUICK_SENSITIVITY,
    model_loss_screen_task,
    most_sensitive_layer,
    probe_choice,
    screen_choice,
    screen_probe,
)
from dlzo.engine.layer_screen import SCREEN
from dlzo.engine.master import install_masters
from dlzo.engine.scope import Scope, add_lora, parse_scope, select
from dlzo.engine.zo import StepResult, ZOOptimizer
from dlzo.evaluation.objectives import GenerationRunner
from dlzo.evaluation.rewards import reward_name
from dlzo.model.quantize import quantize_frozen
from dlzo.training.config import ZOArguments
from dlzo.training.prepare import half_precision_warning
from dlzo.training.step import evaluate_step

logger = logging.getLogger(__name__)

ZO_STATE_FILE = "dlzo_zo.json"  # written beside the weights by save_model (and so into every checkpoint)


def _tokenizer_of(processing_class, data_collator):
    """The tokenizer a Trainer was given: processing_class (a processor wraps one), else the collator's."""
    candidate = getattr(processing_class, "tokenizer", processing_class)
    if candidate is None or not callable(candidate):
        candidate = getattr(data_collator, "tokenizer", None)
    return candidate


def _given_or_probed_layer(zo_args: ZOArguments, model: nn.Module, tokenizer) -> dict:
    """How both dominant scopes choose their layer first, as a layer-choice record: ZOArguments.layer, else the
    probe by the rule (dlzo.engine.layer_choice.probe_choice: {"layer": None, ...} when sun or onset find none)."""
    if zo_args.layer is not None:
        return {"layer": zo_args.layer, "reason": "layer given by ZOArguments.layer", "doubts": []}
    return probe_choice(model, tokenizer, zo_args.rule)


class ZOStepOptimizer(torch.optim.Optimizer):
    """The optimizer transformers' loop steps. It holds one placeholder tensor (torch optimizers need one),
    no model parameter and no state: `param_groups[0]["lr"]` is where the lr scheduler writes the current
    learning rate, and `step()` hands that rate to the ZO update. Its state_dict carries the ZO state."""

    def __init__(self, lr: float, apply_step, zo_state, load_zo_state, device: torch.device):
        # fp16 runs step through a GradScaler, which unscales and checks the gradients of the optimizer's
        # tensors before stepping: a zero gradient on the placeholder keeps it stepping (ZO scales no loss).
        self.placeholder = torch.zeros((), device=device)
        self.placeholder.grad = torch.zeros((), device=device)
        super().__init__([self.placeholder], {"lr": lr})
        self._apply_step, self._zo_state, self._load_zo_state = apply_step, zo_state, load_zo_state

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self._apply_step(float(self.param_groups[0]["lr"]))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # no gradients: the placeholder's zero gradient stays for the GradScaler

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["dlzo"] = self._zo_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("dlzo", None)
        super().load_state_dict(state_dict)
        if zo is not None:
            self._load_zo_state(zo)


def _default(name: str):
    return TrainingArguments.__dataclass_fields__[name].default


# TrainingArguments with no meaning for a ZO update: one warning each when set away from the default.
_IGNORED_ARGS = {
    "optim": "ZOTrainer's update is θ <- θ - lr·(g·z + weight_decay·θ) with the SPSA estimate g; there is no "
             "other optimizer",
    "optim_args": "there is no optimizer to configure",
    "adam_beta1": "the ZO update's moments (zo_update momentum or adam) decay with ZOArguments.beta1",
    "adam_beta2": "the ZO update's second moment (zo_update adam) decays with ZOArguments.beta2",
    "adam_epsilon": "the ZO update's Adam (zo_update adam) keeps ZO-AdaMM's epsilon, 1e-8",
    "max_grad_norm": "there are no gradients to clip, and the projected gradient g is not clipped (MeZO does not)",
    "neftune_noise_alpha": "NEFTune adds noise only in train mode; ZO steps run the model in eval mode",
    "activation_checkpointing": "there is no backward pass whose activations could be recomputed",
    "gradient_checkpointing": "there is no backward pass whose activations could be recomputed",
}


class ZOTrainer(Trainer):
    """A `transformers.Trainer` whose step is a zeroth-order SPSA step on a chosen scope (default: the
    dominant decoder layer). The constructor is Trainer's plus `zo_args`; the model is tuned from its own
    loss on batches with `labels`, e.g. from `DataCollatorForLanguageModeling(tokenizer, mlm=False)`.

    After construction: `zo_scope` (the tuned tensors), `zo_layer_reason` (how the layer was chosen) and,
    after train(), `zo_history` (one dict per optimizer step: step, lr, seeds, projected grads, losses at
    θ±εz, skipped), from which `ZOOptimizer.replay_step` rebuilds the tuned weights."""

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, *trainer_args,
                 zo_args: ZOArguments | None = None, **trainer_kwargs):
        self.zo_args = zo_args = zo_args or ZOArguments()
        if model is None or trainer_kwargs.get("model_init") is not None:
            raise ValueError("ZOTrainer needs a model (model_init is not supported)")
        optimizers = trainer_kwargs.get("optimizers", (None, None))
        if optimizers[0] is not None or trainer_kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("ZOTrainer brings its own update; pass no optimizer (lr and schedule come from args)")
        if optimizers[1] is not None:
            raise ValueError("ZOTrainer builds the lr scheduler from args.lr_scheduler_type; pass no scheduler")
        spec = parse_scope(zo_args.scope)
        layers, self.zo_layer_reason = spec.layers, ""
        self.zo_layer_choice: dict = {}  # rules guarded and screen: the record (dlzo.engine.layer_choice)
        if spec.kind == "dominant-lora":  # the layer is chosen on the base model, before the adapters go in
            tokenizer = _tokenizer_of(trainer_kwargs.get("processing_class") or trainer_kwargs.get("tokenizer"),
                                      trainer_kwargs.get("data_collator"))
            choice = _given_or_probed_layer(zo_args, model, tokenizer)
            layer, self.zo_layer_reason = choice["layer"], choice["reason"]
            self.zo_layer_choice = choice if "rule" in choice else {}
            if layer is None:
                raise ValueError(f"scope=dominant-lora: {self.zo_layer_reason}; pass ZOArguments(layer=K), or use "
                                 f"scope=dominant, whose fallback measures layer sensitivity on the training data")
            layers = [layer]
        if spec.uses_lora:
            model = add_lora(model, layers if spec.kind == "dominant-lora" else None, r=zo_args.lora_r,
                             alpha=zo_args.lora_alpha)
        if zo_args.reward and trainer_kwargs.get("data_collator") is None:
            trainer_kwargs["data_collator"] = prompt_batch  # the rows as they are: the reward reads any field
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self._check_args()
        if zo_args.reward:
            self.args.remove_unused_columns = False  # nor does Trainer drop the fields the model does not take

        if spec.kind == "dominant":
            layers, self.zo_layer_reason = self._dominant_layer()
            layers = [layers]
        self.zo_scope: Scope = select(self.model, spec, layers, zo_args.params)
        quantize_frozen(self.model, self.zo_scope.names, zo_args.quantize)  # --quantize: in place, outside the scope
        # float32 masters in place of half-precision tuned tensors (dlzo.engine.master): the Trainer's
        # checkpoints then hold them, and a resume loads them back exactly
        self.zo_masters = install_masters(self.model, self.zo_scope.names, zo_args.master_weights, spec.kind)
        params = dict(self.model.named_parameters())
        self._zo = ZOOptimizer([(n, params[n]) for n in self.zo_scope.names], lr=self.args.learning_rate,
                               eps=zo_args.eps, q=zo_args.q, weight_decay=self.args.weight_decay,
                               seed=self.args.seed, distribution=zo_args.distribution,
                               exact_restore=spec.kind != "full", update_rule=zo_args.zo_update,
                               beta1=zo_args.beta1, beta2=zo_args.beta2, estimator=zo_args.estimator,
                               hessian_smooth=zo_args.hessian_smooth, rank=zo_args.lowrank_rank,
                               lazy_steps=zo_args.lowrank_lazy, mask_fraction=zo_args.zo_mask,
                               working_dtypes=self.zo_masters.working if self.zo_masters else None)
        note = half_precision_warning(self.zo_masters, self._zo, spec.kind == "full", self.state.global_step)
        if note:
            logger.warning("ZOTrainer: %s", note.removeprefix("warning: "))
        self._branched = (BranchedForward(self.model, self.zo_scope.names)
                          if zo_args.fast_path and self.zo_scope.layers else None)
        # ZOArguments.reward: completions of both branches scored (dlzo.evaluation.objectives)
        self._generation = GenerationRunner.for_reward(
            self.model, _tokenizer_of(self.processing_class, self.data_collator), self.zo_scope.names,
            self._branched is not None, zo_args.reward, zo_args.max_new_tokens, zo_args.temperature) if zo_args.reward else None
        # (optimizer step, micro-batch result, weight, L(θ) of the one-sided and HiZOO steps, else None)
        self._pending: list[tuple[int, StepResult, float, float | None]] = []
        self.zo_history: list[dict] = []
        self._skipped_before = 0  # skipped steps of the run before a resume (its checkpoint's dlzo_zo.json)
        logger.info("ZOTrainer tunes %s: %d of %d parameters (%.3f%%)%s", self.zo_scope.description,
                    self.zo_scope.tuned, self.zo_scope.total, 100 * self.zo_scope.fraction,
                    f"; {self.zo_layer_reason}" if self.zo_layer_reason else "")

    # ------------------------------------------------------------------------------------ set-up

    def _check_args(self) -> None:
        args = self.args
        if args.world_size > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError("ZOTrainer runs in one process (no DDP, DeepSpeed or FSDP); for data- or "
                                      "perturbation-parallel ZO see dlzo.engine.distributed")
        if args.n_gpu > 1:
            raise NotImplementedError(f"ZOTrainer runs on one device, and {args.n_gpu} GPUs are visible: set "
                                      "CUDA_VISIBLE_DEVICES to one of them")
        for name, why in _IGNORED_ARGS.items():
            if name not in TrainingArguments.__dataclass_fields__:
                continue
            value, default = getattr(args, name, None), _default(name)
            if isinstance(default, bool) or default is None:  # switches: only an enabled one means something
                changed = bool(value)
            elif name == "max_grad_norm":
                changed = value not in (default, 0, None)  # 0 asks for no clipping, which is what happens
            else:
                changed = str(getattr(value, "value", value)) != str(getattr(default, "value", default))
            if changed:
                warnings.warn(f"ZOTrainer ignores TrainingArguments.{name}={value!r}: {why}", UserWarning, stacklevel=3)

    def _dominant_layer(self) -> tuple[int, str]:
        """ZOArguments.layer; else the rule's layer on the probe's calibration text; with sun or onset finding none,
        the layer whose perturbation changes the model's loss most on the first training batches."""
        tokenizer = _tokenizer_of(self.processing_class, self.data_collator)
        if self.zo_args.rule == "screen" and self.zo_args.layer is None:
            choice = self._screened_choice(tokenizer)
        else:
            choice = _given_or_probed_layer(self.zo_args, self.model, tokenizer)
        layer, why = choice["layer"], choice["reason"]
        if layer is not None:
            self.zo_layer_choice = choice if "rule" in choice else {}
            for doubt in choice["doubts"]:
                logger.warning("ZOTrainer: the layer choice is doubtful: %s", doubt)
            return layer, why
        if self.train_dataset is None:
            raise ValueError("scope=dominant: the probe found no massive activations and there is no train_dataset "
                             "to measure layer sensitivity on; pass ZOArguments(layer=K)")
        layer, values = self.layer_sensitivity()
        measured = ", ".join(f"{i}:{v:.3g}" for i, v in enumerate(values))
        reason = (f"{why}; fell back to the most perturbation-sensitive layer on the first "
                  f"{QUICK_SENSITIVITY['batches']} training batches (mean |L+ - L-|/2eps: {measured})")
        logger.warning("ZOTrainer: layer %d chosen; %s", layer, reason)
        return layer, reason

    def _screened_choice(self, tokenizer) -> dict:
        """rule=screen: dlzo.engine.layer_choice.screen_choice, the procedure of `dlzo train --rule screen`, on
        the first training batches in dataset order and the first eval batches (else the training batches
        after them), with the model's own loss; `zo_layer_choice` keeps the whole record."""
        if self.train_dataset is None:
            raise ValueError("ZOArguments.rule=screen needs a train_dataset to train the candidate layers on")
        self.model.eval()
        steps, wanted = SCREEN["steps"], SCREEN["dev_examples"]
        train = [self._prepare_inputs(b) for b in itertools.islice(self.get_test_dataloader(self.train_dataset),
                                                                   2 * steps)]
        held = ([self._prepare_inputs(b) for b in itertools.islice(self.get_eval_dataloader(), wanted)]
                if self.eval_dataset is not None else train[steps:]) or train
        held = held[: -(-wanted // held[0]["input_ids"].shape[0])]  # enough batches for about `wanted` rows
        task = model_loss_screen_task(self.model, train[:steps], held)
        with self.accelerator.autocast():
            return screen_choice(self.model, screen_probe(self.model, tokenizer), task, lr=self.args.learning_rate,
                                 eps=self.zo_args.eps, seed=self.args.seed, distribution=self.zo_args.distribution)

    @torch.no_grad()
    def layer_sensitivity(self, batches: int = QUICK_SENSITIVITY["batches"],
                          seeds: int = QUICK_SENSITIVITY["seeds"]) -> tuple[int, list[float]]:
        """(most sensitive layer, per-layer mean |L(θ+εz_l) - L(θ-εz_l)| / 2ε): the fallback of `dlzo train`
        (dlzo.engine.layer_choice.most_sensitive_layer) on the first `batches` training batches in dataset order,
        with the model's own loss."""
        self.model.eval()
        loader = self.get_test_dataloader(self.train_dataset)  # dataset order: no RNG drawn
        data = [self._prepare_inputs(b) for b in itertools.islice(iter(loader), batches)]
        with self.accelerator.autocast():
            return most_sensitive_layer(
                self.model, data, self.zo_args.eps, distribution=self.zo_args.distribution, seeds=seeds,
                pair_loss=lambda runner, batch, plus, minus, cache: runner.pair_model_loss(batch, plus, minus,
                                                                                         prefix_cache=cache))

    # ------------------------------------------------------------------------------------ the step

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = ZOStepOptimizer(self.args.learning_rate, self._apply_zo_step,
                                             lambda: self._zo_state(tensors=True), self._load_zo_state,
                                             self.args.device)
        return self.optimizer

    def _uses_model_loss(self, inputs) -> bool:
        """The fast path computes transformers' causal-LM loss itself: only when that is the loss in use."""
        return ("labels" in inputs and self.compute_loss_func is None and self.label_smoother is None
                and type(self).compute_loss is Trainer.compute_loss)

    def _label_count(self, inputs) -> float | None:
        """A micro-batch's label items, counted as Trainer counts num_items_in_batch (shift_labels, else labels
        without their first position for a causal-LM loss, else every label), so the shares add up to one."""
        if not isinstance(inputs, Mapping):  # BatchEncoding is a Mapping, not a dict
            return None
        labels = inputs.get("shift_labels")
        if labels is None:
            labels = inputs.get("labels")
            if isinstance(labels, torch.Tensor) and getattr(self, "_loss_shifts_labels", True):
                labels = labels[..., 1:]
        return float(labels.ne(-100).sum()) if isinstance(labels, torch.Tensor) else None

    def training_step(self, model: nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """Losses at θ±εz of this optimizer step's direction(s) on one micro-batch, kept for the update that
        the optimizer step applies; returns the mean of the two, detached (what MeZO logs as the loss)."""
        model.eval()  # dropout off: both branches must see the same function
        inputs = self._prepare_inputs(inputs)
        step = self.state.global_step
        self._zo.step_count = step  # the directions are a function of (seed, optimizer step)
        self._pending = [p for p in self._pending if p[0] == step]
        bases: list[float] = []
        with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast():
            if self._generation is not None:
                self._generation.at_step(self.args.seed, step)  # --temperature: the step's shared noise
                result = evaluate_step(self._zo, self._generation, [batch_examples(inputs["rows"])], update=False)
            elif self._zo.estimator == "one-sided" or self._zo.update_rule == "hizoo":
                stepper = self._zo.step_hizoo if self._zo.update_rule == "hizoo" else self._zo.step_one_sided
                result = stepper(self._swapped_loss_at(model, inputs, bases), update=False)
            elif self._branched is not None and self._uses_model_loss(inputs):
                result = self._zo.step_functional(
                    lambda plus, minus: self._branched.pair_model_loss(inputs, plus, minus), update=False)
            else:  # a copy per forward: with label smoothing or compute_loss_func, compute_loss pops "labels"
                result = self._zo.step(lambda: self.compute_loss(model, dict(inputs)), update=False)
        counted = self._label_count(inputs)
        weight = counted if counted is not None else 1.0
        self._pending.append((step, result, weight, bases[0] if bases else None))
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(torch.zeros((), device=self.args.device))  # fp16: sets up the scale it checks at step
        if num_items_in_batch is not None and counted is not None:
            share = weight / max(float(num_items_in_batch), 1.0)
        else:
            share = 1.0 / self.current_gradient_accumulation_steps
        return torch.tensor(result.loss * share if weight > 0 else 0.0, device=self.args.device)

    def _swapped_loss_at(self, model: nn.Module, inputs: dict, bases: list[float]) -> Callable:
        """loss_at of the one-sided and HiZOO steps (ZOOptimizer.step_one_sided / step_hizoo): compute_loss
        with the given tuned tensors swapped into the model for one forward (any scope; the weights are never
        written), or at θ itself for None, whose loss is kept in `bases` for merging micro-batches."""

        def loss_at(tensors: Mapping[str, torch.Tensor] | None) -> float:
            if tensors is None:
                bases.append(float(self.compute_loss(model, dict(inputs))))
                return bases[-1]
            with swapped_tensors(self.model, dict(tensors.items())):
                return float(self.compute_loss(model, dict(inputs)))

        return loss_at

    def prediction_step(self, model: nn.Module, inputs: dict, prediction_loss_only: bool, ignore_keys=None):
        """Under a reward, evaluation scores greedy completions: eval_loss is -mean reward."""
        if self._generation is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        examples = batch_examples(self._prepare_inputs(inputs)["rows"])
        return torch.tensor(-self._generation.greedy_mean(examples), device=self.args.device), None, None

    def floating_point_ops(self, inputs: dict) -> int:
        """Trainer's documented hook for total_flos: a forward costs about 2 FLOPs per parameter and token, and
        a ZO step makes `evaluations_per_step` of them and no backward (Trainer's default counts 6, a forward and
        a backward). An upper bound: the layers below the tuned one run once for both branches on the fast path."""
        backprop = super().floating_point_ops(inputs)  # 6 x tokens x non-embedding parameters, or 0 if unknown
        return backprop // 6 * 2 * self._zo.evaluations_per_step

    def _apply_zo_step(self, lr: float) -> None:
        """The update of one optimizer step from its micro-batches' losses, weighted by label tokens."""
        step = self.state.global_step
        pending = [(r, w, b) for s, r, w, b in self._pending if s == step and w > 0]
        self._pending = []
        if not pending:
            return
        result = pending[0][0] if len(pending) == 1 else _merged(pending, self._zo)
        self._zo.step_count = step
        self._zo.lr = lr
        result = self._zo.finish(result)
        self.zo_history.append({"step": step, "lr": lr, "seeds": result.seeds, "projected_grads": result.projected_grads,
                                "loss_plus": result.loss_plus, "loss_minus": result.loss_minus,
                                "skipped": result.skipped,
                                **({"curvatures": result.curvatures} if result.curvatures is not None else {})})
        if result.skipped:
            logger.warning("ZOTrainer: step %d skipped, non-finite loss (L+ %s, L- %s)", step, result.loss_plus,
                           result.loss_minus)

    # ------------------------------------------------------------------------------------ state, logs, saving

    def _zo_state(self, tensors: bool = False) -> dict:
        """The ZO state for dlzo_zo.json; with `tensors` (optimizer.pt) also the update rule's state tensors:
        the moments (momentum, adam) and the Hessian estimate (hizoo), so that a resume continues them."""
        state = {**self._zo.state_dict(), "names": list(self.zo_scope.names),
                 "scope": self.zo_scope.description, "zo_args": {**dataclasses.asdict(self.zo_args),
                                                                 "reward": reward_name(self.zo_args.reward)},
                 "skipped_steps": self._skipped_before + sum(h["skipped"] for h in self.zo_history)}
        if tensors and self._zo.stateful:
            state.update(moments=dict(self._zo.moments), hessian=dict(self._zo.hessian))
        return state

    def _load_zo_state(self, state: dict) -> None:
        if list(state.get("names", self.zo_scope.names)) != list(self.zo_scope.names):
            raise ValueError(f"the checkpoint tuned {state.get('scope')!r}, this trainer tunes "
                             f"{self.zo_scope.description!r}: pass the checkpoint's ZOArguments (e.g. layer=K)")
        if int(state.get("seed", self._zo.seed)) != self._zo.seed:
            raise ValueError(f"the checkpoint's ZO seed is {state['seed']}, args.seed is {self._zo.seed}")
        self._zo.load_state_dict(state)
        if self._zo.stateful:  # the update rule's state as the checkpoint left it (Adam's bias correction too)
            self._zo.updates = int(state.get("updates", 0))
            self._zo.moments = {int(i): list(m) for i, m in state.get("moments", {}).items()}
            self._zo.hessian = {int(i): d for i, d in state.get("hessian", {}).items()}
        self._skipped_before = int(state.get("skipped_steps", 0))  # zo_skipped_steps counts the whole run
        self.zo_history = []  # this train() call's steps from here (a reused trainer would count twice)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.zo_history:  # a training log: grad_norm is 0 without gradients
            logs.pop("grad_norm", None)
            logs["zo_projected_grad"] = self.zo_history[-1]["projected_grads"][0]
            logs["zo_skipped_steps"] = self._skipped_before + sum(h["skipped"] for h in self.zo_history)
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            info = {**self._zo_state(), "layer_reason": self.zo_layer_reason, "layer_choice": self.zo_layer_choice,
                    "global_step": self.state.global_step, "tuned": self.zo_scope.tuned, "total": self.zo_scope.total}
            with open(os.path.join(output_dir, ZO_STATE_FILE), "w") as handle:
                json.dump(info, handle, indent=1)


def _merged(pending: list[tuple[StepResult, float, float | None]], optimizer: ZOOptimizer) -> StepResult:
    """One optimizer step's micro-batches as one result: the losses averaged by weight (label tokens), then g
    (and HiZOO's curvature) computed from the averages as the optimizer computes them from one batch's losses."""
    total, first, eps = sum(w for _, w, _ in pending), pending[0][0], optimizer.eps
    directions = range(len(first.seeds))
    plus = [sum(r.loss_plus[d] * w for r, w, _ in pending) / total for d in directions]
    minus = [sum(r.loss_minus[d] * w for r, w, _ in pending) / total for d in directions]
    if optimizer.estimator == "one-sided":  # loss_minus holds L(θ)
        return StepResult(list(first.seeds), [(p - m) / eps for p, m in zip(plus, minus)], plus, minus)
    grads = [(p - m) / (2 * eps) for p, m in zip(plus, minus)]
    if optimizer.update_rule != "hizoo":
        return StepResult(list(first.seeds), grads, plus, minus)
    base = sum(b * w for _, w, b in pending) / total
    curvatures = [abs(p + m - 2 * base) / (2 * eps**2) for p, m in zip(plus, minus)]
    return StepResult(list(first.seeds), grads, plus, minus, curvatures=curvatures)
