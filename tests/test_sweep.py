import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from conftest import STORIES, another_process_holding, flags, small_run
from dlzo.errors import DlzoError
from dlzo.studies import race
from dlzo.studies.options import RUN_NAME, SweepConfig
from dlzo.studies.report import report
from dlzo.studies.sweep import (
    _check_probe_is_for,
    _decide,
    _sweep_runs,
    sweep,
)
from dlzo.training.config import TrainConfig
from dlzo.training.run_folder import RESTART, START, RunFolder

FAST = small_run("quiet", "eval_batch_size", num_train=32)


@pytest.mark.slow
@pytest.mark.requires_shared
def test_sweep_writes_entries_resumes_and_plots(tmp_path, capsys):
    config = SweepConfig(**FAST, out=str(tmp_path), layers="0,3", references="full", steps=3, eval_every=0)
    summary = sweep(config)
    names = [e["name"] for e in summary["runs"]]
    assert names[-1] == "full" and {"layer00", "layer03"} <= set(names)
    entry = summary["runs"][0]
    assert {"scope", "layer", "test_metric", "dev_loss_start", "dev_loss_end", "steps", "seconds"} <= set(entry)
    assert "best single layer" in summary["verdict"]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    stamp = (tmp_path / "runs" / "layer00" / "results.json").stat().st_mtime_ns
    sweep(config)  # re-running skips finished runs
    assert (tmp_path / "runs" / "layer00" / "results.json").stat().st_mtime_ns == stamp


@pytest.mark.requires_shared
def test_sweep_rejects_bad_layers(tmp_path):
    with pytest.raises(DlzoError, match="layer 9 does not exist"):
        sweep(SweepConfig(**FAST, out=str(tmp_path), layers="9", references="", steps=1))




@pytest.mark.slow
@pytest.mark.requires_shared
def test_two_only_processes_share_one_sweep_folder_and_match_one_sweep(tmp_path):
    """Two `dlzo sweep --only` processes at once, each training its own run in one folder, leave what one sweep
    leaves: the same entries to the last digit; the verdict waits for every run, and the sweep without --only
    afterwards trains nothing again."""
    common = flags(dict(FAST, layers="0,1", references="", steps=2, eval_every=0, out=str(tmp_path / "shared")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lanes = [subprocess.Popen([sys.executable, "-m", "dlzo", "sweep", *common, "--only", name], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for name in ("layer00", "layer01")]
    outputs = [lane.communicate()[0] for lane in lanes]
    assert [lane.returncode for lane in lanes] == [0, 0], outputs
    for output, own, other in ((outputs[0], "layer00", "layer01"), (outputs[1], "layer01", "layer00")):
        # each lane trained its own run only; it ends on the verdict or, if the other lane was still running,
        # on the other run pending
        assert f"runs/{own}/results.json" in output and f"runs/{other}/results.json" not in output, output
        assert f"not finished yet ({other})" in output or "best single layer" in output, output
    stamps = {n: (tmp_path / "shared" / "runs" / n / "results.json").stat().st_mtime_ns for n in ("layer00", "layer01")}
    config = SweepConfig(**FAST, layers="0,1", references="", steps=2, eval_every=0)
    joined = sweep(replace(config, out=str(tmp_path / "shared")))
    assert {n: (tmp_path / "shared" / "runs" / n / "results.json").stat().st_mtime_ns for n in stamps} == stamps
    # the reference sweep with the same thread count: another count sums in another order (last digits differ)
    subprocess.run([sys.executable, "-m", "dlzo", "sweep", *common[:-1], str(tmp_path / "alone")], env=env, check=True,
                   capture_output=True)
    alone = json.loads((tmp_path / "alone" / "sweep.json").read_text())
    strip = lambda s: [{k: v for k, v in e.items() if "seconds" not in k} for e in s["runs"]]  # noqa: E731
    assert strip(joined) == strip(alone) and joined["verdict"] == alone["verdict"] and "pending" not in joined


@pytest.mark.slow
@pytest.mark.requires_shared
def test_only_trains_the_named_runs_and_the_verdict_waits_for_the_rest(tmp_path):
    config = SweepConfig(**FAST, out=str(tmp_path / "s"), layers="0,1", references="", steps=2, eval_every=0)
    first = sweep(replace(config, only="layer01"))
    assert [e["name"] for e in first["runs"]] == ["layer01"] and first["pending"] == ["layer00"]
    assert "verdict" not in first and not (tmp_path / "s" / "sweep.png").exists()
    assert not (tmp_path / "s" / "runs" / "layer00").exists()
    kept = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert kept["pending"] == ["layer00"] and [e["name"] for e in kept["runs"]] == ["layer01"]
    assert "Verdict: waiting for layer00 (not finished yet)" in report([str(tmp_path / "s")], str(tmp_path / "r.md"))
    # a finished run trained otherwise is refused before the other process trains anything
    with pytest.raises(DlzoError, match="layer01 was trained with lr=0.001, but this sweep runs layer01 with lr=0.01"):
        sweep(replace(config, lr=1e-2, only="layer00"))
    assert not (tmp_path / "s" / "runs" / "layer00").exists()
    second = sweep(replace(config, only="layer00"))
    assert [e["name"] for e in second["runs"]] == ["layer00", "layer01"] and "pending" not in second
    assert "best single layer" in second["verdict"] and (tmp_path / "s" / "sweep.png").exists()
    # per seed: no seeds.json while a seed has runs left
    seeds = sweep(replace(config, out=str(tmp_path / "seeds"), seeds="0,1", only="layer00"))
    assert seeds["pending"] == {"seed0": ["layer01"], "seed1": ["layer01"]}
    assert not (tmp_path / "seeds" / "seeds.json").exists()


@pytest.mark.requires_shared
def test_only_names_a_run_of_the_sweep_before_anything_is_trained(tmp_path):
    config = SweepConfig(**FAST, out=str(tmp_path / "s"), layers="0,1", references="full", steps=1, eval_every=0)
    with pytest.raises(DlzoError, match=r"--only 'layer3' is not a run name \(layer<KK> such as layer03"):
        sweep(replace(config, only="layer3"))
    assert not (tmp_path / "s").exists()
    with pytest.raises(DlzoError, match="--only ',' names no run"):
        sweep(replace(config, only=","))
    assert not (tmp_path / "s").exists()
    with pytest.raises(DlzoError, match="--only layer05: not a run of this sweep \\(its runs: layer00, layer01, full\\)"):
        sweep(replace(config, only="layer00,layer05", lr_grid="1e-3,1e-2"))
    assert not (tmp_path / "s" / "runs").exists() and not (tmp_path / "s" / "grid").exists()  # before the grid


def test_every_name_a_sweep_gives_its_runs_is_an_only_name():
    config = SweepConfig(**FAST, layers="all", references="full,lora,adamw,lezo:2,lezo:12")
    names = [name for name, _ in _sweep_runs(config, 120, None)]
    assert {"layer00", "layer119", "full", "lora", "adamw", "lezo2", "lezo12"} <= set(names)
    assert all(re.fullmatch(RUN_NAME, name) for name in names)
    assert not any(re.fullmatch(RUN_NAME, name) for name in ("layer3", "layer", "Full", "lezo", "layer03 "))


@pytest.mark.slow
@pytest.mark.requires_shared
def test_sweep_over_seeds_summarises_each_run_across_seeds(tmp_path):
    config = SweepConfig(**FAST, out=str(tmp_path), layers="1", references="lezo:2", steps=2, eval_every=0,
                         seeds="0,1")
    summary = sweep(config)
    assert sorted(summary["runs"]) == ["layer01", "lezo2"]
    row = summary["runs"]["layer01"]
    values = [json.loads((tmp_path / f"seed{s}" / "runs" / "layer01" / "results.json").read_text())["test_value"]
              for s in (0, 1)]
    assert row["n"] == 2 and row["test"]["values"] == values and row["test"]["mean"] == pytest.approx(sum(values) / 2)
    trajectories = [(tmp_path / f"seed{s}" / "runs" / "layer01" / "trajectory.jsonl").read_text() for s in (0, 1)]
    assert trajectories[0] != trajectories[1]  # the seeds differ
    assert json.loads((tmp_path / "seeds.json").read_text())["runs"]["lezo2"]["scope"] == "lezo:2"


@pytest.mark.slow
@pytest.mark.requires_shared
def test_sweep_of_references_only(tmp_path):
    summary = sweep(SweepConfig(**FAST, out=str(tmp_path), layers="none", references="full", steps=1, eval_every=0))
    assert [e["name"] for e in summary["runs"]] == ["full"] and summary["verdict"] == "no single-layer runs"
    assert (tmp_path / "sweep.png").exists()


@pytest.mark.slow
@pytest.mark.requires_shared
def test_the_lr_grid_picks_each_scopes_rate_on_its_last_dev_loss_and_resumes(tmp_path, monkeypatch):
    """Grid runs have no test examples and the grid seed; the chosen rate is the argmin of the dev loss at the
    last grid step (read back from each run's metrics), the full runs of every seed train at it, and a second
    sweep reruns no grid run."""
    import dlzo.studies.lr_grid as lr_grid
    from dlzo.training.run_folder import RunFolder

    trained = []
    original = lr_grid.train
    monkeypatch.setattr(lr_grid, "train", lambda config: trained.append(config) or original(config))
    config = SweepConfig(**FAST, out=str(tmp_path), layers="1", references="full", steps=2, eval_every=0,
                         seeds="0,1", lr_grid="1e-2,1e-4", grid_steps=2, grid_seed=5)
    summary = sweep(config)
    assert len(trained) == 4 and {(c.seed, c.num_test, c.steps) for c in trained} == {(5, 0, 2)}
    grid = json.loads((tmp_path / "grid" / "grid.json").read_text())
    for name in ("layer01", "full"):
        losses = {lr: RunFolder(tmp_path / "grid" / f"{name}-lr{lr:g}").dev_losses()[2] for lr in (1e-2, 1e-4)}
        assert grid["chosen"][name]["lr"] == min(losses, key=losses.get)
        assert grid["chosen"][name]["dev_loss_at_last_step"] == {f"{lr:g}": v for lr, v in losses.items()}
        for seed in (0, 1):
            run = json.loads((tmp_path / f"seed{seed}" / "runs" / name / "run.json").read_text())
            assert run["config"]["lr"] == grid["chosen"][name]["lr"] and run["config"]["seed"] == seed
    assert sorted(summary["runs"]) == ["full", "layer01"]
    sweep(config)
    assert len(trained) == 4
    # a finished run at another rate is not reported under the grid's rate
    other = 1e-2 if grid["chosen"]["full"]["lr"] == 1e-4 else 1e-4
    with pytest.raises(DlzoError, match=f"trained with lr={grid['chosen']['full']['lr']:g}.*runs full with lr={other:g}"):
        sweep(replace(config, seeds="", seed=0, out=str(tmp_path / "seed0"), lr_grid="",
                      lr=grid["chosen"]["layer01"]["lr"], full_lr=other))
    # nor one trained with other steps (its dev curve and test figure answer another question)
    with pytest.raises(DlzoError, match="layer01 was trained with steps=2, but this sweep runs layer01 with steps=3"):
        sweep(replace(config, seeds="", seed=0, out=str(tmp_path / "seed0"), lr_grid="", steps=3,
                      lr=grid["chosen"]["layer01"]["lr"]))


@pytest.mark.slow
@pytest.mark.requires_shared
def test_a_kept_grid_gives_the_rates_without_training_the_grid_again(tmp_path, monkeypatch):
    """--grid-from: a study continued on another machine takes the rates from its committed grid.json (the grid's
    run folders are not there); every seed trains at them, no grid run is made, and the sweep records where the
    rates came from. A file that is not such a grid.json, or of other rates, steps or seed, is one line before
    anything is written; one without a rate for a scope of this sweep is one line before any run."""
    import dlzo.studies.lr_grid as lr_grid

    monkeypatch.setattr(lr_grid, "train", lambda config: pytest.fail(f"grid run trained: {config.out}"))
    kept = tmp_path / "grid.json"
    chosen = {"layer01": {"lr": 1e-2}, "full": {"lr": 1e-4}}
    kept.write_text(json.dumps({"rates": [1e-4, 1e-2], "steps": 2, "seed": 5, "chosen": chosen}))
    config = SweepConfig(**FAST, out=str(tmp_path / "s"), layers="1", references="full", steps=2, eval_every=1,
                         seeds="1", lr_grid="1e-2,1e-4", grid_steps=2, grid_seed=5, grid_from=str(kept))
    sweep(config)
    for name, rate in (("layer01", 1e-2), ("full", 1e-4)):
        run = json.loads((tmp_path / "s" / "seed1" / "runs" / name / "run.json").read_text())
        assert run["config"]["lr"] == rate and run["config"]["seed"] == 1
    record = json.loads((tmp_path / "s" / "seed1" / "sweep.json").read_text())
    assert record["lr_grid"]["kept_from"] == str(kept) and not (tmp_path / "s" / "grid").exists()
    (bad_json := tmp_path / "bad.json").write_text("{")
    (no_chosen := tmp_path / "nochosen.json").write_text(json.dumps({"rates": [1e-4, 1e-2], "steps": 2, "seed": 5}))
    (no_rate := tmp_path / "norate.json").write_text(json.dumps({"rates": [1e-4, 1e-2], "steps": 2, "seed": 5,
                                                                  "chosen": {**chosen, "full": {}}}))
    best = {e["name"]: e["best_step"] for e in record["runs"]}
    for name, step in best.items():
        losses = RunFolder(tmp_path / "s" / "seed1" / "runs" / name).dev_losses()
        assert losses[step] == min(losses.values())
    for change, message in ((dict(lr_grid="1e-2,1e-3"), r"its grid had rates \[0.0001, 0.01\], this sweep has "
                                                         r"--lr-grid \[0.001, 0.01\]"),
                            (dict(grid_steps=3), "its grid had steps 2, this sweep has --grid-steps 3"),
                            (dict(grid_seed=0), "its grid had seed 5, this sweep has --grid-seed 0"),
                            (dict(lr_grid=""), "--grid-from needs --lr-grid"),
                            (dict(grid_from=str(tmp_path / "none.json")), "none.json: cannot read"),
                            (dict(grid_from=str(bad_json)), "bad.json: not JSON"),
                            (dict(grid_from=str(no_chosen)), "nochosen.json: not a grid.json"),
                            (dict(grid_from=str(no_rate)), "norate.json: the rate chosen for full is None")):
        with pytest.raises(DlzoError, match=message):
            sweep(replace(config, out=str(tmp_path / "bad"), **change))
        assert not (tmp_path / "bad").exists()
    with pytest.raises(DlzoError, match=r"grid.json: no rate for layer03 \(it chose rates for full, layer01\)"):
        sweep(replace(config, out=str(tmp_path / "other"), layers="3"))
    assert not (tmp_path / "other" / "seed1" / "runs").exists()


@pytest.mark.requires_shared
def test_a_bad_lr_grid_is_one_line_before_anything_is_written(tmp_path):
    for grid, message in (("fast", "--lr-grid 'fast'"), ("0,1e-3", "positive"), ("1e-3", "--grid-steps")):
        with pytest.raises(DlzoError, match=message):
            sweep(SweepConfig(**FAST, out=str(tmp_path / "s"), layers="1", references="", steps=1, lr_grid=grid,
                              grid_steps=0 if grid == "1e-3" else 60))
    assert not (tmp_path / "s").exists()


@pytest.mark.requires_shared
def test_a_sweep_with_nothing_to_run_or_a_bad_reference_stops_before_writing(tmp_path):
    for layers, references, message in (("none", "", "--layers none and no --references: nothing to sweep"),
                                        ("1", "full,lezo:0", "--references: 'lezo:0' is not full, lora, adamw"),
                                        ("1", "ful", "--references: 'ful' is not")):
        with pytest.raises(DlzoError, match=message):
            sweep(SweepConfig(**FAST, out=str(tmp_path / "s"), layers=layers, references=references, steps=1))
    assert not (tmp_path / "s").exists()


def _scripted_train(curves: dict[float, list[float] | None], calls: list):
    """A stand-in for dlzo.training.loop.train writing what a grid run leaves (run.json, metrics.jsonl, results.json):
    curves[lr] are the dev losses at steps 0, 1, ..., None makes the run diverge."""
    from dlzo.errors import Diverged

    def fake(config):
        calls.append(config.lr)
        folder = Path(config.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.json").write_text(json.dumps({"config": asdict(config)}))
        if curves[config.lr] is None:
            raise Diverged("5 non-finite losses in a row")
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "dev_loss": v}) + "\n"
                                                      for i, v in enumerate(curves[config.lr])))
        (folder / "results.json").write_text("{}")
    return fake


def test_the_grid_judges_the_last_step_not_the_best_seen_and_marks_diverged_rates(tmp_path, monkeypatch):
    """1e-2 has the lowest dev loss seen (0.2 at step 1) but the worst at the last step; 1e-1 diverges; 1e-3
    wins at the last step. Rerunning trains nothing; other grid options are refused; all-diverged is one line."""
    import dlzo.studies.lr_grid as lr_grid

    calls = []
    monkeypatch.setattr(lr_grid, "train", _scripted_train({1e-3: [0.9, 0.5, 0.4], 1e-2: [0.9, 0.2, 0.8],
                                                           1e-1: None}, calls))
    base = TrainConfig(model="m", task="sst2", eval_every=0)
    runs = [("layer01", {"scope": "layer:1", "lr": 5.0}), ("adamw", {"scope": "full", "optimizer": "adamw",
                                                                      "lr": 1e-5})]
    record = lr_grid.choose_rates(base, runs, [1e-3, 1e-2, 1e-1], 2, tmp_path)
    assert record["chosen"] == {"layer01": {"lr": 1e-3, "dev_loss_at_last_step": {"0.001": 0.4, "0.01": 0.8,
                                                                                   "0.1": None}}}
    assert RunFolder(tmp_path / "layer01-lr0.1").diverged() and sorted(calls) == [1e-3, 1e-2, 1e-1]
    lr_grid.choose_rates(base, runs, [1e-3, 1e-2, 1e-1], 2, tmp_path)
    assert len(calls) == 3
    with pytest.raises(DlzoError, match="trained with steps=2, the grid now asks for 3"):
        lr_grid.choose_rates(base, runs, [1e-3], 3, tmp_path)
    with pytest.raises(DlzoError, match="every rate diverged for layer01"):
        lr_grid.choose_rates(base, runs, [1e-1], 2, tmp_path)


def test_a_kept_run_whose_data_file_changed_is_not_reused(tmp_path):
    """A finished run is reused by a sweep or grid only if its --data/--eval-data files hold what they held
    (the paths agreeing is not enough: the rows behind the kept numbers would be other rows)."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "one"}\n{"text": "two"}\n')
    config = TrainConfig(data=str(rows), out=str(tmp_path / "run"))
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    digest = hashlib.sha256(rows.read_bytes()).hexdigest()
    folder.write_record({"config": asdict(config), "data": {"sha256": digest}})
    assert folder.changed_since_kept(config) is None
    rows.write_text('{"text": "one"}\n{"text": "three"}\n')
    assert folder.changed_since_kept(config)[0] == "data (content)"
    (folder.path / "results.json").write_text("{}")  # finished: reused only if trained as asked
    with pytest.raises(DlzoError, match=r"trained with data \(content\)=.*give --out another folder"):
        _decide(folder.path, config, "layer01")


def test_the_layer_rule_binds_a_kept_run_only_under_scope_dominant(tmp_path):
    """A layer:K run trained under the older default rule (sun) never read it: a study reuses it under guarded,
    as a race's recipe; a --scope dominant run, whose layer the rule chose, is refused."""
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    for scope, changed in (("layer:11", None), ("dominant", ("rule", "sun", "guarded"))):
        folder.write_record({"config": asdict(TrainConfig(scope=scope, rule="sun", out=str(folder.path)))})
        assert folder.changed_since_kept(TrainConfig(scope=scope, out=str(folder.path))) == changed
    record = {"recipe_config": race.recipe_record(TrainConfig(scope="layer:11", rule="sun"))}
    assert "rule" not in record["recipe_config"]
    race.check_same_recipe({"recipe_config": {"rule": "sun", "scope": "layer:11"}}, TrainConfig(scope="layer:11"),
                           tmp_path)
    with pytest.raises(DlzoError, match="--rule 'sun'"):
        race.check_same_recipe({"recipe_config": {"rule": "sun"}}, TrainConfig(scope="dominant"), tmp_path)


def test_a_kept_probe_of_another_model_or_task_is_refused(tmp_path):
    """OUT/probe.json chose the layers swept: one measured on another model or task's texts is refused (it
    was reused whatever model produced it); probes from before the check, saying nothing, are taken."""
    now = {"model": str(STORIES), "task": "cb", "data": ""}
    _check_probe_is_for(tmp_path / "probe.json", None, now)
    _check_probe_is_for(tmp_path / "probe.json", {**now, "model": str(STORIES) + "/."}, now)  # same folder
    for key, other in (("model", str(tmp_path)), ("task", "rte")):
        with pytest.raises(DlzoError, match=f"measured with --{key}"):
            _check_probe_is_for(tmp_path / "probe.json", {**now, key: other}, now)


def test_an_interrupted_first_order_reference_starts_again(tmp_path, capsys):
    """AdamW runs keep no optimizer state, so a sweep cannot resume one (every later sweep stopped on the
    refused --resume): its folder is emptied, unless a live process holds it."""
    run_dir = tmp_path / "runs" / "adamw"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"config": {"steps": 5, "optimizer": "adamw"}}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 0.7}) + "\n")
    config = TrainConfig(optimizer="adamw", scope="full", out=str(run_dir))
    with another_process_holding(run_dir) as holder:
        with pytest.raises(DlzoError, match=f"in use by process {holder}"):
            _decide(run_dir, config, "adamw")
        assert (run_dir / "run.json").exists() and (run_dir / "metrics.jsonl").exists()
    (run_dir / "lock").write_text(f"{os.getpid()}\n")  # our own pid, left by a process before a restart: stale
    assert _decide(run_dir, config, "adamw") == RESTART
    assert not (run_dir / "run.json").exists() and not (run_dir / "metrics.jsonl").exists()
    assert "starts again from step 0" in capsys.readouterr().out
    assert _decide(run_dir, config, "adamw") == START
