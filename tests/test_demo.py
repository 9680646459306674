import json
import re

from conftest import SHARED
from dlzo.studies.demo import run_demo
from dlzo.studies.options import DemoConfig


def test_demo_runs_end_to_end_on_stories(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DLZO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    headline = run_demo(DemoConfig(shared=str(SHARED), out=str(out), model="stories260k", steps=2,
                                   num_dev=8, num_test=8, lr=1e-3, full_lr=1e-4))
    # stories260K has no massive activations: the probe finds none and training falls back to sensitivity
    assert headline["dominant_layer"] is None and 0 <= headline["trained_layer"] < 5
    sensitivity = json.loads((out / "sensitivity" / "sensitivity.json").read_text())
    signal = [layer["mean"] for layer in sensitivity["layers"]]
    assert headline["trained_layer"] == max(range(len(signal)), key=signal.__getitem__)
    # the headline repeats the files it summarises
    assert json.loads((out / "headline.json").read_text()) == headline
    dominant = json.loads((out / "runs" / "dominant" / "results.json").read_text())
    full = json.loads((out / "runs" / "full" / "results.json").read_text())
    assert headline["dominant_accuracy"] == dominant["test_value"] and headline["full_mezo_accuracy"] == full["test_value"]
    assert headline["step_speedup"] == full["seconds_per_step"] / dominant["seconds_per_step"]
    zero_shot = json.loads((out / "zeroshot" / "eval.json").read_text())
    assert headline["zero_shot_accuracy"] == zero_shot["value"] and zero_shot["num_examples"] == 8
    # every picture the report links exists and is a PNG
    report = (out / "report.md").read_text()
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert pictures
    for picture in pictures:
        assert (out / picture).read_bytes()[:4] == b"\x89PNG"
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
