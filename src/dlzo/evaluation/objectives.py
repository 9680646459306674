"""What a run maximizes when it is not the loss: accuracy, F1 or exact match (`--objective`), or a reward of your
own (`--reward`). None of them has a gradient; a ZO step needs none.

The ZO step gets the negated metric as its loss, L = -metric: g = (L+ - L-)/2ε keeps its meaning (the update
lowers L, so it raises the metric), the trajectory logs g as for the loss, and replay and resume stay bit-exact.
The dev set's -metric is the run's dev loss (the best checkpoint has the lowest, so the highest metric), and the
metric itself is logged beside it (metrics.jsonl: dev_accuracy, dev_f1 and dev_exact_match, dev_reward;
trajectory.jsonl: the metric of each branch).

- accuracy: the candidates' scores of both branches come from the fast path's forward of 2B rows (the loss's own
  forward, dlzo.engine.fastpath), a correct example being one whose labelled candidate scores highest.
- f1, exact-match: greedy completions of both branches (dlzo.evaluation.branched_generation: one batch of 2B rows),
  their first line scored against the answers as `dlzo eval` scores them (SQuAD's normalisation).
- reward: completions of both branches (greedy; --temperature T samples them with the same random numbers for both),
  scored by the function (dlzo.evaluation.rewards); a chat model's prompts go through its chat template.

`GenerationRunner` evaluates these from completions where dlzo.training.step.StepRunner evaluates the loss.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from dlzo.choices import GENERATED
from dlzo.data.examples import Example
from dlzo.data.metrics import best_over_answers, exact_match, f1_score
from dlzo.engine import distributed as dist
from dlzo.engine.prefix import FrozenPrefix
from dlzo.engine.scoring import (
    EncodedBatch,
    candidate_scores,
    context_limit,
    loss_from_logprobs,
    per_example_losses,
    token_logprobs,
)
from dlzo.errors import DlzoError
from dlzo.evaluation.branched_generation import BranchedLeaves, SharedNoise, complete, tuned_in
from dlzo.evaluation.evaluate import dev_batches
from dlzo.evaluation.generation import chat_prompt
from dlzo.evaluation.rewards import Reward, load_reward


def accuracy_loss(batch: EncodedBatch, logprobs: torch.Tensor) -> torch.Tensor:
    """-accuracy of a batch: the fraction of its examples whose labelled candidate scores highest (a tie goes to
    the first candidate, as argmax); ReCoRD's other correct candidates do not count here."""
    predictions = candidate_scores(batch, logprobs).argmax(-1)
    return -(predictions == batch.labels).double().mean()


def answer_text(completion: str) -> str:
    """The part of a completion scored against the answers: its first line, stripped (as `dlzo eval` reads it)."""
    return completion.split("\n")[0].strip()


@dataclass
class RunObjective:
    """A run's objective: `name` (loss, accuracy, f1, exact-match or reward) and its reward function."""

    name: str = "loss"
    reward: Reward | None = None
    last_dev: dict = field(default_factory=dict)  # the metrics of the latest dev evaluation, for the log

    @property
    def key(self) -> str:
        """The metric's name in logs and results."""
        return self.name.replace("-", "_")

    @property
    def generates(self) -> bool:
        return self.name in (*GENERATED, "reward")

    def score(self, batch: EncodedBatch, logprobs: torch.Tensor) -> torch.Tensor:
        """The step's loss from a forward's scored log-probabilities (loss and accuracy)."""
        return accuracy_loss(batch, logprobs) if self.name == "accuracy" else loss_from_logprobs(batch, logprobs)

    def scores(self, examples: list[Example], completions: list[str]) -> list[float]:
        """The metric of each completion (f1, exact match, reward)."""
        if self.reward is not None:
            rows = [getattr(e, "row", {"prompt": e.prompt}) for e in examples]
            where = [getattr(e, "where", "") or f"row {i + 1} of the batch" for i, e in enumerate(examples)]
            return self.reward([e.prompt for e in examples], completions, rows, where)
        metric = f1_score if self.name == "f1" else exact_match
        return [best_over_answers(metric, answer_text(text), e.answers or [e.continuations[e.label].strip()])
                for e, text in zip(examples, completions)]

    def logged(self, loss: float, prefix: str = "") -> dict:
        """The metric beside a (negated) loss in metrics.jsonl; nothing for the loss itself."""
        return {} if self.name == "loss" else {prefix + self.key: 0.0 - loss}  # (0.0 - x: never -0.0)

    def step_logged(self, plus: list[float], minus: list[float]) -> dict:
        """The metric of each branch (each direction), for trajectory.jsonl."""
        if self.name == "loss":
            return {}
        return {f"{self.key}_plus": [0.0 - v for v in plus], f"{self.key}_minus": [0.0 - v for v in minus]}

    def results(self, dev_start: float, best_dev: float, spec: str = "") -> dict:
        """What results.json adds: the objective and its dev metric before training and at the chosen checkpoint."""
        if self.name == "loss":
            return {}
        if self.name == "reward":
            return {"objective": "reward", "reward": spec, "reward_start": 0.0 - dev_start, "reward_best": 0.0 - best_dev}
        return {"objective": self.name, f"dev_{self.key}_start": 0.0 - dev_start, f"dev_{self.key}_best": 0.0 - best_dev}


def objective_for(config, task) -> RunObjective:
    """The run's objective, checked against its task (the reward function is loaded here: a broken file is one
    line before anything is written)."""
    if config.reward:
        return RunObjective("reward", load_reward(config.reward))
    name = config.objective
    generation = task.generation
    if name == "accuracy" and generation:
        raise DlzoError(f"--objective accuracy ranks the options of a classification task; {task.name} is "
                        f"generation data: use f1 or exact-match")
    if name in GENERATED and (not generation or getattr(task, "format", "") == "text"):
        what = "text rows have no prompt to continue" if generation else f"{task.name} is a classification task"
        raise DlzoError(f"--objective {name} compares completions with the answers; {what}: use "
                        f"{'loss' if generation else 'accuracy'}")
    return RunObjective(name)


def prompt_text(tokenizer, example: Example, chat: bool) -> str:
    return chat_prompt(tokenizer, example.prompt) if chat else example.prompt


def uses_chat(objective: RunObjective, tokenizer) -> bool:
    """A reward's prompts are the user's words: a model with a chat template gets them as a user turn."""
    return objective.reward is not None and bool(getattr(tokenizer, "chat_template", None))


@torch.no_grad()
def generated_metrics(objective: RunObjective, model: nn.Module, tokenizer, examples: list[Example], batch_size: int,
                      max_length: int, max_new_tokens: int) -> dict[str, float]:
    """Greedy completions of every example scored: {reward} or {f1, exact_match} (means over the examples)."""
    chat, totals = uses_chat(objective, tokenizer), {}
    names = ("reward",) if objective.reward is not None else ("f1", "exact-match")
    shard = examples[dist.rank() :: dist.world_size()]
    for start in range(0, len(shard), batch_size):
        chunk = shard[start : start + batch_size]
        texts = complete(model, tokenizer, [prompt_text(tokenizer, e, chat) for e in chunk],
                         max_new_tokens=max_new_tokens, max_length=max_length)
        for name in names:
            scored = objective if len(names) == 1 else RunObjective(name)
            totals[name] = totals.get(name, 0.0) + sum(scored.scores(chunk, texts))
    sums = dist.sum_across_ranks([totals.get(name, 0.0) for name in names])
    return {name.replace("-", "_"): total / len(examples) for name, total in zip(names, sums)}


@torch.no_grad()
def classification_metrics(model: nn.Module, tokenizer, examples: list[Example], batch_size: int, max_length: int,
                           frozen: FrozenPrefix | None = None) -> dict[str, float]:
    """{accuracy, cross_entropy} of classification examples from one forward, through the run's frozen prefix."""
    correct = loss = 0.0
    for batch in dev_batches(model, tokenizer, examples, batch_size, False, max_length):
        with frozen.applied(batch) if frozen is not None else contextlib.nullcontext():
            logprobs = token_logprobs(model, batch)
        correct += float((candidate_scores(batch, logprobs).argmax(-1) == batch.labels).sum())
        loss += float(per_example_losses(batch, logprobs).sum())
    correct, loss = dist.sum_across_ranks([correct, loss])
    return {"accuracy": correct / len(examples), "cross_entropy": loss / len(examples)}


def dev_value(objective: RunObjective, model: nn.Module, tokenizer, examples: list[Example], batch_size: int,
              max_length: int, max_new_tokens: int, frozen: FrozenPrefix | None = None) -> float:
    """The run's dev loss under its objective: -metric on the dev examples; every metric measured is kept in
    `objective.last_dev` (as dev_NAME) for the log."""
    if objective.name == "accuracy":
        metrics = classification_metrics(model, tokenizer, examples, batch_size, max_length, frozen)
    else:
        metrics = generated_metrics(objective, model, tokenizer, examples, batch_size, max_length, max_new_tokens)
    objective.last_dev = {f"dev_{name}": value for name, value in metrics.items()}
    return -metrics[objective.key]


class GenerationRunner:
    """A step's values of an objective read from completions (f1, exact match, a reward), where
    dlzo.training.step.StepRunner reads the loss from a forward: the same methods, so the same ZO steps call it.
    `batches` are micro-batches of examples; `branched` is set where both branches generate as one batch."""

    def __init__(self, model: nn.Module, tokenizer, names: list[str], fast: bool, objective: RunObjective,
                 max_new_tokens: int, max_length: int, temperature: float = 0.0, average_across_ranks: bool = True):
        self.model, self.tokenizer, self.objective = model, tokenizer, objective
        self.max_new_tokens, self.max_length, self.temperature = max_new_tokens, max_length, temperature
        self.average, self.chat = average_across_ranks, uses_chat(objective, tokenizer)
        self.branched = BranchedLeaves(model, names) if fast else None
        self.noise_seed = 0  # the step's sampling noise (--temperature): set by at_step

    @classmethod
    def for_reward(cls, model: nn.Module, tokenizer, names: list[str], fast: bool, reward, max_new_tokens: int,
                   temperature: float) -> GenerationRunner:
        """A reward's runner in one process (`ZOTrainer`): `reward` a function or PATH.py:FUNCTION."""
        if tokenizer is None:
            raise ValueError("ZOArguments.reward: pass the tokenizer (processing_class): it encodes the prompts and "
                             "decodes the completions")
        if tokenizer.pad_token_id is None:  # prompts of several lengths are padded (on the left)
            tokenizer.pad_token = tokenizer.eos_token
        reward = load_reward(reward) if isinstance(reward, str) else reward if isinstance(reward, Reward) else Reward(reward)
        return cls(model, tokenizer, names, fast, RunObjective("reward", reward), max_new_tokens,
                   context_limit(model, 2048), temperature, average_across_ranks=False)

    def at_step(self, seed: int, step: int) -> None:
        """The sampling noise of step `step` of a run seeded `seed`: the same for both branches, every direction,
        and a resumed run."""
        self.noise_seed = (seed * 1_000_003 + step) % 2**31

    def _noise(self, copies: int) -> SharedNoise | None:
        return SharedNoise(self.noise_seed, self.temperature, copies) if self.temperature > 0 else None

    def _complete(self, examples: list[Example], copies: int = 1) -> list[str]:
        return complete(self.model, self.tokenizer, [prompt_text(self.tokenizer, e, self.chat) for e in examples],
                        max_new_tokens=self.max_new_tokens, max_length=self.max_length, copies=copies,
                        noise=self._noise(copies))

    def _loss(self, examples: list[Example], completions: list[str]) -> float:
        values = self.objective.scores(examples, completions)
        return -sum(values) / len(values)

    def greedy_mean(self, examples: list[Example]) -> float:
        """The mean metric of greedy completions at the model's weights (an evaluation: no sampling)."""
        values = self.objective.scores(examples, complete(
            self.model, self.tokenizer, [prompt_text(self.tokenizer, e, self.chat) for e in examples],
            max_new_tokens=self.max_new_tokens, max_length=self.max_length))
        return sum(values) / len(values)

    def loss(self, batches: list[list[Example]]) -> float:
        """At the model's weights as they are (in place: the optimizer perturbed them)."""
        local = sum(self._loss(b, self._complete(b)) for b in batches) / len(batches)
        return dist.mean_across_ranks(local) if self.average else local

    def loss_at(self, batches: list[list[Example]], tensors: dict | None, frozen: FrozenPrefix | None = None) -> float:
        """With the tuned tensors `tensors` swapped in (None: the model's own): the one-sided estimator."""
        with tuned_in(self.model, tensors):
            return self.loss(batches)

    def loss_pair(self, batches: list[list[Example]], plus: dict, minus: dict) -> tuple[float, float]:
        """Both branches from one batch of 2B rows: the first B with θ+εz, the last B with θ-εz."""
        pairs = []
        for batch in batches:
            with self.branched.applied(plus, minus):
                texts = self._complete(batch, copies=2)
            pairs.append((self._loss(batch, texts[: len(batch)]), self._loss(batch, texts[len(batch) :])))
        local = (sum(p for p, _ in pairs) / len(pairs), sum(m for _, m in pairs) / len(pairs))
        return dist.mean_pair_across_ranks(local) if self.average else local

    def step_prefix(self, batches: list[list[Example]]) -> None:
        return None  # a completion is a new sequence: no frozen prefix to share


def micro_batches(examples: list[Example], grad_accum: int) -> list[list[Example]]:
    """A step's examples as `grad_accum` micro-batches (one z across them), as step_batches splits them."""
    micro = max(len(examples) // grad_accum, 1)
    return [examples[i : i + micro] for i in range(0, len(examples), micro)]
