"""Faults and bad input: a kill loses at most the step in flight, one run per folder, every bad value refused
before any work with one line and exit 2. Each test is named in docs/reliability.md."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import STORIES, another_process_holding, flags, small_run, tiny_model
from dlzo.cli.main import main
from dlzo.errors import DlzoError
from dlzo.training.config import TrainConfig
from dlzo.training.loop import Session, train
from dlzo.training.run_folder import RunFolder
from dlzo.training.run_model import build_for_run

pytestmark = pytest.mark.requires_shared

SMALL = small_run(num_dev=8, num_test=8)


def logged_steps(folder) -> int:
    path = folder / "trajectory.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_repeatedly(folder, options: dict, kills: int, seed: int) -> None:
    """Start the run, SIGKILL it at a random step, resume, ... `kills` times, then let it finish. A run that
    finished before all its kills were delivered fails the test (it would have tested fewer resumes)."""
    rng = random.Random(seed)
    base = [sys.executable, "-m", "dlzo", "train", *flags(options)]
    killed = 0
    for attempt in range(kills + 1):
        command = base + (["--resume", str(folder)] if attempt else [])
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt < kills:
            target = logged_steps(folder) + rng.randint(1, 3)
            deadline = time.time() + 120
            while process.poll() is None and time.time() < deadline:
                if logged_steps(folder) >= target:
                    time.sleep(rng.random() * 0.02)  # anywhere in the step: the log line, the update, a save
                    process.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
        _, err = process.communicate(timeout=300)
        assert process.returncode in (0, -signal.SIGKILL), err
        killed += process.returncode == -signal.SIGKILL
        if process.returncode == 0:
            break
    assert killed == kills, f"only {killed} of the {kills} kills landed before the run finished"


def assert_same_run(reference, resumed) -> None:
    a, b = load_file(reference / "final.safetensors"), load_file(resumed / "final.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    lines = [json.loads(x) for x in (resumed / "trajectory.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (reference / "trajectory.jsonl").read_text().splitlines()]
    assert lines == ref  # every step once, same seeds, same projected gradients, same lr


@pytest.mark.slow
def test_ten_random_kills_in_a_row_resume_bit_identically(tmp_path):
    options = dict(SMALL, steps=40, eval_every=7, scope="layer:1", q=2, lr_scheduler="cosine", warmup_steps=3)
    train(TrainConfig(**options, out=str(tmp_path / "reference")))
    kill_repeatedly(tmp_path / "killed", dict(options, out=str(tmp_path / "killed")), kills=10, seed=os.getpid())
    assert_same_run(tmp_path / "reference", tmp_path / "killed")


@pytest.mark.slow
@pytest.mark.parametrize("scope,extra", [("full", {"fast_path": False}), ("lora", {"lr": 1e-2}), ("layer:2", {"q": 3})])
def test_kills_resume_bit_identically_for_every_perturbation(tmp_path, scope, extra):
    options = dict(SMALL, steps=16, eval_every=5, scope=scope, **extra)
    train(TrainConfig(**options, out=str(tmp_path / "reference")))
    kill_repeatedly(tmp_path / "killed", dict(options, out=str(tmp_path / "killed")), kills=3, seed=len(scope))
    assert_same_run(tmp_path / "reference", tmp_path / "killed")


@pytest.mark.slow
def test_resume_replays_logged_steps_after_the_checkpoint(tmp_path, capsys):
    """Killed after step 7 with the last checkpoint at 5: resume re-applies 6 and 7 instead of recomputing."""
    options = dict(SMALL, steps=10, eval_every=5, scope="layer:1")
    train(TrainConfig(**options, out=str(tmp_path / "reference")))
    killed = tmp_path / "killed"
    train(TrainConfig(**{**options, "steps": 5}, out=str(killed)))
    checkpoint_at_5 = (killed / "last.safetensors").read_bytes()
    train(TrainConfig(**{**options, "steps": 7}, out=str(killed), resume=str(killed)))
    (killed / "last.safetensors").write_bytes(checkpoint_at_5)  # as if killed after logging step 6
    for name in ("final.safetensors", "results.json"):
        (killed / name).unlink()
    # the kill landed in the middle of writing step 7's log line
    with open(killed / "trajectory.jsonl", "a") as handle:
        handle.write('{"step": 7, "seeds": ["12')
    capsys.readouterr()
    train(TrainConfig(**options, out=str(killed), resume=str(killed)))
    assert "at step 7 (2 logged steps re-applied" in capsys.readouterr().out
    assert_same_run(tmp_path / "reference", killed)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(tmp_path):
    options = dict(SMALL, steps=400, eval_every=0, scope="layer:1", out=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-m", "dlzo", "train", *flags(options)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while logged_steps(tmp_path) < 3 and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.count("\n") == 1 and f"--resume {tmp_path}" in err
    from safetensors import safe_open

    with safe_open(str(tmp_path / "last.safetensors"), "pt") as handle:
        assert int(handle.metadata()["step"]) == logged_steps(tmp_path)
    assert not (tmp_path / "lock").exists()


def test_sigterm_while_setting_up_stops_at_once_and_resume_alone_finishes(tmp_path, capsys, monkeypatch):
    """A signal during the setup (here: as the first dev loss is measured) stops at once with exit 130 and the
    resume command, which needs no other flag: the run's recorded arguments are its defaults. The finished run
    equals one never stopped."""
    options = dict(SMALL, steps=4, eval_every=2, scope="layer:1")
    measure = Session.dev_loss_at_start

    def killed_inside_a_catch_all(self):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except Exception:  # as a model loader's catch-all: the stop must not be taken for an error there
            pass
        return measure(self)

    monkeypatch.setattr(Session, "dev_loss_at_start", killed_inside_a_catch_all)
    assert main(["train", *flags(dict(options, out=str(tmp_path / "stopped")))]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stopped by SIGTERM before training began" in err
    assert f"continue with: dlzo train --resume {tmp_path / 'stopped'}" in err
    assert not (tmp_path / "stopped" / "lock").exists()
    monkeypatch.setattr(Session, "dev_loss_at_start", measure)
    assert main(["train", "--resume", str(tmp_path / "stopped")]) == 0
    assert main(["train", *flags(dict(options, out=str(tmp_path / "whole")))]) == 0
    stopped, whole = (load_file(tmp_path / name / "final.safetensors") for name in ("stopped", "whole"))
    assert stopped.keys() == whole.keys() and all(torch.equal(stopped[k], whole[k]) for k in whole)
    assert main(["train", "--resume", str(tmp_path / "stopped"), "--lr", "1"]) == 2  # given flags must agree
    assert "--lr was 0.001 in that run, now 1.0" in capsys.readouterr().err


def test_outputs_that_cannot_be_written_are_one_line(tmp_path, capsys):
    """export --to naming a file (transformers' save_pretrained only logged it: 'wrote' and nothing written),
    replay --to below a file: one line, exit 2, the file untouched."""
    run = tmp_path / "run"
    assert main(["train", *flags(dict(SMALL, steps=2, eval_every=0, scope="layer:1", out=str(run)))]) == 0
    (tmp_path / "afile").write_text("keep")
    for args, message in ((["export", "--run", run, "--to", tmp_path / "afile"], "a file of that name exists"),
                          (["export", "--run", run, "--to", tmp_path / "afile", "--adapter"], "a file of that name"),
                          (["export", "--run", run, "--to", tmp_path / "afile" / "x"], "is a file, not a folder"),
                          (["replay", "--run", run, "--to", tmp_path / "afile" / "x.safetensors"], "is a file, not"),
                          (["replay", "--run", run, "--to", tmp_path], "that is a folder")):
        capsys.readouterr()
        assert main([str(a) for a in args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "--to" in err, err
    assert (tmp_path / "afile").read_text() == "keep"
    # a folder holding an earlier export: its files would stay beside the new ones (an adapter_config.json
    # next to merged weights is loaded onto them by transformers); an empty folder is fine
    (tmp_path / "empty").mkdir()
    assert main(["export", "--run", str(run), "--to", str(tmp_path / "empty")]) == 0
    before = sorted(p.name for p in (tmp_path / "empty").iterdir())
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--to", str(tmp_path / "empty"), "--adapter"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a model (config.json" in err
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == before


def test_a_base_model_that_does_not_fit_the_run_is_one_line_before_any_work(tmp_path, capsys):
    """replay --base / generate --model naming another model than the run's: its tensors of the tuned names
    have other shapes (here a 32-wide Llama against stories260K's 64). replay wrote --to and then raised a
    traceback; generate raised in copy_. Now one line naming the model and the tensor, exit 2, nothing written."""
    run = tmp_path / "run"
    assert main(["train", *flags(dict(SMALL, steps=2, eval_every=0, scope="layer:1", out=str(run)))]) == 0
    other = tmp_path / "other"
    tiny_model("llama").save_pretrained(other)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(STORIES / name, other / name)
    for args in (["replay", "--run", str(run), "--base", str(other), "--to", str(tmp_path / "x.safetensors")],
                 ["generate", "--run", str(run), "--model", str(other), "--prompt", "Once"]):
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{other}: tensor model.layers.1." in err and "the run's base model" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_run_trained_on_a_device_this_machine_lacks_is_loaded_on_auto(tmp_path, capsys):
    """A run trained with --device cuda:3 is generated from (and evaluated) here on auto, with a note (it
    failed on '--device cuda:3', a flag the user never passed); a command's own --device/--dtype win."""
    run = tmp_path / "run"
    assert main(["train", *flags(dict(SMALL, steps=1, eval_every=0, scope="layer:1", out=str(run)))]) == 0
    record = json.loads((run / "run.json").read_text())
    record["config"]["device"] = "cuda:3"
    (run / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "--prompt", "Once", "--max-new-tokens", "2"]) == 0
    assert "trained on --device cuda:3, which this machine lacks: using auto" in capsys.readouterr().out
    prepared, _ = build_for_run(run, device="cpu", dtype="bfloat16")
    assert prepared.config.device == "cpu" and next(prepared.model.parameters()).dtype == torch.bfloat16


@pytest.mark.slow
def test_wandb_without_a_login_is_one_line_before_anything_is_written(tmp_path):
    """In a fresh interpreter: wandb keeps process-wide settings (another test's offline mode would pass)."""
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))  # no ~/.netrc, no stored key
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "dlzo", "train",
                          *flags(dict(SMALL, steps=2, scope="layer:1", out=str(out), report_to="wandb"))],
                         capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.count("\n") == 1 and "dlzo: error: --report-to wandb" in run.stderr
    assert not out.exists()


def test_second_run_on_a_live_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    """The lock is the OS's (filelock): a live holder refuses a second run naming its pid; killed, it lets go,
    and its pid left beside the lock is taken over with a message. A pid file alone holds nothing: our own
    pid left there (a container's PID 1 before a restart) is stale too."""
    out = tmp_path / "run"
    args = ["train", *flags(dict(SMALL, steps=1, eval_every=0, scope="layer:1", out=str(out)))]
    with another_process_holding(out) as holder:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"in use by process {holder}" in err
    assert main(args) == 0  # the holder was killed: its lock went with it, its pid file stayed
    assert f"taking over the stale lock of process {holder}" in capsys.readouterr().out
    assert not RunFolder(out).holder_file.exists()
    folder = RunFolder(tmp_path / "restarted")  # a lock naming our own pid, left by a process before a restart
    folder.path.mkdir()
    folder.holder_file.write_text(f"{os.getpid()}\n")
    folder.lock()
    assert f"taking over the stale lock of process {os.getpid()}" in capsys.readouterr().out
    second = RunFolder(tmp_path / "restarted")  # but a second run in this process, while the first holds it
    with pytest.raises(DlzoError, match="in use by another run of this process"):
        second.lock()
    folder.unlock()
    second.lock()  # free again once the first let go
    second.unlock()
    assert not folder.holder_file.exists()


@pytest.mark.parametrize("change,message", [
    ({"lr": -1}, "--lr must be a positive finite number"),
    ({"lr": "nan"}, "--lr must be a positive finite number"),
    ({"eps": 0}, "--eps must be a positive finite number"),
    ({"eval_every": -1}, "--eval-every must not be negative"),
    ({"num_dev": -5}, "--num-dev must be -1"),
    ({"dtype": "float8"}, "argument --dtype: invalid choice: 'float8'"),
    ({"device": "tpu"}, "--device 'tpu' is not"),
    ({"model": "/nonexistent/model", "data_dir": "/nonexistent/data"}, "model path not found: /nonexistent/model"),
    ({"task": "nope"}, "--task 'nope' is not one of sst2, rte"),
    ({"data_dir": "/nonexistent/data"}, "data file not found: /nonexistent/data/glue/SST-2/"),
    ({"scope": "layer:99"}, "layer 99 does not exist"),
    ({"max_length": 1}, "--max-length 1 is below the longest answer"),
    ({"num_train": 0, "num_dev": 2000}, "no training examples"),
    ({"rule": "median"}, "argument --rule: invalid choice: 'median'"),
    ({"lr_scheduler": "exp"}, "argument --lr-scheduler: invalid choice: 'exp'"),
])
def test_bad_values_are_one_line_exit_2_and_nothing_written(tmp_path, capsys, change, message):
    out = tmp_path / "out"
    assert main(["train", *flags({**SMALL, "steps": 1, "eval_every": 0, "scope": "layer:1", "out": str(out), **change})]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlzo: error:") and err.count("\n") == 1 and message in err, err
    # the folder's lock (taken before the layer and the answers' lengths are checked) is no output
    assert not out.exists() or not any(p.name not in ("lock", "lock.flock") for p in out.iterdir())


def test_lora_targets_flag_exists_and_names_peft_modules(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path), steps=1, eval_every=0, scope="lora", lora_targets="k_proj,o_proj"))
    names = json.loads((tmp_path / "run.json").read_text())["tuned_names"]
    assert names and all(("k_proj" in n or "o_proj" in n) and "lora_" in n for n in names)


def test_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    options = dict(SMALL, steps=4, eval_every=2, scope="layer:1", out=str(tmp_path))
    train(TrainConfig(**options))
    (tmp_path / "final.safetensors").unlink()
    (tmp_path / "last.safetensors").write_bytes(b"\x10\x00garbage")
    capsys.readouterr()  # the in-process run's own output
    assert main(["train", *flags(options), "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "last.safetensors") in err and "delete it" in err


def test_disk_full_is_one_line_and_leaves_no_half_written_file(tmp_path, capsys, monkeypatch):
    import dlzo.model.checkpoint as checkpoint

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")  # the device filled up in the middle of the write
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(checkpoint, "save_file", full)
    out = tmp_path / "out"
    assert main(["train", *flags(dict(SMALL, steps=2, eval_every=0, scope="layer:1", out=str(out)))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert not [p.name for p in out.iterdir() if p.suffix == ".safetensors" or p.name.startswith(".")]


def test_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", *flags(dict(SMALL, steps=1, scope="layer:1", out=str(blocker / "run")))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlzo: error: --out") and err.count("\n") == 1
