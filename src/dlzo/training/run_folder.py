"""The run folder: everything a training run writes, reads back to resume, and hands to replay, export and eval.

  run.json           full config, chosen layer and why, split sizes, library versions, device
  metrics.jsonl      one line per logged step and per evaluation
  trajectory.jsonl   every step's (step, seeds, projected grads, lr, skipped): enough to rebuild the weights
  last.safetensors   tuned tensors at the latest save (resume point), written atomically
  best.safetensors   tuned tensors with the lowest dev loss so far
  final.safetensors  tuned tensors after the last step
  results.json       dev loss start/best, test metric of the best checkpoint, wall time
  lock               the process id of the run that holds the folder
  diverged.json      a learning-rate grid's run stopped by non-finite losses (dlzo.studies.lr_grid): finished, no results

Resume is handled here and only here: `resume_point` loads the last checkpoint and re-applies every logged
step after it (ZOOptimizer.replay_step), so a kill loses at most the step in flight; a torn last line of a
log (a kill in the middle of a write) is dropped.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dlzo.data.user_data import file_digest
from dlzo.engine.checkpoint import atomic_write_json, atomic_write_text, load_tensors, save_tensors
from dlzo.engine.zo import ZOOptimizer
from dlzo.errors import DlzoError, first_line
from dlzo.model.loading import resolve_device
from dlzo.training.config import TrainConfig, same_path_option
from dlzo.training.prepare import Prepared, load_into, prepare_model

# Keys that do not change what a run trained (where it lives, how it logs, where its frozen prefix is kept on
# disk): a kept run, reused as finished by a sweep or a learning-rate grid, must agree on every other one,
# steps included.
FREE_FOR_A_KEPT_RUN = ("out", "resume", "quiet", "report_to", "prefix_store")
# Keys that may differ between an interrupted run and its resumption.
_FREE_ON_RESUME = (*FREE_FOR_A_KEPT_RUN, "steps")
DIVERGED = "diverged.json"  # marks a learning-rate grid's run stopped by non-finite losses
# Lock files this process holds now. A lock naming our own pid is stale unless it is in here: then a second
# train() in this process (a notebook cell run twice, a thread) is writing the same folder.
_HELD: set[Path] = set()


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
    """One training run's folder. All writes are atomic or append-only, so a crash never loses a finished step."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.run_file = self.path / "run.json"
        self.metrics = self.path / "metrics.jsonl"
        self.trajectory = self.path / "trajectory.jsonl"
        self.results = self.path / "results.json"
        self.lock_file = self.path / "lock"
        self._locked = False

    # ------------------------------------------------------------------------------ before any work

    def check(self, config: TrainConfig) -> dict | None:
        """A new run must not land in an old run's folder; a resumed one must have the same arguments.
        Returns the interrupted run's record when resuming."""
        if not config.resume:
            if self.trajectory.exists():
                raise DlzoError(f"--out {self.path} already holds a run; pass --resume {self.path} to continue it, "
                                f"or another --out")
            return None
        if not self.run_file.exists():
            raise DlzoError(f"--resume {self.path}: no run.json there, nothing to resume")
        previous = json.loads(self.run_file.read_text())
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
        return previous

    def changed_option(self, config: TrainConfig, free: Iterable[str]) -> tuple[str, object, object] | None:
        """The first option of `config`, `free` ones aside, that differs from this folder's run.json: (name,
        then, now); None when all agree. Keys added after that run was written hold their default in it."""
        recorded = json.loads(self.run_file.read_text())["config"]
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        for key, now in asdict(config).items():
            was = recorded.get(key, defaults.get(key))
            if key not in free and not same_path_option(key, was, now):
                return key, was, now
        return None

    def changed_since_kept(self, config: TrainConfig) -> tuple[str, object, object] | None:
        """For a run reused as finished (a sweep's or a learning-rate grid's): the first option, steps
        included, that differs from what trained it; None when all agree."""
        changed = self.changed_option(config, FREE_FOR_A_KEPT_RUN)
        if changed is None:  # the same path may hold other rows now (resume checks this too: check_same_data)
            kept = json.loads(self.run_file.read_text()).get("data") or {}
            changed = changed_data_file(kept, {"sha256": file_digest(config.data),
                                               "eval_sha256": file_digest(config.eval_data)})
            if changed:
                flag, was, now = changed
                option = {"--data": "data", "--eval-data": "eval_data"}[flag]
                return f"{option} (content)", f"sha256 {was[:12]}...", f"sha256 {now[:12]}..."
        return changed

    def lock(self) -> None:
        """Hold the folder for this process: a second run on it fails at once naming the holder; a lock left
        by a dead process is taken over."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DlzoError(f"--out {self.path}: cannot create the folder ({err.strerror})") from None
        for _ in range(2):
            try:
                handle = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and _another_live_process(holder):
                    raise DlzoError(f"--out {self.path} is in use by process {holder} (its lock file: {self.lock_file}); "
                                    f"wait for it or stop it") from None
                if holder == os.getpid() and self.lock_file.resolve() in _HELD:
                    raise DlzoError(f"--out {self.path} is in use by another run of this process (its lock file: "
                                    f"{self.lock_file}); let that run finish first") from None
                print(f"taking over the stale lock of process {holder} in {self.path} (it is no longer running)")
                self.lock_file.unlink(missing_ok=True)
                continue
            except OSError as err:
                raise DlzoError(f"--out {self.path}: cannot write there ({err.strerror})") from None
            with os.fdopen(handle, "w") as f:
                f.write(f"{os.getpid()}\n")
            self._locked = True
            _HELD.add(self.lock_file.resolve())
            return
        raise DlzoError(f"--out {self.path}: could not take the lock {self.lock_file}")

    def unlock(self) -> None:
        if self._locked:
            if self._holder() == os.getpid():
                self.lock_file.unlink(missing_ok=True)
            _HELD.discard(self.lock_file.resolve())
        self._locked = False

    def live_holder(self) -> int | None:
        """The process holding the folder, if it still runs."""
        holder = self._holder()
        return holder if holder is not None and _another_live_process(holder) else None

    def _holder(self) -> int | None:
        try:
            return int(self.lock_file.read_text().strip())
        except (OSError, ValueError):
            return None

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
        atomic_write_json(self.results, results)

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
        config = json.loads(self.run_file.read_text()).get("config", {})
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
                "diverged": (self.path / DIVERGED).exists(), "optimizer": config.get("optimizer", "zo")}

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
    except PermissionError:
        return True
    return True


def changed_data_file(kept: dict, now: dict) -> tuple[str, str, str] | None:
    """The first data file whose sha256 differs between a run's record (its run.json "data") and now: (flag,
    then, now), the flag --data or --eval-data; None when both agree or either side has no digest."""
    for key, flag in (("sha256", "--data"), ("eval_sha256", "--eval-data")):
        if kept.get(key) and now.get(key) and kept[key] != now[key]:
            return flag, kept[key], now[key]
    return None


def _recorded_config(folder: str | Path) -> dict:
    """The options of run.json in `folder`; empty when there is none readable (the command then says why)."""
    try:
        recorded = json.loads((Path(folder) / "run.json").read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def recorded_options(folder: str | Path) -> dict:
    """The options a run in `folder` was started with (its run.json), as defaults for `dlzo train --resume`:
    the flags given again must agree with them, so they need not be given. Empty when there is no readable
    run.json (RunFolder.check then says why); where, how to log, and options dlzo no longer has are left out."""
    known = {f.name for f in fields(TrainConfig)} - {"out", "resume", "quiet", "report_to"}
    return {key: value for key, value in _recorded_config(folder).items() if key in known}


# The training options that decide a run's test figure, under the names `dlzo eval` gives them.
TEST_OPTIONS = {"num_test": "num_test", "data_seed": "data_seed", "max_length": "max_length",
                "eval_batch_size": "batch_size"}


def recorded_test_options(folder: str | Path) -> dict:
    """Defaults for `dlzo eval --run`: which test rows the run was scored on, how each was cut and batched, so
    that it reproduces the run's results.json unless flags say otherwise (it sampled the whole validation
    split at eval's own defaults before, whatever --num-test the run had). A run trained with --num-test 0 (a
    learning-rate grid's) had no test rows: eval's own count stands."""
    recorded = _recorded_config(folder)
    if not recorded.get("num_test"):
        recorded.pop("num_test", None)
    return {TEST_OPTIONS[key]: value for key, value in recorded.items() if key in TEST_OPTIONS}


def checked_load(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint; a damaged file is one line naming it and what to do."""
    try:
        return load_tensors(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise _damaged(path, err) from None


def checkpoint_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), "pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise _damaged(path, err) from None


def _damaged(path: Path, err: Exception) -> DlzoError:
    return DlzoError(f"checkpoint {path} cannot be read ({first_line(err)}); delete it to resume "
                     f"from the trajectory log alone (dlzo replays every logged step)")


# ------------------------------------------------------------------------------ a recorded run's model


def build_for_run(run: str | Path, base_model: str | None = None, device: str = "", dtype: str = ""
                  ) -> tuple[Prepared, dict]:
    """The model of a recorded run with its scope resolved (tuned tensors still at their base values),
    and the run's record: what replay, export and eval start from. `device` and `dtype` (eval's and
    generate's flags), when given (not auto), replace the run's; a run trained on a device this machine lacks
    (--device cuda) is loaded on auto (it failed on a flag the user never passed)."""
    run = Path(run)
    if not (run / "run.json").exists():
        raise DlzoError(f"--run {run}: no run.json there (not a dlzo run folder)")
    record = json.loads((run / "run.json").read_text())
    known = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in record["config"].items() if k in known}
    given = {name: value for name, value in (("device", device), ("dtype", dtype)) if value and value != "auto"}
    if "device" not in given and not _available(values.get("device", "auto")):
        print(f"the run was trained on --device {values['device']}, which this machine lacks: using auto")
        given["device"] = "auto"
    config = TrainConfig(**{**values, "model": base_model or values["model"], "quiet": True, **given})
    prepared = prepare_model(config, [], record.get("layer_choice"))
    if base_model:
        _check_base_fits(prepared, record, run, base_model)
    return prepared, record


def _check_base_fits(prepared: Prepared, record: dict, run: Path, base_model: str) -> None:
    """Another base model than the run's (--base, --model) must have the tensors the run tuned, of their shapes:
    else one line before any work (replay wrote --to and then raised a traceback; generate raised in copy_)."""
    params = dict(prepared.model.named_parameters())
    missing = [name for name in record.get("tuned_names", []) if name not in params]
    if missing:
        raise DlzoError(f"{base_model}: has no tensor {missing[0]}, which the run in {run} tuned; is it the run's "
                        f"base model ({record['config']['model']})?")
    checkpoint = next((run / f"{n}.safetensors" for n in ("final", "last", "best")
                       if (run / f"{n}.safetensors").exists()), None)
    if checkpoint is None:
        return
    try:
        with safe_open(str(checkpoint), "pt") as handle:
            shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError):
        return  # a damaged checkpoint: checked_load names it when it is read
    for name, shape in shapes.items():
        if name in params and list(params[name].shape) != shape:
            raise DlzoError(f"{base_model}: tensor {name} is {list(params[name].shape)}, the run in {run} tuned "
                            f"it as {shape}; is it the run's base model ({record['config']['model']})?")


def _available(device: str) -> bool:
    try:
        resolve_device(device)
    except DlzoError:
        return False
    return True


def load_checkpoint_of_run(run: str | Path, which: str = "best", base_model: str | None = None, device: str = "",
                           dtype: str = "") -> Prepared:
    """The run's model with the tuned tensors of its `which` checkpoint (best, last or final) loaded."""
    checkpoint = Path(run) / f"{which}.safetensors"
    if not checkpoint.exists():
        raise DlzoError(f"--run {run}: {checkpoint.name} not found")
    prepared, _ = build_for_run(run, base_model, device, dtype)
    load_into(prepared.model, checked_load(checkpoint))
    return prepared


