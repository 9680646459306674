"""`dlzo train`: ZO (or first-order) fine-tuning of a scope of the model on a task.

Run folder layout (OUT):
  run.json           full config, chosen layer and why, seeds, library versions, device
  metrics.jsonl      one line per logged step and per evaluation
  trajectory.jsonl   every step's (step, seeds, projected grads, lr, skipped): `dlzo replay` rebuilds weights
  last.safetensors   tuned tensors at the latest save (resume point), written atomically
  best.safetensors   tuned tensors with the lowest dev loss so far
  final.safetensors  tuned tensors after the last step
  results.json       dev loss start/best, test metric of the best checkpoint, wall time
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dlzo import distributed as dist
from dlzo.checkpoint import atomic_write_json, atomic_write_text, load_tensors, save_tensors
from dlzo.config import option
from dlzo.errors import DlzoError
from dlzo.eval import dev_loss, evaluate
from dlzo.fastpath import BranchedForward
from dlzo.models import load_model, load_tokenizer
from dlzo.scope import SCOPE_HELP, Scope, add_lora, parse_scope, select
from dlzo.scoring import (
    EncodedBatch,
    batch_loss,
    context_limit,
    encode,
    fast_layout,
    loss_from_logprobs,
    token_logprobs,
)
from dlzo.tasks import DATA_DIR_HELP, Example, load_task, task_splits
from dlzo.zo import StepResult, ZOOptimizer


@dataclass
class TrainConfig:
    model: str = option("", "hub id, local folder, .gguf file, or short name (smollm2-135m, stories260k)")
    task: str = option("sst2", "task name: sst2 rte cb boolq wsc wic multirc copa record squad drop")
    data_dir: str = option("../shared/data", DATA_DIR_HELP)
    out: str = option("runs/train", "run folder for checkpoints, logs and results")
    resume: str = option("", "continue the interrupted run in this folder (same arguments, --out included)")
    scope: str = option("dominant", SCOPE_HELP)
    params: str = option("all", "tensors inside the tuned layers: all, mlp, attn, or a regex over names")
    optimizer: str = option("zo", "zo (SPSA, forward only) or adamw (first-order reference, backpropagation)")
    steps: int = option(1000, "optimisation steps")
    batch_size: int = option(16, "examples per step (MeZO: 16)")
    grad_accum: int = option(1, "micro-batches per step; ZO uses one z across them")
    lr: float = option(1e-6, "learning rate, constant (MeZO's schedule)")
    eps: float = option(1e-3, "ZO perturbation scale epsilon")
    q: int = option(1, "ZO directions per step (the projected gradients are averaged)")
    parallel: str = option("data", "with several ranks: data (shard the batch) or perturbation (split the q directions)")
    device_map: str = option("", "'auto' spreads one model over this machine's GPUs (forward only, all ZO needs)")
    weight_decay: float = option(0.0, "weight decay (never on biases and norms)")
    distribution: str = option("gaussian", "ZO direction distribution: gaussian or rademacher")
    seed: int = option(0, "run seed: ZO directions and data order")
    data_seed: int = option(0, "seed of the train/dev/test sampling (MeZO's train_set_seed)")
    num_train: int = option(1000, "training examples sampled from the official train split")
    num_dev: int = option(-1, "dev examples (-1: the task's MeZO default, 500 or 100)")
    num_test: int = option(1000, "test examples sampled from the official validation split")
    eval_every: int = option(100, "evaluate dev loss (and save) every N steps; 0: only at the end")
    eval_batch_size: int = option(32, "batch size for dev loss and test evaluation")
    fast_path: bool = option(True, "shared prefix, batched ±ε branches, answer-only logits, packed candidates")
    exact_restore_fraction: float = option(0.1, "restore by copy when the scope is at most this fraction of the model")
    max_nonfinite: int = option(5, "stop after this many non-finite losses in a row")
    lora_r: int = option(8, "LoRA rank for --scope lora / dominant-lora")
    lora_alpha: int = option(16, "LoRA alpha")
    max_length: int = option(1024, "truncate prompts from the left to this many tokens")
    dtype: str = option("auto", "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    device: str = option("auto", "auto, cpu, cuda, ...")
    trust_remote_code: bool = option(False, "allow model code from the hub to run")
    quiet: bool = option(False, "no progress bar")

    def validate(self) -> None:
        if not self.model:
            raise DlzoError("--model is required")
        for name in ("steps", "batch_size", "grad_accum", "q"):
            if getattr(self, name) < 1:
                raise DlzoError(f"--{name.replace('_', '-')} must be at least 1")
        if self.optimizer not in ("zo", "adamw"):
            raise DlzoError(f"--optimizer {self.optimizer!r} is not zo or adamw")
        if self.batch_size % self.grad_accum:
            raise DlzoError("--batch-size must be a multiple of --grad-accum")
        if self.eps <= 0:
            raise DlzoError("--eps must be positive")
        if self.parallel not in ("data", "perturbation"):
            raise DlzoError(f"--parallel {self.parallel!r} is not data or perturbation")


# --------------------------------------------------------------------------------------------- data order


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> list[int]:
    """The examples of a step: a pure function of the step, so a resumed run sees the same batches."""
    per_epoch = max(num_examples // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    order = np.random.RandomState((seed * 1_000_003 + epoch) % 2**32).permutation(num_examples)
    return order[offset * batch_size : (offset + 1) * batch_size].tolist()


# --------------------------------------------------------------------------------------------- the ZO step


class StepRunner:
    """Evaluates the training loss of a step's micro-batches, plain or through the fast path."""

    def __init__(self, model: nn.Module, scope: Scope, fast_path: bool, average_across_ranks: bool = True):
        self.model, self.fast, self.average = model, fast_path, average_across_ranks
        self.branched = BranchedForward(model, scope.names) if fast_path and scope.layers else None

    def loss(self, batches: list[EncodedBatch]) -> float:
        losses = [float(batch_loss(self.model, b, full_logits=not self.fast)) for b in batches]
        local = sum(losses) / len(losses)
        return dist.mean_across_ranks(local) if self.average else local

    def loss_pair(self, batches: list[EncodedBatch], plus, minus) -> tuple[float, float]:
        pairs = [self.branched.loss_pair(b, plus, minus) for b in batches]
        local = (sum(float(p) for p, _ in pairs) / len(pairs), sum(float(m) for _, m in pairs) / len(pairs))
        return dist.mean_pair_across_ranks(local) if self.average else local


def zo_step(optimizer: ZOOptimizer, runner: StepRunner, batches: list[EncodedBatch],
            directions: list[int] | None = None) -> StepResult:
    """One SPSA step: L(θ±εz) on the batches, g = (L+ - L-)/2ε, θ -= lr·g·z.

    With `directions` (perturbation parallel) this rank evaluates only those; all ranks then gather every
    direction's (g, L+, L-) and apply the same updates in direction order."""
    update = directions is None
    if runner.branched is not None:
        result = optimizer.step_functional(lambda plus, minus: runner.loss_pair(batches, plus, minus),
                                           directions, update)
    else:
        result = optimizer.step(lambda: runner.loss(batches), directions, update)
    if update:
        return result
    grads, plus, minus = dist.gather_directions(optimizer.q, directions, result.projected_grads,
                                                result.loss_plus, result.loss_minus)
    return optimizer.finish(StepResult(optimizer.seeds_for_step(optimizer.step_count), grads, plus, minus))


# --------------------------------------------------------------------------------------------- setup


def library_versions() -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def choose_dominant_layer(model, tokenizer, train: list[Example], eps: float, quiet: bool = False,
                          device=None) -> tuple[int, str]:
    """The probe's layer; when the probe finds no outlier layer, the most perturbation-sensitive layer."""
    from dlzo.analysis import QUICK_SENSITIVITY, layer_sensitivity, leading_batches
    from dlzo.probe import find_dominant_layer

    texts = [e.prompt + e.continuations[e.label] for e in train[:64]]
    result = find_dominant_layer(model, tokenizer, texts)
    if result.dominant_layer is not None:
        s = result.layers[result.dominant_layer]
        return result.dominant_layer, (f"probe: first layer with massive activations "
                                       f"(max|h| {s.max_abs:.3g}, {s.ratio:.3g}x the median)")
    batches = leading_batches(model, tokenizer, train, QUICK_SENSITIVITY["batch_size"], QUICK_SENSITIVITY["batches"],
                              device)
    sensitivity = layer_sensitivity(model, batches, eps=eps, seeds=QUICK_SENSITIVITY["seeds"])
    best = max(sensitivity, key=lambda s: s.mean)
    return best.layer, ("probe found no massive activations; fell back to the most perturbation-sensitive layer "
                        f"(mean |L+ - L-|/2eps = {best.mean:.3g}, layers: "
                        + ", ".join(f"{s.layer}:{s.mean:.3g}" for s in sensitivity) + ")")


@dataclass
class Prepared:
    model: nn.Module
    tokenizer: object
    scope: Scope
    layer_choice: dict


def prepare_model(config: TrainConfig, train_examples: list[Example], layer_choice: dict | None = None) -> Prepared:
    """Load the model and resolve the scope; a resumed run reuses its recorded dominant layer."""
    model = load_model(config.model, dtype=config.dtype, device=config.device,
                       trust_remote_code=config.trust_remote_code, device_map=config.device_map or None)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    spec = parse_scope(config.scope)
    layers = spec.layers
    choice = layer_choice or {}
    if spec.needs_dominant_layer:
        if "layer" not in choice:
            layer, reason = choose_dominant_layer(model, tokenizer, train_examples, config.eps, config.quiet)
            choice = {"layer": layer, "reason": reason}
        layers = [choice["layer"]]
    if spec.uses_lora:
        torch.manual_seed(config.seed)  # LoRA's A is random: replay and resume must rebuild the same adapters
        model = add_lora(model, layers if spec.kind == "dominant-lora" else None, config.lora_r, config.lora_alpha)
    scope = select(model, spec, layers, config.params)
    return Prepared(model, tokenizer, scope, choice)


def tuned_tensors(model: nn.Module, scope: Scope) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name] for name in scope.names}


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def _truncate_jsonl(path: Path, keep) -> None:
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip() and keep(json.loads(line))]
        atomic_write_text(path, "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------------------------- training


def train(config: TrainConfig) -> dict:
    """Run (or resume) a training job and return its results."""
    if config.resume:
        if config.out != TrainConfig.out and Path(config.out) != Path(config.resume):
            raise DlzoError(f"--resume {config.resume} and --out {config.out} name different folders")
        config.out = config.resume
    config.validate()
    out = Path(config.out)
    run_file = out / "run.json"
    previous = None
    if config.resume:
        if not run_file.exists():
            raise DlzoError(f"--resume {out}: no run.json there, nothing to resume")
        previous = json.loads(run_file.read_text())
        differing = {k: (previous["config"].get(k), v) for k, v in asdict(config).items()
                     if k not in ("resume", "quiet", "out", "steps") and previous["config"].get(k) != v}
        if differing:
            name, (was, now) = next(iter(differing.items()))
            raise DlzoError(f"--resume {out}: --{name.replace('_', '-')} was {was!r} in that run, now {now!r}")
    elif (out / "trajectory.jsonl").exists():
        raise DlzoError(f"--out {out} already holds a run; pass --resume {out} to continue it, or another --out")

    task = load_task(config.task, config.data_dir)
    splits = task_splits(task, config.data_seed, config.num_train, None if config.num_dev < 0 else config.num_dev,
                         config.num_test)
    if not splits.train:
        raise DlzoError(f"task {task.name} has no training examples with these settings")
    prepared = prepare_model(config, splits.train, previous.get("layer_choice") if previous else None)
    model, tokenizer, scope = prepared.model, prepared.tokenizer, prepared.scope
    device = next(model.parameters()).device
    is_main = dist.is_main_process()
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if prepared.layer_choice:
            print(f"dominant layer {prepared.layer_choice['layer']}: {prepared.layer_choice['reason']}")
        print(f"tuning {scope.description}: {scope.tuned:,} of {scope.total:,} parameters "
              f"({100 * scope.fraction:.2f}%), {config.optimizer}, {len(splits.train)} train / "
              f"{len(splits.dev)} dev / {len(splits.test)} test examples")

    exact = scope.fraction <= config.exact_restore_fraction
    functional = config.optimizer == "zo" and config.fast_path and bool(scope.layers)
    perturbation = "functional" if functional else ("copy" if exact else "arithmetic")
    tensors = tuned_tensors(model, scope)
    start_step, best_dev = 0, math.inf
    if previous is not None:
        if (out / "last.safetensors").exists():
            from safetensors import safe_open

            load_into(model, load_tensors(out / "last.safetensors"))
            with safe_open(str(out / "last.safetensors"), "pt") as handle:
                meta = handle.metadata()
            start_step, best_dev = int(meta["step"]), float(meta["best_dev_loss"])
        if is_main:  # drop what the interrupted run logged after its last checkpoint
            _truncate_jsonl(out / "trajectory.jsonl", lambda r: r["step"] < start_step)
            _truncate_jsonl(out / "metrics.jsonl", lambda r: 0 < start_step and (
                r["step"] < start_step or (r["step"] == start_step and "dev_loss" in r)))
            print(f"resuming {out} at step {start_step}")

    record = {
        "config": asdict(config), "layer_choice": prepared.layer_choice, "scope": scope.description,
        "tuned_names": scope.names, "tuned_parameters": scope.tuned, "total_parameters": scope.total,
        "perturbation": perturbation, "versions": library_versions(), "device": str(device),
        "world_size": dist.world_size(), "parallel": config.parallel, "splits": {"train": len(splits.train), "dev": len(splits.dev),
                                                    "test": len(splits.test), "notes": splits.notes},
    }
    if is_main:
        atomic_write_json(run_file, record)

    def evaluate_dev() -> float:
        return dev_loss(model, tokenizer, splits.dev or splits.train[:100], config.eval_batch_size,
                        task.generation, context_limit(model, config.max_length))

    def save(name: str, step: int, best: float) -> None:
        if is_main:
            save_tensors(out / name, tensors, {"step": str(step), "best_dev_loss": repr(best),
                                               "scope": scope.description, "model": config.model})

    if start_step == 0:
        dev_start = evaluate_dev()
        best_dev = dev_start
        save("best.safetensors", 0, best_dev)
        if is_main:
            _append_jsonl(out / "metrics.jsonl", {"step": 0, "dev_loss": dev_start})
    else:
        dev_start = next(json.loads(line)["dev_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                         if '"dev_loss"' in line)

    zo = None
    if config.optimizer == "zo":
        zo = ZOOptimizer(list(tensors.items()), lr=config.lr, eps=config.eps, q=config.q,
                         weight_decay=config.weight_decay, seed=config.seed, distribution=config.distribution,
                         exact_restore=exact)
        zo.step_count = start_step
        split_directions = config.parallel == "perturbation" and dist.world_size() > 1
        runner = StepRunner(model, scope, config.fast_path, average_across_ranks=not split_directions)
        my_directions = [d for d in range(config.q) if d % dist.world_size() == dist.rank()] if split_directions else None
    else:
        if config.resume and start_step:
            raise DlzoError("--resume is supported for ZO runs only (AdamW state is not checkpointed)")
        adam = torch.optim.AdamW(list(tensors.values()), lr=config.lr, weight_decay=config.weight_decay)

    layout = fast_layout(model, tokenizer, config.fast_path)
    max_length = context_limit(model, config.max_length)
    rank, world = dist.rank(), dist.world_size()
    nonfinite_in_a_row = 0
    dist.STEP_TRAFFIC["bytes"] = 0
    started = time.time()
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, disable=config.quiet or not is_main,
               desc=f"{config.optimizer} {scope.description}", dynamic_ncols=True)
    for step in bar:
        indices = batch_indices(step, len(splits.train), config.batch_size, config.seed)
        examples = [splits.train[i] for i in indices]
        shard = examples[rank::world] if world > 1 and config.parallel == "data" else examples
        local_micro = max(len(shard) // config.grad_accum, 1)
        batches = [encode(tokenizer, shard[i : i + local_micro], pack_single_token=config.fast_path,
                          max_length=max_length, generation=task.generation, layout=layout).to(device)
                   for i in range(0, len(shard), local_micro)]
        if zo is not None:
            result = zo_step(zo, runner, batches, my_directions)
            loss, skipped = result.loss, result.skipped
            if is_main:
                _append_jsonl(out / "trajectory.jsonl", {"step": step, "seeds": [str(s) for s in result.seeds],
                                                        "grads": result.projected_grads, "lr": config.lr,
                                                        "skipped": skipped})
        else:
            loss, skipped = _adamw_step(model, adam, batches, list(tensors.values()))
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
        if nonfinite_in_a_row >= config.max_nonfinite:
            raise DlzoError(
                f"{nonfinite_in_a_row} non-finite losses in a row at step {step}: the forward overflowed, most "
                f"likely float16 collapse; use --dtype bfloat16 or float32, or a smaller --lr / --eps")
        if is_main:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{config.lr:.1e}")
            if step % 10 == 0 or step == config.steps - 1:
                _append_jsonl(out / "metrics.jsonl", {"step": step, "loss": loss, "lr": config.lr,
                                                      "elapsed_s": round(time.time() - started, 3)})
        done = step + 1
        if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
            current = evaluate_dev()
            if current < best_dev:
                best_dev = current
                save("best.safetensors", done, best_dev)
            save("last.safetensors", done, best_dev)
            if is_main:
                _append_jsonl(out / "metrics.jsonl", {"step": done, "dev_loss": current, "best_dev_loss": best_dev})
    bar.close()
    train_seconds = time.time() - started
    save("final.safetensors", config.steps, best_dev)
    dist.barrier()

    # Test the checkpoint with the lowest dev loss, as the paper does.
    load_into(model, load_tensors(out / "best.safetensors"))
    test = evaluate(model, tokenizer, task, splits.test, config.eval_batch_size,
                    max_length=context_limit(model, config.max_length),
                    quiet=config.quiet or not is_main) if splits.test else None
    results = {"task": task.name, "scope": scope.description, "optimizer": config.optimizer,
               "layer": prepared.layer_choice.get("layer") if prepared.layer_choice else
               (scope.layers[0] if len(scope.layers) == 1 else None),
               "steps": config.steps, "dev_loss_start": dev_start, "dev_loss_best": best_dev,
               "test_metric": test.metric if test else None, "test_value": test.value if test else None,
               "num_test": len(splits.test), "train_seconds": round(train_seconds, 2),
               "seconds_per_step": round(train_seconds / max(config.steps - start_step, 1), 4),
               "world_size": dist.world_size(), "bytes_exchanged_per_step": dist.STEP_TRAFFIC["bytes"] / max(config.steps - start_step, 1)}
    if is_main:
        atomic_write_json(out / "results.json", results)
        if test:
            print(f"test {test.metric} {test.value:.4f} on {test.num_examples} examples; dev loss {dev_start:.4f} -> "
                  f"best {best_dev:.4f}; results in {out / 'results.json'}")
    return results


def _adamw_step(model, adam, batches, params) -> tuple[float, bool]:
    """First-order reference: backpropagation through the same loss."""
    model.train(False)  # no dropout, same loss as the ZO runs
    adam.zero_grad(set_to_none=True)
    total = 0.0
    with torch.enable_grad():
        for batch in batches:
            loss = loss_from_logprobs(batch, token_logprobs(model, batch)) / len(batches)
            loss.backward()
            total += float(loss.detach())
    if not math.isfinite(total):
        return total, True
    dist.average_gradients(params)
    adam.step()
    return total, False


# --------------------------------------------------------------------------------------------- replay/export


def _rebuild(run: Path, base_model: str | None) -> tuple[Prepared, dict]:
    record = json.loads((run / "run.json").read_text())
    config = TrainConfig(**{**record["config"], "model": base_model or record["config"]["model"], "quiet": True})
    prepared = prepare_model(config, [], record.get("layer_choice"))
    return prepared, record


def replay(run: str | Path, base_model: str | None = None, upto: int | None = None) -> dict[str, torch.Tensor]:
    """Rebuild the tuned tensors from the base model and the trajectory log alone."""
    run = Path(run)
    prepared, record = _rebuild(run, base_model)
    config = record["config"]
    tensors = tuned_tensors(prepared.model, prepared.scope)
    zo = ZOOptimizer(list(tensors.items()), lr=config["lr"], eps=config["eps"], q=config["q"],
                     weight_decay=config["weight_decay"], seed=config["seed"], distribution=config["distribution"])
    arithmetic = record["perturbation"] == "arithmetic"
    with torch.no_grad():
        for line in (run / "trajectory.jsonl").read_text().splitlines():
            entry = json.loads(line)
            if upto is not None and entry["step"] >= upto:
                break
            seeds = [int(s) for s in entry["seeds"]]
            if arithmetic:  # the in-place +ε, -2ε, +ε round trip leaves float rounding we must repeat
                for seed in seeds:
                    zo._add_noise(seed, zo.eps)
                    zo._add_noise(seed, -2 * zo.eps)
                    zo._add_noise(seed, zo.eps)
            if not entry["skipped"]:
                zo.lr = entry["lr"]
                zo.apply_update(seeds, entry["grads"])
    return {name: t.detach().clone() for name, t in tensors.items()}


def export(run: str | Path, to: str | Path, which: str = "best") -> Path:
    """Write a merged Hugging Face folder (base weights + tuned tensors, LoRA merged) that plain transformers loads."""
    run = Path(run)
    checkpoint = run / f"{which}.safetensors"
    if not checkpoint.exists():
        raise DlzoError(f"--run {run}: {checkpoint.name} not found")
    prepared, _ = _rebuild(run, None)
    load_into(prepared.model, load_tensors(checkpoint))
    model = prepared.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    to = Path(to)
    model.save_pretrained(to, safe_serialization=True)
    prepared.tokenizer.save_pretrained(to)
    return to
