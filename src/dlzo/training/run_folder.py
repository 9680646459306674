"""The run folder: everything a training run writes, reads back to resume, and hands to replay, export and eval.
`RunFolder` is its one owner: every command reads and writes these files through it, so a damaged folder is
one line naming the file, whoever reads it.

  run.json           full config, chosen layer and why, split sizes, library versions, device
  metrics.jsonl      one line per logged step and per evaluation
  trajectory.jsonl   every step's (step, seeds, projected grads, lr, skipped): enough to rebuild the weights
  last.safetensors   tuned tensors at the latest save (resume point), written atomically
  best.safetensors   tuned tensors with the lowest dev loss so far
  final.safetensors  tuned tensors after the last step
  results.json       dev loss start/best, test metric of the best checkpoint, wall time
  lock.flock         the lock (filelock: an OS file lock, let go by the system when its process ends, however)
  lock               the process id of the run that holds the folder, kept beside the lock for the messages
  diverged.json      a learning-rate grid's run stopped by non-finite losses (dlzo.studies.lr_grid): finished, no results
  race-recipe.json   a race's finished recipe (dlzo.studies.race): finished, its figures there

Resume is handled here and only here: `resume_point` loads the last checkpoint and re-applies every logged
step after it (ZOOptimizer.replay_step), so a kill loses at most the step in flight; a torn last line of a
log (a kill in the middle of a write) is dropped. What to do with a folder (start, resume, reuse a finished
run, start an unresumable one again) is decided here too, by `decide`, for `dlzo train` and every study.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from dlzo.data.user_data import file_digest
from dlzo.engine.zo import ZOOptimizer
from dlzo.errors import DlzoError, first_line
from dlzo.model.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    checked_load,
    checkpoint_metadata,
    save_tensors,
)
from dlzo.training.config import TrainConfig, same_path_option
from dlzo.training.prepare import load_into

# Keys that do not change what a run trained (where it lives, how it logs and saves, where its frozen prefix is
# kept on disk; the epochs, which became its steps): a kept run reused by a study must agree on every other one.
FREE_FOR_A_KEPT_RUN = ("out", "resume", "quiet", "report_to", "run_name", "log_every", "save_every", "prefix_store",
                       "num_train_epochs")
# Keys that may differ between an interrupted run and its resumption.
_FREE_ON_RESUME = (*FREE_FOR_A_KEPT_RUN, "steps")
DIVERGED = "diverged.json"  # marks a learning-rate grid's run stopped by non-finite losses
RACE_RECIPE = "race-recipe.json"  # a race's finished recipe
# What decide() answers.
START, RESUME, REUSE, RESTART = "start", "resume", "reuse", "restart"
# A study's own words for a kept run trained otherwise: (option, then, now) -> the error to raise.
Refusal = Callable[[str, object, object], DlzoError]


def library_versions() -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL log; a torn last line (a kill in the middle of a write) is dropped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the write in flight when the process died
            raise DlzoError(f"{path}:{number}: not valid JSON (the log is damaged before its last line)") from None
    return records


@dataclass
class ResumePoint:
    step: int  # the first step still to run
    best_dev: float
    replayed: int  # logged steps re-applied after the checkpoint


class RunFolder:
    """One training run's folder. All writes are atomic or append-only, so a crash never loses a finished step.
    `flag` is how the command line named the folder (--run, --resume, --out): its messages say it."""

    def __init__(self, path: str | Path, flag: str = ""):
        self.path = Path(path)
        self.named = f"{flag} {self.path}" if flag else str(self.path)
        self.run_file = self.path / "run.json"
        self.metrics = self.path / "metrics.jsonl"
        self.trajectory = self.path / "trajectory.jsonl"
        self.results_file = self.path / "results.json"
        self.race_recipe = self.path / RACE_RECIPE
        self.lock_file = self.path / "lock.flock"
        self.holder_file = self.path / "lock"
        self._lock: FileLock | None = None

    # ------------------------------------------------------------------------------ reading

    def record(self) -> dict:
        """run.json: the run's options under "config", its layer choice, scope, data; one line naming the file
        when it is missing, not JSON or has no options (a damaged folder is no traceback)."""
        if not self.run_file.exists():
            raise DlzoError(f"{self.named}: no run.json there (not a dlzo run folder)")
        record = self._read_json(self.run_file)
        if not isinstance(record.get("config"), dict):
            raise DlzoError(f"{self.run_file}: has no \"config\" (the options of the run): not written by dlzo "
                            f"train, or damaged")
        return record

    def config(self) -> dict:
        """The options the run was started with, as run.json records them."""
        return self.record()["config"]

    def results(self) -> dict:
        """results.json of a finished run."""
        return self._read_json(self.results_file)

    def is_started(self) -> bool:  # run.json is written before the first step
        return self.run_file.exists()

    def is_finished(self) -> bool:
        """Trained to the end with figures: results.json, or a race's recipe record."""
        return self.results_file.exists() or self.race_recipe.exists()

    def diverged(self) -> bool:
        """A learning-rate grid's run stopped by non-finite losses: finished, without results."""
        return (self.path / DIVERGED).exists()

    def _read_json(self, path: Path) -> dict:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise DlzoError(f"{path}: cannot be read ({err.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DlzoError(f"{path}: not valid JSON ({first_line(err)}): the run folder is damaged") from None
        if not isinstance(value, dict):
            raise DlzoError(f"{path}: not a JSON object: the run folder is damaged")
        return value

    # ------------------------------------------------------------------------------ before any work

    def decide(self, config: TrainConfig, study: bool = False, no_resume: str = "",
               refuse: Refusal | None = None) -> str:
        """Start, resume or reuse: the one answer for `config` in this folder, given before any work.

        `dlzo train` (study False) does what its flags say: RESUME with --resume (the run's options must
        agree), else START, refused where a run already is.
        A study that keeps its runs across calls (sweep, lr grid, race, demo: study True) asks the folder:
          finished (results.json, a race's recipe, a grid's diverged.json) -> REUSE, only if trained with these
            options, steps included (changed_since_kept; else `refuse(option, then, now)` or one line of ours);
          started (run.json) -> RESUME, with the checks of --resume; or, where it cannot resume (`no_resume`
            says why: a first-order run keeps no optimizer state, a race's seconds come from one process),
            RESTART: the folder is emptied first, unless a live process holds it;
          else START."""
        if not study:
            if config.resume:
                self.check_resume(config)
                return RESUME
            if self.trajectory.exists():
                raise DlzoError(f"--out {self.path} already holds a run; pass --resume {self.path} to continue "
                                f"it, or another --out")
            return START
        if self.is_finished() or self.diverged():
            self.check_kept(config, refuse)
            return REUSE
        if not self.is_started():
            return START
        if not no_resume:
            self.check_resume(config)
            return RESUME
        self.clear(no_resume)
        return RESTART

    def check_resume(self, config: TrainConfig) -> None:
        """A resumed run must have the same arguments (steps may grow under a constant rate)."""
        self.record()
        # with a schedule the step count shapes every lr, so it must stay
        free = [k for k in _FREE_ON_RESUME if k != "steps" or config.lr_scheduler == "constant"]
        changed = self.changed_option(config, free)
        if changed:
            key, was, now = changed
            raise DlzoError(f"--resume {self.path}: --{key.replace('_', '-')} was {was!r} in that run, now {now!r}")
        reached = self.steps_logged()
        if config.steps < reached:  # the resume would re-apply them all and label the result with fewer
            raise DlzoError(f"--resume {self.path}: --steps {config.steps} is below the {reached} steps that run "
                            f"has already logged; give --steps {reached} or more, or start a new run")

    def check_kept(self, config: TrainConfig, refuse: Refusal | None = None) -> None:
        """A finished run is reused only if `config` would train it as it was trained."""
        changed = self.changed_since_kept(config)
        if changed and refuse is not None:
            raise refuse(*changed)
        if changed:
            raise DlzoError(f"{self.path} holds a finished run trained with {changed[0]}={changed[1]!r}, now "
                            f"{changed[2]!r} is asked; move that folder away or give --out another folder")

    def changed_option(self, config: TrainConfig, free: Iterable[str]) -> tuple[str, object, object] | None:
        """The first option of `config`, `free` and inert ones aside, that differs from this folder's run.json:
        (name, then, now); None when all agree. Keys added after that run was written hold their default in it."""
        recorded, free = self.config(), (*free, *config.inert_options())
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        for key, now in asdict(config).items():
            was = recorded.get(key, defaults.get(key))
            if key not in free and not same_path_option(key, was, now):
                return key, was, now
        return None

    def changed_since_kept(self, config: TrainConfig) -> tuple[str, object, object] | None:
        """For a run reused as finished (by a study): the first option, steps included, that differs from
        what trained it; None when all agree."""
        changed = self.changed_option(config, FREE_FOR_A_KEPT_RUN)
        if changed is None:  # the same path may hold other rows now (resume checks this too: check_same_data)
            kept = self.record().get("data") or {}
            changed = changed_data_file(kept, {"sha256": file_digest(config.data),
                                               "eval_sha256": file_digest(config.eval_data)})
            if changed:
                flag, was, now = changed
                option = {"--data": "data", "--eval-data": "eval_data"}[flag]
                return f"{option} (content)", f"sha256 {was[:12]}...", f"sha256 {now[:12]}..."
        return changed

    def recorded_options(self) -> dict:
        """The options the run was started with, as defaults for `dlzo train --resume`: the flags given again
        must agree with them, so they need not be given. Where, how to log, options dlzo no longer has, and the
        epochs (the --steps they became are the default, which a --steps given again may raise) are left out."""
        known = {f.name for f in fields(TrainConfig)} - {"out", "resume", "quiet", "report_to", "num_train_epochs"}
        return {key: value for key, value in self.config().items() if key in known}

    def clear(self, why: str) -> None:
        """Empty the folder of an interrupted run that cannot resume, under its lock (so not while a live
        process holds it)."""
        self.lock()
        try:
            for child in self.path.iterdir():
                if child in (self.lock_file, self.holder_file):
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        finally:
            self.unlock()
        print(f"{self.path}: the interrupted run starts again from step 0 ({why})")

    # ------------------------------------------------------------------------------ the lock

    def lock(self) -> None:
        """Hold the folder for this process: a second run on it, in this process or another, fails at once
        naming the holder. The lock is the OS's (filelock), let go when its process ends however it ends, so a
        dead run's folder is taken over, and by one process only when several try at once."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DlzoError(f"--out {self.path}: cannot create the folder ({err.strerror})") from None
        lock = FileLock(str(self.lock_file), thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            holder = self._announced_holder()
            if holder == os.getpid():
                raise DlzoError(f"--out {self.path} is in use by another run of this process (its lock file: "
                                f"{self.lock_file}); let that run finish first") from None
            who = f"process {holder}" if holder is not None and _alive(holder) else "another process"
            raise DlzoError(f"--out {self.path} is in use by {who} (its lock file: {self.lock_file}); wait for "
                            f"it or stop it") from None
        except OSError as err:
            raise DlzoError(f"--out {self.path}: cannot write there ({err.strerror})") from None
        stale = self._holder()
        if stale is not None:  # the lock is ours: whoever wrote this let it go (a kill, or before a restart)
            print(f"taking over the stale lock of process {stale} in {self.path} (it is no longer running)")
        try:
            atomic_write_text(self.holder_file, f"{os.getpid()}\n")
        except BaseException:
            lock.release()
            raise
        self._lock = lock

    def unlock(self) -> None:
        if self._lock is not None:
            if self._holder() == os.getpid():
                self.holder_file.unlink(missing_ok=True)
            self._lock.release()
        self._lock = None

    def live_holder(self) -> int | None:
        """The process holding the folder by its pid file, if it still runs (for `dlzo report`: nothing is
        locked to look)."""
        holder = self._holder()
        return holder if holder is not None and _another_live_process(holder) else None

    def _holder(self) -> int | None:
        try:
            return int(self.holder_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _announced_holder(self) -> int | None:
        """The pid the holder writes beside the lock just after taking it: a moment's wait (a second at most)
        spares naming the dead process it took the lock over from."""
        deadline = time.monotonic() + 1.0
        while True:
            holder = self._holder()
            if (holder is not None and (holder == os.getpid() or _alive(holder))) or time.monotonic() > deadline:
                return holder
            time.sleep(0.02)

    # ------------------------------------------------------------------------------ writing

    def write_record(self, record: dict) -> None:
        atomic_write_json(self.run_file, record)

    def log_metrics(self, record: dict) -> None:
        _append_jsonl(self.metrics, record)

    def log_step(self, record: dict) -> None:
        _append_jsonl(self.trajectory, record)

    def save(self, name: str, tensors: dict[str, torch.Tensor], step: int, best_dev: float, scope: str,
             model: str) -> None:
        save_tensors(self.path / name, tensors, {"step": str(step), "best_dev_loss": repr(best_dev), "scope": scope,
                                                 "model": model})

    def write_results(self, results: dict) -> None:
        atomic_write_json(self.results_file, results)

    def mark_diverged(self, reason: str) -> None:
        atomic_write_json(self.path / DIVERGED, {"reason": reason})

    # ------------------------------------------------------------------------------ resume

    def resume_point(self, model: torch.nn.Module, optimizer: ZOOptimizer | None, round_trip: bool) -> ResumePoint:
        """Load last.safetensors, then re-apply every step the trajectory logged after it (ZO runs), and drop
        what the logs hold beyond the point reached. The model's tuned tensors end at the returned step."""
        step, best_dev = 0, float("inf")
        last = self.path / "last.safetensors"
        if last.exists():
            meta = checkpoint_metadata(last)
            best_dev = float(meta["best_dev_loss"])
            # momentum / adam state is not checkpointed: it is rebuilt by replaying every logged step from the base
            if optimizer is None or not optimizer.stateful:
                load_into(model, checked_load(last))
                step = int(meta["step"])
        replayed = 0
        if optimizer is not None:
            optimizer.step_count = step
            for entry in read_jsonl(self.trajectory):
                if entry["step"] < step:
                    continue
                if entry["step"] != step:
                    break  # a gap cannot be bridged
                optimizer.replay_step([int(s) for s in entry["seeds"]], entry["grads"], entry["lr"],
                                      entry["skipped"], round_trip, entry.get("curvatures"))
                step, replayed = step + 1, replayed + 1
        self._truncate(self.trajectory, lambda r: r["step"] < step)
        self._truncate(self.metrics, lambda r: r["step"] < step or (r["step"] == step and "dev_loss" in r))
        return ResumePoint(step, best_dev, replayed)

    def steps_logged(self) -> int:
        """Steps this run has finished by its logs: its trajectory, or for a first-order run (no trajectory)
        its loss records (every 10 steps) and evaluations."""
        steps = [r["step"] + 1 for r in read_jsonl(self.trajectory)]
        if not steps:
            steps = [r["step"] + ("loss" in r) for r in read_jsonl(self.metrics) if "loss" in r or "dev_loss" in r]
        return max(steps, default=0)

    def progress(self) -> dict:
        """Where an unfinished run stands, from its logs alone (nothing is loaded): steps logged of those asked,
        its dev losses, the recent seconds per training step, the live process holding it (None: stopped) and
        whether it diverged (a learning-rate grid's run, finished without results)."""
        config = self.config()
        recent = previous = None
        for record in read_jsonl(self.metrics):
            if "dev_loss" in record:
                previous = None  # an evaluation between two records is not a training step's time
            elif "elapsed_s" in record:
                # elapsed_s restarts with each process: a pair across a resume is not a pace
                if previous and record["elapsed_s"] > previous["elapsed_s"] and record["step"] > previous["step"]:
                    recent = (record["elapsed_s"] - previous["elapsed_s"]) / (record["step"] - previous["step"])
                previous = record
        return {"steps": config.get("steps"), "done": self.steps_logged(), "dev_losses": self.dev_losses(),
                "seconds_per_step": recent, "holder": self.live_holder(),
                "diverged": self.diverged(), "optimizer": config.get("optimizer", "zo")}

    def dev_losses(self) -> dict[int, float]:
        return {r["step"]: r["dev_loss"] for r in read_jsonl(self.metrics) if "dev_loss" in r}

    @staticmethod
    def _truncate(path: Path, keep) -> None:
        if path.exists():
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if keep(r)))


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def _another_live_process(pid: int) -> bool:
    """Our own pid in a lock we did not take is no holder: a process of that pid before a restart (a
    container's PID 1) left it."""
    return pid != os.getpid() and _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def changed_data_file(kept: dict, now: dict) -> tuple[str, str, str] | None:
    """The first data file whose sha256 differs between a run's record (its run.json "data") and now: (flag,
    then, now), the flag --data or --eval-data; None when both agree or either side has no digest."""
    for key, flag in (("sha256", "--data"), ("eval_sha256", "--eval-data")):
        if kept.get(key) and now.get(key) and kept[key] != now[key]:
            return flag, kept[key], now[key]
    return None


# The training options that decide a run's test figure, under the names `dlzo eval` gives them.
TEST_OPTIONS = {"num_test": "num_test", "data_seed": "data_seed", "max_length": "max_length",
                "eval_batch_size": "batch_size", "max_new_tokens": "max_new_tokens"}


def recorded_test_options(folder: str | Path) -> dict:
    """Defaults for `dlzo eval --run`: the test rows the run was scored on, cut and batched as they were, so
    it gives the run's results.json again unless flags say otherwise. A run trained with --num-test 0 (a
    learning-rate grid's) had no test rows: eval's own count stands."""
    recorded = dict(RunFolder(folder, "--run").config())
    if not recorded.get("num_test"):
        recorded.pop("num_test", None)
    return {TEST_OPTIONS[key]: value for key, value in recorded.items() if key in TEST_OPTIONS}
