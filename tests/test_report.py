import json
import os
import statistics
import subprocess

import pytest

from dlzo.errors import DlzoError
from dlzo.studies.report import format_seed_summary, report, seed_summary, unfinished_lines
from dlzo.studies.spread import spread


def test_seed_summary_gives_mean_sample_std_and_standard_error(tmp_path):
    tests, devs = [0.70, 0.74, 0.66], [0.50, 0.52, 0.58]
    for seed, (test, dev) in enumerate(zip(tests, devs)):
        run = tmp_path / f"seed{seed}" / "runs" / "layer11"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({
            "scope": "layers [11]", "steps": 300, "test_value": test, "test_metric": "accuracy",
            "dev_loss_best": dev, "seconds_per_step": 1.0 + seed}))
        curve = [{"step": 0, "dev_loss": 0.9}, {"step": 100 * (seed + 1), "dev_loss": dev}, {"step": 300, "dev_loss": 0.8}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(c) + "\n" for c in curve))
    row = seed_summary(tmp_path)["layer11"]
    assert row["n"] == 3 and row["best_steps"] == [100, 200, 300]
    assert row["test"]["mean"] == pytest.approx(statistics.fmean(tests))
    assert row["test"]["std"] == pytest.approx(statistics.stdev(tests))
    assert row["test"]["se"] == pytest.approx(statistics.stdev(tests) / 3**0.5)
    assert row["dev_best"]["mean"] == pytest.approx(statistics.fmean(devs))
    assert "0.7000 ± 0.0400 (0.0231)" in format_seed_summary({"layer11": row})


def test_seed_summary_takes_the_seeds_asked_and_the_runs_each_sweep_reported(tmp_path):
    """seeds.json averaged every seed*/runs/* on disk: an earlier study's seeds in the same folder and a run
    folder moved aside (runs/layer11.old) were averaged in. Now: the sweep's --seeds, and in each seed the runs
    its sweep.json reports; a group mixing recipes (other steps) is one line, not a mean."""
    def finished(seed: int, name: str, test: float, steps: int = 300) -> None:
        run = tmp_path / f"seed{seed}" / "runs" / name
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"scope": "layers [11]", "steps": steps, "test_value": test,
                                                      "test_metric": "accuracy", "dev_loss_best": 0.5,
                                                      "seconds_per_step": 1.0}))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "dev_loss": 0.5}) + "\n")

    for seed, test in ((0, 0.70), (1, 0.74), (5, 0.10)):
        finished(seed, "layer11", test)
        (tmp_path / f"seed{seed}" / "sweep.json").write_text(json.dumps({"runs": [{"name": "layer11"}]}))
    finished(0, "layer11.old", 0.20)
    summary = seed_summary(tmp_path, [0, 1])
    assert list(summary) == ["layer11"] and summary["layer11"]["test"]["values"] == [0.70, 0.74]
    assert seed_summary(tmp_path)["layer11"]["test"]["values"] == [0.70, 0.74, 0.10]  # report: every seed folder
    finished(2, "layer11", 0.72, steps=60)
    with pytest.raises(DlzoError, match="steps 60, but seed0's layer11 has 300"):
        seed_summary(tmp_path, [0, 1, 2])


def test_seeds_whose_run_folders_are_elsewhere_are_taken_from_their_sweep_json(tmp_path):
    """A study continued on another machine has its earlier seeds only as the committed sweep.json files: their
    entries join the seeds finished here (the same figures the sweep reported), and the mean is over all."""
    run = tmp_path / "seed2" / "runs" / "layer05"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"scope": "layers [5]", "steps": 300, "test_value": 0.50,
                                                  "test_metric": "accuracy", "dev_loss_best": 0.70,
                                                  "seconds_per_step": 20.0}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "dev_loss": d}) + "\n"
                                               for s, d in ((0, 2.0), (250, 0.70), (300, 0.71))))
    (tmp_path / "seed2" / "sweep.json").write_text(json.dumps({"runs": [{"name": "layer05"}]}))
    for seed, test, dev, best in ((0, 0.571, 0.787, None), (1, 0.536, 0.757, 300)):
        (tmp_path / f"seed{seed}").mkdir()
        entry = {"name": "layer05", "scope": "layer:5", "metric": "accuracy", "test_metric": test,
                 "dev_loss_end": dev, "steps": 300, "seconds_per_step": 26.0}
        (tmp_path / f"seed{seed}" / "sweep.json").write_text(json.dumps(
            {"runs": [entry if best is None else {**entry, "best_step": best}]}))
    row = seed_summary(tmp_path, [0, 1, 2])["layer05"]
    assert row["test"]["values"] == [0.571, 0.536, 0.50] and row["dev_best"]["values"] == [0.787, 0.757, 0.70]
    assert row["best_steps"] == [None, 300, 250] and row["seeds"] == ["seed0", "seed1", "seed2"]
    assert row["scope"] == "layers [5]"  # a sweep entry names the option (layer:5), a run the tuned layers
    assert row["test"]["mean"] == pytest.approx(statistics.fmean([0.571, 0.536, 0.50]))
    # a seed with run folders reports only them: a run moved aside is not brought back from its entry
    (tmp_path / "seed2" / "sweep.json").write_text(json.dumps({"runs": [{**entry, "name": "layer05"}]}))
    run.rename(run.with_name("layer05.old"))
    assert seed_summary(tmp_path)["layer05"]["test"]["values"] == [0.571, 0.536]
    run.with_name("layer05.old").rename(run)
    # within a source scopes must agree (entries name the option), across sources steps and metric must
    (tmp_path / "seed0" / "sweep.json").write_text(json.dumps({"runs": [{**entry, "scope": "layer:6"}]}))
    with pytest.raises(DlzoError, match=r"seed1/sweep.json \(layer05\): scope 'layer:5', but seed0's layer05 "
                                        r"has 'layer:6'"):
        seed_summary(tmp_path)
    (tmp_path / "seed0" / "sweep.json").write_text(json.dumps({"runs": [{**entry, "steps": 60}]}))
    with pytest.raises(DlzoError, match="seed1/sweep.json .layer05.: steps 300, but seed0's layer05 has 60"):
        seed_summary(tmp_path)
    (tmp_path / "seed0" / "sweep.json").write_text(json.dumps({"runs": [{**entry, "metric": "1/perplexity",
                                                                          "test_metric": 0.25}]}))
    with pytest.raises(DlzoError, match="test_metric 'accuracy', but seed0's layer05 has 'perplexity'"):
        seed_summary(tmp_path)


def test_one_seed_has_no_spread_and_the_summary_stays_strict_json(tmp_path):
    """A run with one seed (full MeZO at equal time in the study) has a mean and no std or SE: None, written
    as null (NaN is not JSON) and shown as '-'; a seed with no figure (None) is left out of n."""
    run = tmp_path / "seed0" / "runs" / "full"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"scope": "full", "steps": 72, "test_value": 0.6411,
                                                  "test_metric": "accuracy", "dev_loss_best": 0.6164,
                                                  "seconds_per_step": 4.0}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 24, "dev_loss": 0.6164}) + "\n")
    summary = seed_summary(tmp_path)
    json.dumps(summary, allow_nan=False)
    assert summary["full"]["test"] == {"mean": 0.6411, "std": None, "se": None, "n": 1, "values": [0.6411]}
    assert "| 0.6411 ± - (-) | 0.6164 ± - (-) | [24] | 4.00 |" in format_seed_summary(summary)
    assert spread([None, 2.0, 4.0]) == {"mean": 3.0, "std": 2**0.5, "se": 1.0, "n": 2, "values": [2.0, 4.0]}
    assert spread([None])["mean"] is None


def test_two_folders_of_one_name_keep_both_pictures(tmp_path):
    probe = {"model": "m", "num_tokens": 4, "dtype": "float32", "dominant_layer": 1,
             "layers": [{"index": 0, "max_abs": 1.0, "median_abs": 0.5, "ratio": 2.0}]}
    for parent, content in (("a", b"\x89PNG first"), ("b", b"\x89PNG second")):
        folder = tmp_path / parent / "probe"
        folder.mkdir(parents=True)
        (folder / "probe.json").write_text(json.dumps(probe))
        (folder / "probe.png").write_bytes(content)
    text = report([str(tmp_path / "a" / "probe"), str(tmp_path / "b" / "probe")], str(tmp_path / "r" / "report.md"))
    links = [line.split("(")[1].rstrip(")") for line in text.splitlines() if line.startswith("![probe]")]
    assert len(set(links)) == 2
    assert [(tmp_path / "r" / link).read_bytes() for link in links] == [b"\x89PNG first", b"\x89PNG second"]


def test_report_says_how_far_each_unfinished_run_got_and_whether_it_runs(tmp_path, capsys, request):
    """`dlzo report SWEEP` on a study still running: each run with run.json and no results.json, its logged
    steps, dev losses, pace (from one process's timed records only) and holder: alive, or stopped with the
    command that resumes it. Finished runs are not listed there."""
    def run(name: str, steps: int, logged: int, timed: list[tuple[int, float]], dev: dict[int, float],
            holder: int | None) -> None:
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"config": {"steps": steps}}))
        (folder / "trajectory.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(logged)))
        records = [{"step": s, "loss": 0.7, "elapsed_s": t} for s, t in timed]
        records += [{"step": s, "dev_loss": v} for s, v in dev.items()]
        records.sort(key=lambda r: (r["step"], "loss" in r))  # as training writes them: step N's evaluation
                                                              # (after N steps) before step N's loss
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        if holder is not None:
            (folder / "lock").write_text(str(holder))

    gone = subprocess.Popen(["true"])  # a finished child: its pid runs no more
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])  # a live holder (not this process: our own pid in a lock is stale)
    request.addfinalizer(lambda: (alive.kill(), alive.wait()))
    run("live", 300, 130, [(100, 10.0), (110, 30.0), (120, 110.0)], {0: 1.7, 50: 0.9, 120: 1.1}, alive.pid)
    run("killed", 60, 12, [(0, 400.0), (10, 3.0)], {0: 1.7}, gone.pid)  # restarted: no pace across processes
    run("done", 60, 60, [], {0: 1.7}, None)
    run("race-recipe", 60, 12, [], {0: 1.7}, None)  # a race's finished recipe: race-recipe.json, no results.json
    (tmp_path / "runs" / "race-recipe" / "race-recipe.json").write_text("{}")
    run("own-pid", 60, 3, [], {0: 1.7}, os.getpid())  # a lock naming this process: left before a restart
    run("grid-diverged", 60, 7, [], {0: 1.7}, None)
    (tmp_path / "runs" / "grid-diverged" / "diverged.json").write_text("{}")
    run("adamw", 20, 0, [(0, 1.0), (10, 21.0)], {0: 1.7, 15: 1.2}, None)  # first-order: no trajectory
    run_json = tmp_path / "runs" / "adamw" / "run.json"
    run_json.write_text(json.dumps({"config": {"steps": 20, "optimizer": "adamw"}}))
    (tmp_path / "runs" / "done" / "results.json").write_text(json.dumps(
        {"scope": "layers [3]", "optimizer": "zo", "steps": 60, "test_metric": None, "test_value": None,
         "dev_loss_start": 1.7, "dev_loss_best": 1.7, "seconds_per_step": 1.0}))
    rows = unfinished_lines(tmp_path)
    assert rows[2].startswith("| run | steps logged")
    assert rows[4] == ("| runs/adamw | 15 of 20 | 1.2000 at step 15 | 1.2000 | 2.0 s/step, about 0 min of steps left "
                       "| stopped: starts again from step 0 (first-order runs do not resume) |")
    assert rows[5].startswith("| runs/grid-diverged | 7 of 60 |") and "| diverged (a grid's rate" in rows[5]
    assert rows[6] == (f"| runs/killed | 12 of 60 | 1.7000 at step 0 | 1.7000 | - | stopped: dlzo train --resume "
                       f"{tmp_path / 'runs' / 'killed'} |")
    # the pace of the last two records with no evaluation between them (100 -> 110, not 110 -> 120 around one)
    assert rows[7] == (f"| runs/live | 130 of 300 | 1.1000 at step 120 | 0.9000 | 2.0 s/step, about 6 min of steps "
                       f"left | running (process {alive.pid}) |")
    assert rows[8].startswith("| runs/own-pid | 3 of 60 |") and "stopped: dlzo train --resume" in rows[8]
    assert len(rows) == 10 and not any("runs/done" in row or "race-recipe" in row for row in rows)
    report([str(tmp_path)], str(tmp_path / "report.md"))
    assert rows[7] in (tmp_path / "report.md").read_text() and rows[7] in capsys.readouterr().out
