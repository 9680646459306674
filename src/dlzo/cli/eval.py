"""`dlzo eval`: a base model or a run's tuned tensors on a task, on your own rows, or handed to
lm-evaluation-harness; with --run, by default on the rows and settings its results.json was measured with.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from dlzo.cli.options import EvalConfig
from dlzo.data.benchmarks import load_task, task_splits
from dlzo.data.examples import Example
from dlzo.data.hub import is_hub_source
from dlzo.data.prompts import load_prompt_rows
from dlzo.data.user_data import UserData, UserTask, file_digest, load_user_data
from dlzo.engine.scoring import (
    context_limit,
)
from dlzo.errors import DlzoError
from dlzo.evaluation.evaluate import (
    EvalResult,
    _evaluate_generation,
    classification_scores,
    demonstrations,
    dev_loss,
    evaluate,
    own_eval_line,
    perplexity,
)
from dlzo.evaluation.harness import evaluate_with_harness
from dlzo.evaluation.objectives import RunObjective, generated_metrics
from dlzo.evaluation.rewards import load_reward
from dlzo.fields import comma_list
from dlzo.model.checkpoint import atomic_write_json
from dlzo.model.loading import load_model, load_tokenizer, resolve_model_source
from dlzo.training.config import DEFAULT_MAX_DEV, TrainConfig
from dlzo.training.run_folder import RunFolder
from dlzo.training.run_model import load_checkpoint_of_run


def eval_command(config: EvalConfig) -> EvalResult | dict:
    """`dlzo eval`: zero-shot, in-context (--icl K) or a trained run (--run) on a task's test examples, or on
    your own rows (--data)."""
    config.validate()
    _default_to_the_runs_data(config)
    if config.reward:
        return eval_reward(config)
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
    trained = RunFolder(config.run, "--run").config() if config.run else {}
    config.data_dir = config.data_dir or trained.get("data_dir") or TrainConfig.data_dir
    if trained.get("reward") and not (config.task or config.harness or config.generate):
        config.reward = config.reward or trained["reward"]  # a reward run is scored by its reward
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
    trained = RunFolder(config.run, "--run").config() if config.run else {}
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
    """`dlzo eval --harness TASKS`: the (tuned) model handed to lm-evaluation-harness (dlzo.evaluation.harness)."""
    model, tokenizer = model_to_evaluate(config)
    tasks = comma_list(config.harness)
    results = evaluate_with_harness(model, tokenizer, tasks, config.harness_include or None,
                                    config.harness_limit or None, config.batch_size, config.icl or None)
    atomic_write_json(Path(config.out) / "harness.json", results)
    print(f"lm-evaluation-harness on {', '.join(tasks)}: wrote {Path(config.out) / 'harness.json'}")
    return results


def eval_own_data(config: EvalConfig) -> dict:
    """`dlzo eval --data`: the dev loss (per scored token) and perplexity of generation rows, or the accuracy of
    classification rows; with --generate also greedy exact match / F1 against each completion. The model and
    its tokenizer are checked, then the rows are read, then the model is loaded."""
    record = RunFolder(config.run, "--run").record() if config.run else None
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


def eval_reward(config: EvalConfig) -> dict:
    """`dlzo eval --reward PATH.py:FUNCTION`: the mean reward of greedy completions of prompt rows, by a base
    model or a run's checkpoint. The function and the rows are checked before the model is loaded."""
    record = RunFolder(config.run, "--run").record() if config.run else None
    if not config.data:
        raise DlzoError("--reward needs --data: a file of prompt rows {\"prompt\": ...} (or --run of a reward run)")
    base = config.model or (record["config"]["model"] if record else "")
    if not base:
        raise DlzoError("--model is required (or --run to evaluate a trained run)")
    resolve_model_source(base)
    objective = RunObjective("reward", load_reward(config.reward))
    rows, which = reward_rows(config, record)
    model, tokenizer = model_to_evaluate(config)
    metrics = generated_metrics(objective, model, tokenizer, rows, config.batch_size,
                                context_limit(model, config.max_length), config.max_new_tokens)
    result = {"reward": config.reward, "mean_reward": metrics["reward"], "data": config.data, "rows": which,
              "num_examples": len(rows), "max_new_tokens": config.max_new_tokens,
              "model": base, "run": config.run,
              "checkpoint": config.checkpoint if config.run else None}
    out = Path(config.out)
    atomic_write_json(out / "eval.json", result)
    print(f"mean reward {result['mean_reward']:.4f} on {which} ({config.reward}); wrote {out / 'eval.json'}")
    return result


def reward_rows(config: EvalConfig, record: dict | None) -> tuple[list[Example], str]:
    """The prompt rows to score: with --run and its own --data, the dev rows it held out (or drew from its
    --eval-data), split again with its settings; otherwise every row of --data (a seeded --num-test when more)."""
    trained = (record or {}).get("config", {})
    held_out = trained.get("data") and not trained.get("eval_data") and _is_the_runs_data(config.data, record)
    if held_out or (trained.get("eval_data") and _is_the_runs_data(config.data, record, "eval_data")):
        num_dev = trained.get("num_dev", -1)
        rows = load_prompt_rows(config.data, trained.get("columns", ""), "" if held_out else config.data,
                                trained.get("eval_fraction", 0.1), trained.get("data_seed", 0),
                                max_eval=num_dev if num_dev > 0 else DEFAULT_MAX_DEV).dev
        return rows, f"the run's {len(rows)} {'held-out dev' if held_out else 'dev'} prompts"
    rows = load_prompt_rows(config.data, config.columns, config.data, seed=config.data_seed, max_eval=config.num_test).dev
    return rows, f"{len(rows)} prompts of {config.data}"


def _is_the_runs_data(source: str, record: dict, option: str = "data") -> bool:
    """Whether --data names the file the run trained on (`option` "data") or took its dev rows from
    ("eval_data"): the same hub source, or a file with the content the run recorded (its sha256), under
    whatever path; runs that recorded none: the same resolved path."""
    trained = record.get("config", {}).get(option, "")
    if not trained:
        return False
    if is_hub_source(source) or is_hub_source(trained):
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

