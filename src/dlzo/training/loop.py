"""`dlzo train`: ZO (or first-order) fine-tuning of a scope of the model on a task.

    train(config): check the inputs -> set up (model, scope, optimizer, resume point) -> loop -> test

Where things live: the step is in dlzo.training.step, the run folder and resume in dlzo.training.run_folder, the model and its scope
in dlzo.training.prepare, the choice of layer in dlzo.engine.layer_choice, the optimizer in dlzo.zo.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from dlzo.data.benchmarks import Task
from dlzo.data.examples import Splits
from dlzo.data.user_data import count_truncated
from dlzo.engine import distributed as dist
from dlzo.engine.prefix import FrozenPrefix
from dlzo.engine.prefix_store import PrefixStore, start_loss_key
from dlzo.engine.scoring import context_limit, fast_layout
from dlzo.engine.update_rules import rate_from_weights
from dlzo.errors import Diverged, DlzoError
from dlzo.evaluation.evaluate import EvalResult, dev_batches, dev_loss, evaluate, perplexity
from dlzo.evaluation.objectives import dev_value, micro_batches, objective_for
from dlzo.evaluation.rewards import RewardError
from dlzo.model.checkpoint import checked_load
from dlzo.model.loading import load_tokenizer, resolve_device, resolve_model_source
from dlzo.model.quantize import check_quantize
from dlzo.training.config import TrainConfig
from dlzo.training.interrupt import Interrupted, StopNow, StopRequests
from dlzo.training.prepare import (
    Prepared,
    half_precision_warning,
    load_into,
    make_zo_optimizer,
    prepare_model,
    tuned_tensors,
)
from dlzo.training.run_data import Data, check_same_data, load_data, own_data_results, own_data_summary
from dlzo.training.run_folder import RESUME, ResumePoint, RunFolder, library_versions
from dlzo.training.scalars import ScalarLogger, check_reporting
from dlzo.training.step import (
    LayerCheckpointing,
    adamw_step,
    batch_indices,
    step_batches,
    step_runner,
    zo_step,
)

# Examples per forward when the frozen prefix is built: a constant, so the cached tensors do not depend on
# --batch-size; 64 rather than a step's 16 because fewer, larger matrix products run faster.
PREFIX_CHUNK = 64


def lr_schedule(config: TrainConfig, base: float | None = None) -> Callable[[int], float]:
    """lr at each step from transformers.get_scheduler (the same schedules as Trainer) times `base` (default
    config.lr); constant gives exactly the base, so runs without a schedule log the same numbers as before
    schedules existed."""
    from transformers import get_scheduler

    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)  # the scheduler's own bookkeeping
    # transformers.TrainingArguments.get_warmup_steps: --warmup-steps, else --warmup-ratio of the steps
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * config.steps)
    scheduler = get_scheduler(config.lr_scheduler, holder, num_warmup_steps=warmup,
                              num_training_steps=config.steps)
    factor = scheduler.lr_lambdas[0]
    peak = config.lr if base is None else base
    return lambda step: peak * factor(step)


def perturbation_kind(config: TrainConfig, prepared: Prepared) -> str:
    """functional (the fast path, θ never touched), copy (in place, restored exactly) or arithmetic
    (MeZO's in-place ±ε round trip, for big scopes where a copy would double the memory)."""
    if config.optimizer == "zo" and config.fast_path and prepared.scope.layers:
        return "functional"
    return "copy" if prepared.scope.fraction <= config.exact_restore_fraction else "arithmetic"


def train(config: TrainConfig) -> dict:
    """Run (or resume) a training job and return its results."""
    if config.resume:
        if config.out != TrainConfig.out and Path(config.out) != Path(config.resume):
            raise DlzoError(f"--resume {config.resume} and --out {config.out} name different folders")
        config.out = config.resume
    config.validate()
    check_quantize(config.quantize, resolve_device(config.device))  # the machine runs it (needs torch: not in validate)
    check_reporting(config.report_to)
    run = RunFolder(config.out, "--resume" if config.resume else "--out")
    previous = run.record() if run.decide(config) == RESUME else None
    resolve_model_source(config.model)  # a wrong --model is reported before anything about the data
    # --data reads the rows with the model's tokenizer (chat templates, lengths); nothing is written before
    # they are read and checked
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code) if config.data else None
    data = load_data(config, tokenizer)
    if config.num_train_epochs:  # the training examples are counted now: the epochs become --steps
        config.steps = config.epoch_steps(len(data.splits.train))
    objective_for(config, data.task)  # the objective fits the task, a --reward file loads
    if data.user is not None:
        check_same_data(previous, data)
        check_answers_fit(tokenizer, data.splits, config.max_length, data.task)
    if dist.is_main_process():
        run.lock()
    try:
        return fit(config, run, previous, data)
    except RewardError as err:  # the logged steps are kept: resume replays them
        raise RewardError(f"{err}; the run stopped after its last finished step: fix the function, then "
                          f"dlzo train --resume {run.path}") from None
    finally:
        run.unlock()


class Session:
    """What a run holds while it trains: the model and its tuned tensors, the optimizer, the run folder.
    Its small methods are the steps of `fit` (as a torchtune recipe's): validate, save, train_step."""

    def __init__(self, config: TrainConfig, run: RunFolder, previous: dict | None, data: Data):
        self.config, self.run, self.data = config, run, data
        self.objective = objective_for(config, data.task)  # loss, a metric or a reward (dlzo.evaluation.objectives)
        self.resumed = previous is not None
        self.prepared = prepare_model(config, data.splits.train, previous.get("layer_choice") if previous else None,
                                      dev_examples=data.splits.dev, generation=data.task.generation)
        self.model, self.tokenizer = self.prepared.model, self.prepared.tokenizer
        self.max_length = context_limit(self.model, config.max_length)
        if self.max_length < config.max_length and dist.is_main_process():
            print(self.shorter_context_note(config.max_length))
        check_answers_fit(self.tokenizer, data.splits, self.max_length, data.task)
        self.device = next(self.model.parameters()).device
        self.is_main = dist.is_main_process()
        self.tensors = tuned_tensors(self.model, self.prepared.scope)
        # --lr-per-rms: from the weights the run starts from, before a resume loads its checkpoint
        self.base_lr = rate_from_weights(self.tensors.values(), config.lr_per_rms) if config.lr_per_rms else config.lr
        if config.lr_per_rms and self.is_main and not self.resumed:
            print(f"--lr-per-rms {config.lr_per_rms:g}: lr {self.base_lr:.4g} ({config.lr_per_rms:g} x the RMS of the "
                  f"tuned matrices)")
        self.perturbation = perturbation_kind(config, self.prepared)
        if (config.estimator == "one-sided" or config.zo_update == "hizoo") and self.perturbation == "arithmetic":
            flag = "--zo-update hizoo" if config.zo_update == "hizoo" else "--estimator one-sided"
            raise DlzoError(f"{flag}: {self.prepared.scope.description} is perturbed in place "
                            f"(more than --exact-restore-fraction of the model); raise --exact-restore-fraction")
        self.zo = make_zo_optimizer(self.prepared, self.perturbation == "copy") if config.optimizer == "zo" else None
        self.adam = (torch.optim.AdamW(list(self.tensors.values()), lr=config.lr, weight_decay=config.weight_decay)
                     if self.zo is None else None)
        self.checkpointing = (LayerCheckpointing(self.model, min(self.prepared.scope.layers, default=0))
                              if self.adam is not None and config.gradient_checkpointing else None)
        if previous is not None and self.zo is None and (run.path / "last.safetensors").exists():
            raise DlzoError("--resume is supported for ZO runs only (AdamW state is not checkpointed)")
        self.point = (run.resume_point(self.model, self.zo, self.perturbation == "arithmetic") if previous is not None
                      else ResumePoint(0, math.inf, 0))
        if self.zo is not None and self.is_main:  # before the first step moves the weights: its drift is measured
            warning = half_precision_warning(self.prepared.masters, self.zo, self.perturbation == "arithmetic", self.point.step)
            if warning:
                print(warning)
        self.lr_at = lr_schedule(config, self.base_lr)
        self.layout = fast_layout(self.model, self.tokenizer, config.fast_path)
        self.rank, self.world = dist.rank(), dist.world_size()
        split_directions = config.parallel == "perturbation" and self.world > 1
        built = self.frozen_prefix()
        self.frozen = built if built is not None and not built.dropped else None
        self.runner = step_runner(self.objective, self.model, self.tokenizer, self.prepared.scope, config.fast_path,
                                  self.frozen, not split_directions, self.max_length, config.max_new_tokens,
                                  config.temperature)
        self.directions = ([d for d in range(config.q) if d % self.world == self.rank] if split_directions else None)
        if self.is_main:
            announce(config, self.prepared, data.splits, self.point, previous)
            if built is not None:
                print(built.summary())
            record = run_record(config, self.prepared, data.splits, self.perturbation, self.device)
            record["frozen_prefix"] = built.summary() if built is not None else None
            if data.user is not None:
                record.update(data=data.info, split_record=data.user.split_record)
            run.write_record(record)

    def shorter_context_note(self, requested: int) -> str:
        """The model's position table is shorter than --max-length: sequences are cut to it (the note on
        your own rows counted those over --max-length)."""
        note = (f"--max-length {requested} is more than the model's {self.max_length} positions: every sequence "
                f"is cut to {self.max_length} tokens")
        if self.data.user is None:
            return note
        rows = self.data.user.train + self.data.user.dev
        return f"{note} ({count_truncated(rows, self.tokenizer, self.max_length)} of {len(rows)} rows are longer)"

    def frozen_prefix(self) -> FrozenPrefix | None:
        """The cache of the layers below the tuned one (dlzo.engine.prefix), filled from every training example in
        fixed chunks before step 0, so a resumed run holds the same tensors; None where it does not apply
        (not the fast path, a scope starting at layer 0, --prefix-cache-mb 0). A cache that passed its limit
        comes back `dropped`."""
        config, scope = self.config, self.prepared.scope
        if self.perturbation != "functional" or not config.prefix_cache_mb or not scope.layers or min(scope.layers) < 1:
            return None
        if self.objective.generates:  # completions are new sequences at every step
            return None
        store = PrefixStore.open(config.prefix_store, self.model, min(scope.layers)) if config.prefix_store else None
        frozen = FrozenPrefix(self.model, min(scope.layers), config.prefix_cache_mb * 2**20, store)
        train = self.data.splits.train
        for start in range(0, len(train), PREFIX_CHUNK):
            for batch in step_batches(self.tokenizer, train[start : start + PREFIX_CHUNK], 1, self.device,
                                      fast_path=True, max_length=self.max_length,
                                      generation=self.data.task.generation, layout=self.layout):
                frozen.fill(batch)
            if frozen.dropped:  # over the limit: the rest need not be encoded
                break
        return frozen

    def dev_examples(self) -> list:
        splits = self.data.splits
        return splits.dev or splits.train[:100]

    def evaluate_dev(self) -> float:
        """The dev loss; under another objective, -metric (dlzo.evaluation.objectives.dev_value)."""
        if self.objective.name != "loss":
            return dev_value(self.objective, self.model, self.tokenizer, self.dev_examples(), self.config.eval_batch_size,
                             self.max_length, self.config.max_new_tokens, self.frozen)
        return dev_loss(self.model, self.tokenizer, self.dev_examples(), self.config.eval_batch_size,
                        self.data.task.generation, self.max_length, per_token=self.data.per_token, frozen=self.frozen)

    def dev_loss_at_start(self) -> float:
        """The untrained model's dev loss. With --prefix-store it is kept beside the stored prefix under a key of
        all it depends on (dlzo.engine.prefix_store.start_loss_key), so of a sweep's runs over one layer (every rate and
        seed: the data seed is fixed) only the first measures it. One process only: ranks hold other shares."""
        store = self.frozen.store if self.frozen is not None and self.world == 1 and self.objective.name == "loss" else None
        if store is None:
            return self.evaluate_dev()
        examples = self.dev_examples()
        batches = dev_batches(self.model, self.tokenizer, examples, self.config.eval_batch_size,
                              self.data.task.generation, self.max_length)
        key = start_loss_key(self.model, self.frozen.first_tuned, batches,
                             {"examples": len(examples), "per_token": self.data.per_token})
        kept = store.read_start_loss(key)
        if kept is not None:
            print(f"dev loss at step 0: {kept:.6f}, read from the store")
            return kept
        measured = self.evaluate_dev()
        store.write_start_loss(key, measured)
        return measured

    def save(self, name: str, step: int, best: float) -> None:
        if self.is_main:
            self.run.save(name, self.tensors, step, best, self.prepared.scope.description, self.config.model)

    def validate(self, step: int, best: float) -> tuple[float, float]:
        """(dev loss, best so far) at `step`; keeps best.safetensors and writes last.safetensors (the resume point)."""
        current = self.evaluate_dev()
        if current < best:
            best = current
            self.save("best.safetensors", step, best)
        self.save("last.safetensors", step, best)
        if self.is_main:
            self.run.log_metrics({"step": step, "dev_loss": current, "best_dev_loss": best, **self.objective.last_dev})
        return current, best

    def start(self) -> tuple[float, float]:
        """(dev loss at step 0, best dev loss so far): measured for a new run, read back for a resumed one."""
        seen = self.run.dev_losses() if self.resumed else {}
        if 0 not in seen:
            dev_start = self.dev_loss_at_start()
            self.save("best.safetensors", 0, dev_start)
            if self.is_main:
                self.run.log_metrics({"step": 0, "dev_loss": dev_start, **self.objective.last_dev})
            return dev_start, dev_start
        best = self.point.best_dev
        if self.point.step and self.point.step not in seen and is_eval_step(self.config, self.point.step):
            _, best = self.validate(self.point.step, best)  # the kill fell between this step and its evaluation
        return seen[0], best

    def train_step(self, step: int, lr: float) -> tuple[float, bool, float | None]:
        """One step on the step's batch: (loss, skipped, mean |projected gradient| or None for AdamW)."""
        config, splits = self.config, self.data.splits
        examples = [splits.train[i] for i in batch_indices(step, len(splits.train), config.batch_size, config.seed)]
        shard = examples[self.rank :: self.world] if self.world > 1 and config.parallel == "data" else examples
        if self.objective.generates:  # prompts to complete, and the step's sampling noise
            batches = micro_batches(shard, config.grad_accum)
            self.runner.at_step(config.seed, step)
        else:
            batches = step_batches(self.tokenizer, shard, config.grad_accum, self.device, fast_path=config.fast_path,
                                   max_length=self.max_length, generation=self.data.task.generation, layout=self.layout)
        if self.zo is None:
            for group in self.adam.param_groups:
                group["lr"] = lr
            return (*adamw_step(self.model, self.adam, batches, list(self.tensors.values()), self.checkpointing), None)
        self.zo.lr = lr
        result = zo_step(self.zo, self.runner, batches, self.directions)
        if self.is_main:
            entry = {"step": step, "seeds": [str(s) for s in result.seeds], "grads": result.projected_grads,
                     "lr": lr, "skipped": result.skipped, **self.objective.step_logged(result.loss_plus, result.loss_minus)}
            if result.curvatures is not None:
                entry["curvatures"] = result.curvatures
            self.run.log_step(entry)
        return result.loss, result.skipped, _mean_abs(result.projected_grads)


def set_up(config: TrainConfig, run: RunFolder, previous: dict | None, data: Data,
           stop: StopRequests) -> tuple[Session, float, float]:
    """(session, dev loss at step 0, best so far). A signal here stops at once: no step is lost, and the run
    continues with --resume once its run.json is written."""
    stop.at_once = True
    try:
        session = Session(config, run, previous, data)
        dev_start, best_dev = session.start()
    except StopNow as stop_now:
        then = (f"continue with: dlzo train --resume {run.path}" if run.run_file.exists()
                else "nothing was written; start it again")
        raise Interrupted(f"stopped by {stop_now} before training began; {then}") from None
    stop.at_once = False
    return session, dev_start, best_dev


def fit(config: TrainConfig, run: RunFolder, previous: dict | None, data: Data) -> dict:
    """Set up, train, test. The loop below is the whole of training."""
    with StopRequests().installed() as stop:
        session, dev_start, best_dev = set_up(config, run, previous, data, stop)
        scalars = (ScalarLogger(config.report_to, run.path, asdict(config), config.run_name) if session.is_main
                   else None)
        first, nonfinite_in_a_row = session.point.step, 0
        dist.STEP_TRAFFIC["bytes"] = 0
        started = time.time()
        bar = tqdm(range(first, config.steps), initial=first, total=config.steps, dynamic_ncols=True,
                   disable=config.quiet or not session.is_main,
                   desc=f"{config.optimizer} {session.prepared.scope.description}")
        for step in bar:
            lr = session.lr_at(step)
            loss, skipped, grad = session.train_step(step, lr)
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
            if nonfinite_in_a_row >= config.max_nonfinite:
                raise Diverged(
                    f"{nonfinite_in_a_row} non-finite losses in a row at step {step}: the forward overflowed, most "
                    f"likely float16 collapse; use --dtype bfloat16 or float32, or a smaller --lr / --eps")
            done, elapsed = step + 1, time.time() - started
            if session.is_main:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}")
                if step % config.log_every == 0 or done == config.steps:
                    run.log_metrics({"step": step, "loss": loss, "lr": lr, "elapsed_s": round(elapsed, 3),
                                     **session.objective.logged(loss)})
                scalars.log(step, {"train/loss": loss, "train/lr": lr, "train/steps_per_s": (done - first) / max(elapsed, 1e-9),
                                   **({"train/projected_grad": grad} if grad is not None else {})})
            if is_eval_step(config, done):
                dev, best_dev = session.validate(done, best_dev)
                if session.is_main:
                    scalars.log(done, {"eval/dev_loss": dev})
            elif stop or (config.save_every and done % config.save_every == 0):
                session.save("last.safetensors", done, best_dev)
            if stop and done < config.steps:
                raise Interrupted(f"stopped by {stop.signal} after step {done} of {config.steps} (saved "
                                  f"{run.path / 'last.safetensors'}); continue with: dlzo train --resume {run.path}")
    bar.close()
    if scalars is not None:
        scalars.close()
    train_seconds = time.time() - started
    session.save("final.safetensors", config.steps, best_dev)
    dist.barrier()
    return evaluate_best(config, run, session.prepared, data, dev_start, best_dev, train_seconds, first)


def evaluate_best(config: TrainConfig, run: RunFolder, prepared: Prepared, data: Data, dev_start: float,
                  best_dev: float, train_seconds: float, start_step: int) -> dict:
    """Test the checkpoint with the lowest dev loss, as the paper does, and write results.json.
    --data has no test set: classification rows are scored by accuracy on the dev rows, generation rows by the
    dev loss and perplexity of the best checkpoint."""
    model, tokenizer, scope, splits = prepared.model, prepared.tokenizer, prepared.scope, data.splits
    is_main = dist.is_main_process()
    load_into(model, checked_load(run.path / "best.safetensors"))
    tested = splits.dev if data.user is not None else splits.test
    objective = objective_for(config, data.task)
    if data.user is not None and objective.name != "loss":  # the dev rows chose the checkpoint by this metric
        result = EvalResult(data.task.name, objective.key, -best_dev, len(tested))
    elif data.per_token:
        result = EvalResult(data.task.name, "perplexity", perplexity(best_dev), len(tested))
    else:
        result = evaluate(model, tokenizer, data.task, tested, config.eval_batch_size,
                          max_length=context_limit(model, config.max_length),
                          quiet=config.quiet or not is_main) if tested else None
    ran = max(config.steps - start_step, 1)
    results = {"task": data.task.name, "scope": scope.description, "optimizer": config.optimizer,
               "layer": prepared.layer_choice.get("layer") if prepared.layer_choice else
               (scope.layers[0] if len(scope.layers) == 1 else None),
               "steps": config.steps, "dev_loss_start": dev_start, "dev_loss_best": best_dev,
               "test_metric": result.metric if result else None, "test_value": result.value if result else None,
               "num_test": len(tested), "train_seconds": round(train_seconds, 2),
               "seconds_per_step": round(train_seconds / ran, 4), "world_size": dist.world_size(),
               "bytes_exchanged_per_step": dist.STEP_TRAFFIC["bytes"] / ran}
    if data.user is not None:
        results.update(own_data_results(data, dev_start, best_dev, objective.name == "loss"))
    results.update(objective.results(dev_start, best_dev, config.reward))
    if is_main:
        run.write_results(results)
        if data.user is not None:
            print(own_data_summary(data, result, dev_start, best_dev, objective) + f"; results in {run.results_file}")
        elif result:
            dev = (f"dev loss {dev_start:.4f} -> best {best_dev:.4f}" if objective.name == "loss" else
                   f"dev {objective.key} {-dev_start:.4f} -> best {-best_dev:.4f}")
            print(f"test {result.metric} {result.value:.4f} on {result.num_examples} examples; {dev}; results in "
                  f"{run.results_file}")
    return results


def is_eval_step(config: TrainConfig, done: int) -> bool:
    return bool(config.eval_every and done % config.eval_every == 0) or done == config.steps


def check_answers_fit(tokenizer, splits: Splits, max_length: int, task: Task) -> None:
    """--max-length keeps the end of each sequence: it must at least hold the longest answer."""
    longest = max((len(tokenizer(c, add_special_tokens=False)["input_ids"])
                   for e in splits.train + splits.dev if not getattr(e, "spans", None)  # spans: cut, not refused
                   for c in e.continuations), default=0)
    if longest >= max_length:
        raise DlzoError(f"--max-length {max_length} is below the longest answer of task {task.name} "
                        f"({longest} tokens); raise it")


def announce(config: TrainConfig, prepared: Prepared, splits: Splits, point: ResumePoint,
             previous: dict | None) -> None:
    scope = prepared.scope
    if prepared.layer_choice:
        print(f"dominant layer {prepared.layer_choice['layer']}: {prepared.layer_choice['reason']}")
        for doubt in prepared.layer_choice.get("doubts", []):
            print(f"warning: the layer choice is doubtful: {doubt}")
    print(f"tuning {scope.description}: {scope.tuned:,} of {scope.total:,} parameters ({100 * scope.fraction:.2f}%), "
          f"{config.optimizer}, {len(splits.train)} train / {len(splits.dev)} dev / {len(splits.test)} test examples")
    for note in splits.notes if config.data else []:
        print(note)
    if previous is not None:
        print(f"resuming {config.out} at step {point.step} ({point.replayed} logged steps re-applied after the "
              f"last checkpoint)")


def run_record(config: TrainConfig, prepared: Prepared, splits: Splits, perturbation: str, device) -> dict:
    scope = prepared.scope
    return {"config": asdict(config), "layer_choice": prepared.layer_choice, "scope": scope.description,
            "tuned_names": scope.names, "tuned_parameters": scope.tuned, "total_parameters": scope.total,
            "perturbation": perturbation, "master_weights": bool(prepared.masters),
            "versions": library_versions(), "device": str(device),
            "world_size": dist.world_size(), "parallel": config.parallel,
            "splits": {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test),
                       "notes": splits.notes}}


def _mean_abs(values: list[float]) -> float:
    return sum(abs(v) for v in values) / max(len(values), 1)

