import json
import statistics

import pytest

from dlzo.report import format_seed_summary, seed_summary


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
