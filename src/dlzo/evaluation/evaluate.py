"""Evaluation: rank candidates by mean answer log-probability (accuracy), or generate greedily (F1/EM); the dev
loss a run chooses its checkpoint on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dlzo.data.benchmarks import Task
from dlzo.data.examples import Example
from dlzo.data.metrics import best_over_answers, exact_match, f1_score
from dlzo.engine import distributed as dist
from dlzo.engine.prefix import FrozenPrefix
from dlzo.engine.scoring import (
    EncodedBatch,
    candidate_scores,
    context_limit,
    encode,
    fast_layout,
    per_example_losses,
    token_logprobs,
)

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


def dev_batches(model: nn.Module, tokenizer, examples: list[Example], batch_size: int = 32, generation: bool = False,
                max_length: int = 2048, quiet: bool = True) -> Iterator[EncodedBatch]:
    """The batches `dev_loss` reads (this rank's share of the examples), encoded as it encodes them."""
    device = next(model.parameters()).device
    layout = fast_layout(model, tokenizer)
    for chunk in _batches(_shard(examples), batch_size, "dev loss", quiet):
        yield encode(tokenizer, chunk, max_length=max_length, generation=generation, layout=layout).to(device)


@torch.no_grad()
def dev_loss(model: nn.Module, tokenizer, examples: list[Example], batch_size: int = 32, generation: bool = False,
             max_length: int = 2048, quiet: bool = True, per_token: bool = False,
             frozen: FrozenPrefix | None = None) -> float:
    """Mean per-example training loss over the examples (the trainer keeps the checkpoint minimising it).
    `per_token`: the mean negative log-likelihood of every scored token instead (your own generation data:
    its exp is the perplexity). `frozen`: a run's frozen-prefix cache, so the layers below the tuned one are
    not run again (the dev batches are the same at every evaluation)."""
    total = tokens = 0.0
    for batch in dev_batches(model, tokenizer, examples, batch_size, generation, max_length, quiet):
        with frozen.applied(batch) if frozen is not None else contextlib.nullcontext():
            logprobs = token_logprobs(model, batch)
        if per_token:
            total, tokens = total - float(logprobs.double().sum()), tokens + logprobs.numel()
            continue
        total += float(per_example_losses(batch, logprobs).sum())
    if per_token:
        total, tokens = dist.sum_across_ranks([total, tokens])
        return total / tokens
    return dist.sum_across_ranks([total])[0] / len(examples)


def perplexity(loss: float) -> float:
    """exp of a mean token loss (inf where it would overflow)."""
    return math.exp(loss) if loss < 700 else math.inf


def _shard(examples: list) -> list:
    """This rank's share of an evaluation set (all of it in a single process)."""
    return examples[dist.rank() :: dist.world_size()]


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, task: Task, examples: list[Example], batch_size: int = 16,
             demos: str = "", max_length: int = 2048, quiet: bool = False, max_new_tokens: int = 50) -> EvalResult:
    model.eval()
    max_length = context_limit(model, max_length)
    if task.generation:
        tokenizer.truncation_side = "left"
        return _evaluate_generation(model, tokenizer, task, examples, batch_size, demos, max_length, quiet,
                                    max_new_tokens)
    device = next(model.parameters()).device
    layout = fast_layout(model, tokenizer)
    correct = 0
    for chunk in _batches(_shard(examples), batch_size, f"eval {task.name}", quiet):
        batch = encode(tokenizer, chunk, max_length=max_length, demonstrations=demos, layout=layout).to(device)
        predictions = candidate_scores(batch, token_logprobs(model, batch)).argmax(-1).tolist()
        correct += sum(p in (e.correct or [e.label]) for p, e in zip(predictions, chunk))
    correct = dist.sum_across_ranks([float(correct)])[0]
    return EvalResult(task.name, "accuracy", correct / len(examples), len(examples))


def _evaluate_generation(model, tokenizer, task, examples, batch_size, demos, max_length, quiet,
                         max_new_tokens: int = 50) -> EvalResult:
    device = next(model.parameters()).device
    f1_total = em_total = 0.0
    for chunk in _batches(_shard(examples), batch_size, f"generate {task.name}", quiet):
        prompts = [demos + e.prompt for e in chunk]
        # Keep the end of the prompt (the question) and leave room for the answer.
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                           max_length=max(max_length - max_new_tokens, 8)).to(device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                pad_token_id=tokenizer.pad_token_id)
        for example, row in zip(chunk, output[:, inputs["input_ids"].shape[1] :]):
            text = tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip()
            f1_total += best_over_answers(f1_score, text, example.answers)
            em_total += best_over_answers(exact_match, text, example.answers)
    f1_total, em_total = dist.sum_across_ranks([f1_total, em_total])
    return EvalResult(task.name, "f1", f1_total / len(examples), len(examples), exact_match=em_total / len(examples))


@torch.no_grad()
def classification_scores(model: nn.Module, tokenizer, examples: list[Example], batch_size: int,
                          max_length: int) -> tuple[float, float]:
    """(mean cross-entropy over the options, accuracy) of classification rows in one pass: the numbers of
    dev_loss and evaluate, from the same forward."""
    device = next(model.parameters()).device
    layout = fast_layout(model, tokenizer)
    loss = correct = 0.0
    for chunk in _batches(examples, batch_size, "eval", True):
        batch = encode(tokenizer, chunk, max_length=max_length, layout=layout).to(device)
        logprobs = token_logprobs(model, batch)
        loss += float(per_example_losses(batch, logprobs).sum())
        predictions = candidate_scores(batch, logprobs).argmax(-1).tolist()
        correct += sum(p in (e.correct or [e.label]) for p, e in zip(predictions, chunk))
    return loss / len(examples), correct / len(examples)


def own_eval_line(result: dict) -> str:
    if "mean_reward" in result:  # dlzo eval --reward
        return f"{result['data']} ({result['rows']}): mean reward {result['mean_reward']:.4f} by {result['reward']}"
    parts = [f"{result['data']} ({result['format']}, {result['rows']}):"]
    if "perplexity" in result:
        parts.append(f"loss {result['loss']:.4f} per token, perplexity {result['perplexity']:.3f}")
    else:
        parts.append(f"accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}")
    if "exact_match" in result:
        parts.append(f"; greedy exact match {result['exact_match']:.4f}, F1 {result['f1']:.4f}")
    return " ".join(parts).replace(" ;", ";")

