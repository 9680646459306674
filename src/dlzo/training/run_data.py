"""A run's examples: a benchmark task's MeZO splits or your own rows (--data), checked against the sizes asked for\nand, on resume, against the data the run was started with."""

from __future__ import annotations

from dataclasses import dataclass

from dlzo.data.benchmarks import Task, load_task, task_splits
from dlzo.data.examples import Splits
from dlzo.data.user_data import UserData, UserTask, file_digest, load_user_data
from dlzo.errors import DlzoError
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
