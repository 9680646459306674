"""The run folder's one owner (dlzo.training.run_folder.RunFolder): a damaged folder is one line from every
command that reads it; "start, resume or reuse" is one decision (RunFolder.decide) that checks a finished run's
options before any study reuses it; the lock is the OS's, so of several processes taking over a stale one
exactly one wins."""

import json
import multiprocessing
import os
import subprocess
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from conftest import SMALL_RUN, STORIES, flags
from dlzo.cli.main import main
from dlzo.errors import DlzoError
from dlzo.studies.demo import run_demo, train_configs
from dlzo.studies.options import DemoConfig
from dlzo.training.config import TrainConfig
from dlzo.training.run_folder import RESTART, RESUME, REUSE, START, RunFolder

DAMAGED = {"not JSON": "{\"config\": {\"steps\": 4", "no config": json.dumps({"layer_choice": None}),
           "config not an object": json.dumps({"config": ["steps", 4]}), "not an object": "[1, 2]"}
SAYS = {"not JSON": "run.json: not valid JSON", "no config": "run.json: has no \"config\"",
        "config not an object": "run.json: has no \"config\"", "not an object": "run.json: not a JSON object"}


def one_line_error(args: list, capsys) -> str:
    """The command's stderr, checked to be one dlzo error line with exit 2 (no traceback)."""
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2, args
    err = capsys.readouterr().err
    assert err.startswith("dlzo: error:") and err.count("\n") == 1, err
    return err


def dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_run_json_is_one_line_from_every_command_that_reads_it(tmp_path, capsys, damage):
    """eval --run and report printed a traceback (KeyError: 'config', JSONDecodeError); train --resume and
    generate --run read the same file: each names run.json and what is wrong with it, exit 2."""
    run = tmp_path / "runs" / "broken"
    run.mkdir(parents=True)
    (run / "run.json").write_text(DAMAGED[damage])
    for args in (["eval", "--run", run], ["report", tmp_path, "--out", tmp_path / "report.md"],
                 ["train", "--resume", run], ["generate", "--run", run, "--prompt", "Once"]):
        err = one_line_error(args, capsys)
        assert f"{run / 'run.json'}" in err and SAYS[damage] in err, (args, err)
    assert not (tmp_path / "report.md").exists()


def test_a_damaged_results_json_is_one_line_from_report(tmp_path, capsys):
    run = tmp_path / "runs" / "done"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"config": {"steps": 2}}))
    (run / "results.json").write_text("{\"scope\": ")
    err = one_line_error(["report", tmp_path, "--out", tmp_path / "report.md"], capsys)
    assert f"{run / 'results.json'}: not valid JSON" in err


def test_a_folder_that_is_no_run_is_one_line_naming_it(tmp_path, capsys):
    """train --resume of a folder without run.json said "--model is required"; now it says what the folder is."""
    (tmp_path / "notes.txt").write_text("not a run")
    for flag, command in (("--resume", "train"), ("--run", "eval"), ("--run", "generate")):
        extra = ["--prompt", "Once"] if command == "generate" else []
        for folder in (tmp_path, tmp_path / "missing"):
            err = one_line_error([command, flag, folder, *extra], capsys)
            assert f"{flag} {folder}: no run.json there (not a dlzo run folder)" in err, err


def kept(folder: Path, config: TrainConfig, finished: bool = True) -> RunFolder:
    """A run folder as a run of `config` leaves it: run.json, a logged step, results.json when finished."""
    run = RunFolder(folder)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_record({"config": asdict(config)})
    run.log_step({"step": 0, "seeds": ["1"], "grads": [0.5], "lr": config.lr, "skipped": False})
    if finished:
        run.write_results({"test_value": 0.5, "seconds_per_step": 1.0, "layer": 1})
    return run


def test_one_decision_reuses_only_a_run_trained_as_asked(tmp_path, capsys):
    """RunFolder.decide, as every study asks it: nothing -> start; a finished run trained with the same options
    -> reuse, any other option (steps included) -> one line; an interrupted ZO run -> resume, its options
    checked as --resume checks them (steps may grow); one that cannot resume -> emptied and started again."""
    config = TrainConfig(model="m", task="sst2", steps=4, lr=1e-3, out=str(tmp_path / "run"))
    assert RunFolder(config.out).decide(config, study=True) == START
    run = kept(tmp_path / "run", config)
    assert run.decide(replace(config, out="elsewhere", quiet=True), study=True) == REUSE
    for change, said in (({"steps": 5}, "trained with steps=4, now 5 is asked"),
                         ({"lr": 1e-2}, "trained with lr=0.001, now 0.01 is asked")):
        with pytest.raises(DlzoError, match=said):
            run.decide(replace(config, **change), study=True)
    refuse = lambda key, was, now: DlzoError(f"mine: {key} {was} {now}")  # noqa: E731
    with pytest.raises(DlzoError, match="mine: steps 4 5"):
        run.decide(replace(config, steps=5), study=True, refuse=refuse)
    interrupted = kept(tmp_path / "interrupted", config, finished=False)
    assert interrupted.decide(replace(config, steps=8), study=True) == RESUME
    with pytest.raises(DlzoError, match="--lr was 0.001 in that run, now 0.01"):
        interrupted.decide(replace(config, lr=1e-2), study=True)
    assert interrupted.decide(config, study=True, no_resume="no optimizer state on disk") == RESTART
    assert not interrupted.is_started() and not interrupted.trajectory.exists()
    assert "starts again from step 0 (no optimizer state on disk)" in capsys.readouterr().out
    # dlzo train decides by its flags: a new run never lands on an old one, --resume continues it
    with pytest.raises(DlzoError, match="already holds a run; pass --resume"):
        run.decide(config)
    assert run.decide(replace(config, resume=config.out, steps=6)) == RESUME


def test_the_demo_refuses_a_finished_run_of_other_options_before_any_work(tmp_path, monkeypatch):
    """The demo reused a finished run whatever its options, so `dlzo demo --steps N` could report an older
    run's figures as N steps'; now a kept run of other options is one line before the probe starts."""
    shared = tmp_path / "shared"
    monkeypatch.setenv("DLZO_SHARED", str(shared))  # the demo sets it for its own process
    (shared / "data" / "glue" / "SST-2").mkdir(parents=True)
    out = tmp_path / "demo"
    before = DemoConfig(shared=str(shared), out=str(out), model="stories260k", steps=2)
    for _, config in train_configs(before, "stories260k", shared / "data", out):
        kept(Path(config.out), config)
    with pytest.raises(DlzoError, match=r"runs/dominant holds a finished run trained with steps=2, now 3 is asked"):
        run_demo(replace(before, steps=3))
    assert sorted(p.name for p in out.iterdir()) == ["runs"]  # no probe, no sensitivity, no zero-shot
    # the same options: both runs are what the demo would train, so they are reused
    for _, config in train_configs(before, "stories260k", shared / "data", out):
        assert RunFolder(config.out).decide(config, study=True) == REUSE


def _contend(folder: str, start, tried, outcomes) -> None:
    """One of several processes taking the same folder at the same moment."""
    run = RunFolder(folder)
    start.wait()
    try:
        run.lock()
        outcomes.put(("won", os.getpid()))
    except DlzoError as err:
        outcomes.put(("refused", str(err)))
    tried.wait()  # the winner holds the lock until every contender has tried
    run.unlock()


@pytest.mark.slow
def test_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
    """The pid-file lock checked, then acted: two processes taking over a dead run's lock could both delete
    it and both write their own. Now the OS's lock decides: in each of ten rounds of four processes released
    at once on a folder whose pid file names a dead process, exactly one wins and the others name it."""
    context = multiprocessing.get_context("fork")  # the test's own process, dlzo imported: no re-import
    contenders = 4
    for _ in range(10):  # the old lock let two win in about a third of such rounds
        RunFolder(tmp_path).path.mkdir(exist_ok=True)
        RunFolder(tmp_path).holder_file.write_text(f"{dead_pid()}\n")
        start, tried, outcomes = context.Barrier(contenders), context.Barrier(contenders), context.Queue()
        processes = [context.Process(target=_contend, args=(str(tmp_path), start, tried, outcomes))
                     for _ in range(contenders)]
        for process in processes:
            process.start()
        results = [outcomes.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(timeout=120)
            assert process.exitcode == 0
        winners = [pid for kind, pid in results if kind == "won"]
        assert len(winners) == 1, results
        refusals = [message for kind, message in results if kind == "refused"]
        assert all(f"in use by process {winners[0]}" in message for message in refusals), refusals
        assert not RunFolder(tmp_path).holder_file.exists()  # the winner let go


@pytest.mark.requires_shared
def test_the_end_of_run_line_names_the_file_the_dev_rows_came_from(tmp_path, capsys):
    """With --eval-data the line said "200 held-out rows of cls-train ... pass --eval-data for an untouched
    set": the rows are --eval-data's, which was passed. It names that file; without it, the held-out rows."""
    rows = [{"prompt": f"Is {i} even? Answer:", "options": [" yes", " no"], "label": i % 2} for i in range(24)]
    train_file, dev_file = tmp_path / "cls-train.jsonl", tmp_path / "cls-dev.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    dev_file.write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    common = dict(model=str(STORIES), batch_size=4, lr=1e-3, steps=2, eval_every=0, scope="layer:1",
                  eval_batch_size=SMALL_RUN["eval_batch_size"], quiet=True, data=str(train_file))
    capsys.readouterr()
    assert main(["train", *flags(dict(common, eval_data=str(dev_file), out=str(tmp_path / "with")))]) == 0
    printed = capsys.readouterr().out
    assert "dev accuracy" in printed and f"on 8 rows of {dev_file} (they also chose the checkpoint" in printed
    assert "held-out rows" not in printed and "pass --eval-data" not in printed
    assert main(["train", *flags(dict(common, out=str(tmp_path / "without")))]) == 0
    printed = capsys.readouterr().out
    assert "held-out rows of cls-train (they also chose the checkpoint; pass --eval-data" in printed
