import json

import pytest

from conftest import DATA, STORIES
from dlzo.errors import DlzoError
from dlzo.options import SweepConfig
from dlzo.sweep import sweep

FAST = dict(model=str(STORIES), task="sst2", data_dir=str(DATA), num_train=32, num_dev=16, num_test=16,
            batch_size=4, lr=1e-3)


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


def test_sweep_rejects_bad_layers(tmp_path):
    with pytest.raises(DlzoError, match="layer 9 does not exist"):
        sweep(SweepConfig(**FAST, out=str(tmp_path), layers="9", references="", steps=1))




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


def test_sweep_of_references_only(tmp_path):
    summary = sweep(SweepConfig(**FAST, out=str(tmp_path), layers="none", references="full", steps=1, eval_every=0))
    assert [e["name"] for e in summary["runs"]] == ["full"] and summary["verdict"] == "no single-layer runs"
    assert (tmp_path / "sweep.png").exists()
