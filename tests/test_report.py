import json
import statistics

import pytest

from dlzo.report import format_seed_summary, report, seed_summary
from dlzo.spread import spread


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
