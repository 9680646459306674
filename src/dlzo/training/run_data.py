"""A run's examples: a benchmark task's MeZO splits or your own rows (--data), checked against the sizes asked for\nand, on resume, against the data the run was started with."""

from __future__ import annotations

from dataclasses import dataclass

from dlzo.data.benchmarks import Task, load_task, task_splits
from dlzo.data.examples import Splits
from dlzo.data.prompts import load_prompt_rows
from dlzo.data.user_data import UserData, UserTask, file_digest, load_user_data
from dlzo.errors import DlzoError
from dlzo.evaluation.evaluate import EvalResult, perplexity
from dlzo.evaluation.objectives import RunObjective
from dlzo.training.config import DEFAULT_MAX_DEV, TrainConfig
from dlzo.training.run_folder import changed_data_file


@dataclass
class Data:
    task: Task | UserTask
    splits: Splits
    user: UserData | None = None  # --data: the rows as dlzo.data.user_data read them
    info: dict | None = None  # --data: what run.json and results.json record under "data"

    @property
    def per_token(self) -> bool:
        """Your own generation data: the dev loss is the mean NLL per scored token (exp: perplexity)."""
        return self.user is not None and self.user.generation


def load_data(config: TrainConfig, tokenizer=None) -> Data:
    """The task's MeZO splits, checked against the sizes asked for; or, with --data, the user's rows
    (chat rows need `tokenizer`: its chat template renders them)."""
    if config.data and config.reward:
        return load_prompt_data(config)
    if config.data:
        return load_own_data(config, tokenizer)
    task = load_task(config.task, config.data_dir)
    splits = task_splits(task, config.data_seed, config.num_train, None if config.num_dev < 0 else config.num_dev,
                         config.num_test)
    if not splits.train:
        raise DlzoError(f"task {task.name} has no training examples with these settings "
                        f"(--num-train {config.num_train}, --num-dev {config.num_dev})")
    return Data(task, splits)


def load_own_data(config: TrainConfig, tokenizer) -> Data:
    """--data: every training row, and the dev rows (--eval-data, or a seeded --eval-fraction held out)."""
    user = load_user_data(config.data, tokenizer, config.data_format, config.columns, config.eval_data,
                          config.eval_fraction, config.data_seed,
                          max_eval=config.num_dev if config.num_dev > 0 else DEFAULT_MAX_DEV,
                          max_length=config.max_length)
    digest, eval_digest = file_digest(config.data), file_digest(config.eval_data)
    if eval_digest is not None and eval_digest == digest:
        user.notes.append(f"{config.eval_data} holds the rows of {config.data}: the dev rows are training rows, so "
                          f"the dev loss and the best checkpoint are judged on rows the run trains on")
    task = UserTask(user)
    info = {"source": config.data, "eval_source": config.eval_data or None, "name": user.name, "format": user.format,
            "metric": "accuracy on the dev rows" if not user.generation else
            "dev loss (mean NLL per scored token) and perplexity",
            "sha256": digest, "eval_sha256": eval_digest, "train_rows": len(user.train), "dev_rows": len(user.dev)}
    return Data(task, task.splits(), user, info)


def load_prompt_data(config: TrainConfig) -> Data:
    """--reward: the prompt rows of --data (dlzo.data.prompts), and the dev prompts that choose the checkpoint."""
    user = load_prompt_rows(config.data, config.columns, config.eval_data, config.eval_fraction, config.data_seed,
                            max_eval=config.num_dev if config.num_dev > 0 else DEFAULT_MAX_DEV)
    task = UserTask(user)
    task.metric = "reward"
    info = {"source": config.data, "eval_source": config.eval_data or None, "name": user.name, "format": user.format,
            "metric": "mean reward on the dev prompts", "sha256": file_digest(config.data),
            "eval_sha256": file_digest(config.eval_data), "train_rows": len(user.train), "dev_rows": len(user.dev)}
    return Data(task, task.splits(), user, info)


def check_same_data(previous: dict | None, data: Data) -> None:
    """--resume with --data: the file must hold what it held, or the batches after the resume point differ."""
    info = data.info or {}
    changed = changed_data_file((previous or {}).get("data") or {}, info)
    if changed:
        flag, was, now = changed
        source = info.get("source") if flag == "--data" else info.get("eval_source")
        raise DlzoError(f"--resume: {flag} {source} changed since that run (sha256 {was[:12]}... then, "
                        f"{now[:12]}... now), so the resumed steps would see other rows; restore the "
                        f"file or start a new run")


def own_data_results(data: Data, dev_start: float, best_dev: float, loss: bool = True) -> dict:
    """What results.json adds for --data: the data's record, what was tested, and the perplexities (`loss`: the
    run's dev loss is a loss, not -metric)."""
    extra = {"data": data.info, "test_split": "dev: the held-out rows (--data has no test set; these rows also "
                                              "chose the best checkpoint)"}
    if not loss:
        extra.update(dev_loss_kind="-metric of the objective")
    elif data.per_token:
        extra.update(dev_loss_kind="mean negative log-likelihood per scored token",
                     dev_perplexity_start=perplexity(dev_start), dev_perplexity_best=perplexity(best_dev))
    else:
        extra.update(dev_loss_kind="cross-entropy over the options per row")
    return extra


def own_data_summary(data: Data, result: EvalResult, dev_start: float, best_dev: float,
                     objective: RunObjective | None = None) -> str:
    """The end-of-run line of --data: the dev rows named by the file they came from (held out of --data, or
    --eval-data's)."""
    source = (data.info or {}).get("eval_source")
    rows = f"{len(data.splits.dev)} {f'rows of {source}' if source else f'held-out rows of {data.task.name}'}"
    if objective is not None and objective.name != "loss":
        return (f"dev {objective.key} {-dev_start:.4f} -> best {-best_dev:.4f} on {rows} (they also chose the "
                f"checkpoint)")
    if data.per_token:
        return (f"dev loss {dev_start:.4f} -> best {best_dev:.4f} per token (perplexity {perplexity(dev_start):.3f} "
                f"-> {perplexity(best_dev):.3f}) on {rows}")
    untouched = "score another file with dlzo eval --run" if source else "pass --eval-data"
    return (f"dev accuracy {result.value:.4f} on {rows} (they also chose the checkpoint; {untouched} for an "
            f"untouched set); dev loss {dev_start:.4f} -> best {best_dev:.4f}")
