"""Evaluation: rank candidates by mean answer log-probability (accuracy), or generate greedily (F1/EM)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dlzo import distributed as dist
from dlzo.checkpoint import atomic_write_json
from dlzo.data import HUB_PREFIX, UserData, UserTask, file_digest, load_user_data
from dlzo.errors import DlzoError
from dlzo.harness import evaluate_with_harness
from dlzo.models import load_model, load_tokenizer, resolve_model_source
from dlzo.options import DEFAULT_MAX_DEV, EvalConfig, TrainConfig
from dlzo.prefix import FrozenPrefix
from dlzo.run import load_checkpoint_of_run
from dlzo.scoring import (
    EncodedBatch,
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


def eval_command(config: EvalConfig) -> EvalResult | dict:
    """`dlzo eval`: zero-shot, in-context (--icl K) or a trained run (--run) on a task's test examples, or on
    your own rows (--data)."""
    config.validate()
    _default_to_the_runs_data(config)
    if config.data:
        return eval_own_data(config)
    if config.harness:
        return eval_with_harness(config)
    task = load_task(config.task, config.data_dir)
    splits = task_splits(task, config.data_seed, num_test=config.num_test, **_the_runs_pool(config))
    if not splits.test:
        raise DlzoError(f"{task.name}: no test rows are left of its validation file after the run's training and "
                        f"dev rows (--num-train and --num-dev of {config.run})")
    model, tokenizer = model_to_evaluate(config)
    demos = demonstrations(splits.train, config.icl, config.data_seed)
    result = evaluate(model, tokenizer, task, splits.test, config.batch_size, demos=demos,
                      max_length=config.max_length)
    out = Path(config.out)
    atomic_write_json(out / "eval.json", {**result.to_json(), "icl": config.icl, "model": config.model,
                                          "run": config.run})
    print(f"{task.name} {result.metric}: {result.value:.4f} on {result.num_examples} examples "
          f"({config.icl}-shot); wrote {out / 'eval.json'}")
    return result


def _default_to_the_runs_data(config: EvalConfig) -> None:
    """No --task, --data or --harness: a run is evaluated on what it trained on (its task, from its data
    folder; its own rows: the --eval-data file read with its --data-format and --columns, or the rows it held
    out of --data), anything else on sst2. The data folder defaults to the run's, else ../shared/data."""
    trained = _run_record(config.run)["config"] if config.run else {}
    config.data_dir = config.data_dir or trained.get("data_dir") or TrainConfig.data_dir
    if config.task or config.data or config.harness:
        return
    if trained.get("data"):
        config.data = trained.get("eval_data") or trained["data"]
        if trained.get("eval_data") and config.data_format == "auto" and not config.columns:
            config.data_format, config.columns = trained.get("data_format", "auto"), trained.get("columns", "")
    else:
        config.task = trained.get("task") or "sst2"


def _the_runs_pool(config: EvalConfig) -> dict:
    """A run scored on its own task draws its training rows as it did: where a task has no train file (BoolQ),
    the test rows are what is left of the validation file after them."""
    trained = _run_record(config.run)["config"] if config.run else {}
    if trained.get("task") != config.task or trained.get("data"):
        return {}
    num_dev = trained.get("num_dev", -1)
    return {"num_train": trained.get("num_train", TrainConfig.num_train), "num_dev": None if num_dev < 0 else num_dev}


def model_to_evaluate(config: EvalConfig) -> tuple[nn.Module, object]:
    """(model, tokenizer): a run's checkpoint on its base model (--run), or a plain model (--model)."""
    if config.run:
        prepared = load_checkpoint_of_run(config.run, config.checkpoint, config.model or None,
                                          config.device, config.dtype)
        return prepared.model, prepared.tokenizer
    if not config.model:
        raise DlzoError("--model is required (or --run to evaluate a trained run)")
    model = load_model(config.model, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code)
    return model, load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)


def eval_with_harness(config: EvalConfig) -> dict:
    """`dlzo eval --harness TASKS`: the (tuned) model handed to lm-evaluation-harness (dlzo.harness)."""
    model, tokenizer = model_to_evaluate(config)
    tasks = [t.strip() for t in config.harness.split(",") if t.strip()]
    results = evaluate_with_harness(model, tokenizer, tasks, config.harness_include or None,
                                    config.harness_limit or None, config.batch_size, config.icl or None)
    atomic_write_json(Path(config.out) / "harness.json", results)
    print(f"lm-evaluation-harness on {', '.join(tasks)}: wrote {Path(config.out) / 'harness.json'}")
    return results


# ----------------------------------------------------------------------------------------------- your own data


def eval_own_data(config: EvalConfig) -> dict:
    """`dlzo eval --data`: the dev loss (per scored token) and perplexity of generation rows, or the accuracy of
    classification rows; with --generate also greedy exact match / F1 against each completion. The model and
    its tokenizer are checked, then the rows are read, then the model is loaded."""
    record = _run_record(config.run) if config.run else None
    base = config.model or (record["config"]["model"] if record else "")
    if not base:
        raise DlzoError("--model is required (or --run to evaluate a trained run)")
    resolve_model_source(base)
    tokenizer = load_tokenizer(base, trust_remote_code=config.trust_remote_code)
    user, examples, which = own_eval_rows(config, tokenizer, record)
    if config.generate and user.format == "text":
        raise DlzoError(f"--generate: {config.data} holds text rows, which have no prompt to continue; use "
                        f"prompt-completion, chat or classification rows")
    if config.run:
        prepared = load_checkpoint_of_run(config.run, config.checkpoint, config.model or None,
                                          config.device, config.dtype)
        model, tokenizer = prepared.model, prepared.tokenizer
    else:
        model = load_model(base, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code)
    model.eval()
    max_length = context_limit(model, config.max_length)
    task = UserTask(user)
    result = {"data": config.data, "format": user.format, "rows": which, "num_examples": len(examples),
              "model": base, "run": config.run, "checkpoint": config.checkpoint if config.run else None}
    if user.generation:
        loss = dev_loss(model, tokenizer, examples, config.batch_size, True, max_length, per_token=True)
        result.update(loss=loss, loss_kind="mean negative log-likelihood per scored token", perplexity=perplexity(loss))
    else:
        loss, accuracy = classification_scores(model, tokenizer, examples, config.batch_size, max_length)
        result.update(loss=loss, loss_kind="cross-entropy over the options per row", accuracy=accuracy)
    if config.generate:
        tokenizer.truncation_side = "left"
        scored = [e if e.answers else replace(e, answers=[e.continuations[e.label].strip()]) for e in examples]
        generated = _evaluate_generation(model, tokenizer, task, scored, config.batch_size, "", max_length, True,
                                         config.max_new_tokens)
        result.update(exact_match=generated.exact_match, f1=generated.value, max_new_tokens=config.max_new_tokens)
    out = Path(config.out)
    atomic_write_json(out / "eval.json", result)
    print(own_eval_line(result) + f"; wrote {out / 'eval.json'}")
    return result


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
    parts = [f"{result['data']} ({result['format']}, {result['rows']}):"]
    if "perplexity" in result:
        parts.append(f"loss {result['loss']:.4f} per token, perplexity {result['perplexity']:.3f}")
    else:
        parts.append(f"accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}")
    if "exact_match" in result:
        parts.append(f"; greedy exact match {result['exact_match']:.4f}, F1 {result['f1']:.4f}")
    return " ".join(parts).replace(" ;", ";")


def _run_record(run: str) -> dict:
    path = Path(run) / "run.json"
    if not path.exists():
        raise DlzoError(f"--run {run}: no run.json there (not a dlzo run folder)")
    return json.loads(path.read_text())


def _is_the_runs_data(source: str, record: dict, option: str = "data") -> bool:
    """Whether --data names the file the run trained on (`option` "data") or took its dev rows from
    ("eval_data"): the same hub source, or a file with the content the run recorded (its sha256), under
    whatever path; runs that recorded none: the same resolved path."""
    trained = record.get("config", {}).get(option, "")
    if not trained:
        return False
    if source.startswith(HUB_PREFIX) or trained.startswith(HUB_PREFIX):
        return source == trained
    kept = (record.get("data") or {}).get("sha256" if option == "data" else "eval_sha256")
    if kept:
        return file_digest(source) == kept
    return Path(source).resolve() == Path(trained).resolve()


def own_eval_rows(config: EvalConfig, tokenizer, record: dict | None) -> tuple[UserData, list[Example], str]:
    """The rows to evaluate: with --run and that run's own --data file (no --eval-data), the rows it held out,
    split again with its recorded settings, or its --eval-data file, the dev rows it sampled from it;
    otherwise every row of --data (a seeded --num-test when more)."""
    trained = (record or {}).get("config", {})
    held_out = trained.get("data") and not trained.get("eval_data") and _is_the_runs_data(config.data, record)
    if held_out or (trained.get("eval_data") and _is_the_runs_data(config.data, record, "eval_data")):
        # the dev rows the run was scored on, drawn again with its settings: held out of its --data, or a
        # seeded sample of --num-dev (else 500) of its --eval-data
        num_dev = trained.get("num_dev", -1)
        user = load_user_data(config.data, tokenizer, trained.get("data_format", "auto"), trained.get("columns", ""),
                              "" if held_out else config.data, trained.get("eval_fraction", 0.1),
                              trained.get("data_seed", 0), max_eval=num_dev if num_dev > 0 else DEFAULT_MAX_DEV)
        which = "held-out dev rows" if held_out else "dev rows of its --eval-data"
        return user, user.dev, f"the run's {len(user.dev)} {which}"
    user = load_user_data(config.data, tokenizer, config.data_format, config.columns, eval_source=config.data,
                          seed=config.data_seed, max_eval=config.num_test)
    total = len(user.train)
    which = f"all {total} rows" if len(user.dev) == total else f"a seeded {len(user.dev)} of {total} rows"
    return user, user.dev, which
