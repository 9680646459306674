"""Evaluation: rank candidates by mean answer log-probability (accuracy), or generate greedily (F1/EM)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dlzo import distributed as dist
from dlzo.checkpoint import atomic_write_json
from dlzo.errors import DlzoError
from dlzo.models import load_model, load_tokenizer
from dlzo.options import EvalConfig
from dlzo.run import load_checkpoint_of_run
from dlzo.scoring import (
    candidate_scores,
    context_limit,
    encode,
    fast_layout,
    per_example_losses,
    token_logprobs,
)
from dlzo.tasks import Example, Task, best_over_answers, exact_match, f1_score, load_task, task_splits

DEMO_SEPARATOR = "\n\n"


@dataclass
class EvalResult:
    task: str
    metric: str
    value: float
    num_examples: int
    exact_match: float | None = None

    def to_json(self) -> dict:
        data = {"task": self.task, "metric": self.metric, "value": self.value, "num_examples": self.num_examples}
        if self.exact_match is not None:
            data["exact_match"] = self.exact_match
        return data


def demonstrations(train: list[Example], k: int, seed: int) -> str:
    """K solved training examples, each followed by a blank line (MeZO's train_sep)."""
    if k <= 0:
        return ""
    order = np.random.RandomState(seed).permutation(len(train))[:k]
    return "".join(train[i].prompt + train[i].continuations[train[i].label] + DEMO_SEPARATOR for i in order)


def _batches(items: list, size: int, label: str, quiet: bool):
    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=label, disable=quiet or len(starts) < 4, leave=False):
        yield items[start : start + size]


@torch.no_grad()
def dev_loss(model: nn.Module, tokenizer, examples: list[Example], batch_size: int = 32, generation: bool = False,
             max_length: int = 2048, quiet: bool = True) -> float:
    """Mean per-example training loss over the examples (the trainer keeps the checkpoint minimising it)."""
    device = next(model.parameters()).device
    layout = fast_layout(model, tokenizer)
    total = 0.0
    for chunk in _batches(_shard(examples), batch_size, "dev loss", quiet):
        batch = encode(tokenizer, chunk, max_length=max_length, generation=generation, layout=layout).to(device)
        total += float(per_example_losses(batch, token_logprobs(model, batch)).sum())
    return dist.sum_across_ranks([total])[0] / len(examples)


def _shard(examples: list) -> list:
    """This rank's share of an evaluation set (all of it in a single process)."""
    return examples[dist.rank() :: dist.world_size()]


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, task: Task, examples: list[Example], batch_size: int = 16,
             demos: str = "", max_length: int = 2048, quiet: bool = False) -> EvalResult:
    model.eval()
    max_length = context_limit(model, max_length)
    if task.generation:
        tokenizer.truncation_side = "left"
        return _evaluate_generation(model, tokenizer, task, examples, batch_size, demos, max_length, quiet)
    device = next(model.parameters()).device
    layout = fast_layout(model, tokenizer)
    correct = 0
    for chunk in _batches(_shard(examples), batch_size, f"eval {task.name}", quiet):
        batch = encode(tokenizer, chunk, max_length=max_length, demonstrations=demos, layout=layout).to(device)
        predictions = candidate_scores(batch, token_logprobs(model, batch)).argmax(-1).tolist()
        correct += sum(p in (e.correct or [e.label]) for p, e in zip(predictions, chunk))
    correct = dist.sum_across_ranks([float(correct)])[0]
    return EvalResult(task.name, "accuracy", correct / len(examples), len(examples))


def _evaluate_generation(model, tokenizer, task, examples, batch_size, demos, max_length, quiet) -> EvalResult:
    device = next(model.parameters()).device
    f1_total = em_total = 0.0
    for chunk in _batches(_shard(examples), batch_size, f"generate {task.name}", quiet):
        prompts = [demos + e.prompt for e in chunk]
        # Keep the end of the prompt (the question) and leave room for the answer.
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                           max_length=max(max_length - 50, 8)).to(device)
        output = model.generate(**inputs, max_new_tokens=50, do_sample=False, use_cache=True,
                                pad_token_id=tokenizer.pad_token_id)
        for example, row in zip(chunk, output[:, inputs["input_ids"].shape[1] :]):
            text = tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip()
            f1_total += best_over_answers(f1_score, text, example.answers)
            em_total += best_over_answers(exact_match, text, example.answers)
    f1_total, em_total = dist.sum_across_ranks([f1_total, em_total])
    return EvalResult(task.name, "f1", f1_total / len(examples), len(examples), exact_match=em_total / len(examples))


def eval_command(config: EvalConfig) -> EvalResult:
    """`dlzo eval`: zero-shot, in-context (--icl K) or a trained run (--run) on a task's test examples."""
    task = load_task(config.task, config.data_dir)
    splits = task_splits(task, config.data_seed, num_test=config.num_test)
    if config.run:
        prepared = load_checkpoint_of_run(config.run, config.checkpoint, config.model or None)
        model, tokenizer = prepared.model, prepared.tokenizer
    else:
        if not config.model:
            raise DlzoError("--model is required (or --run to evaluate a trained run)")
        model = load_model(config.model, dtype=config.dtype, device=config.device,
                           trust_remote_code=config.trust_remote_code)
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    demos = demonstrations(splits.train, config.icl, config.data_seed)
    result = evaluate(model, tokenizer, task, splits.test, config.batch_size, demos=demos)
    out = Path(config.out)
    atomic_write_json(out / "eval.json", {**result.to_json(), "icl": config.icl, "model": config.model,
                                          "run": config.run})
    print(f"{task.name} {result.metric}: {result.value:.4f} on {result.num_examples} examples "
          f"({config.icl}-shot); wrote {out / 'eval.json'}")
    return result
