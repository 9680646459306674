import json
import re

import pytest

from conftest import SHARED
from dlzo.studies.demo import run_demo
from dlzo.studies.options import DemoConfig

pytestmark = [pytest.mark.slow, pytest.mark.requires_shared]


def test_demo_runs_end_to_end_on_stories(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DLZO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    headline = run_demo(DemoConfig(shared=str(SHARED), out=str(out), model="stories260k", steps=2,
                                   num_dev=8, num_test=8, dominant_lr=1e-3, full_mezo_lr=1e-4))
    # stories260K has no massive activations: the probe finds none and the guarded rule tunes the last layer
    assert headline["dominant_layer"] is None and headline["trained_layer"] == 4
    sensitivity = json.loads((out / "sensitivity" / "sensitivity.json").read_text())
    assert [layer["layer"] for layer in sensitivity["layers"]] == [0, 1, 2, 3, 4]
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


def test_demo_without_sample_assets_fetches_model_and_sst2_from_the_hub(tmp_path, monkeypatch, capsys):
    """A clone outside this project's machines: no --shared assets, so the model comes from the hub id
    (replaced here by stories260K's local folder: this machine is offline) and SST-2 from the hub's GLUE
    (served by a patched datasets.load_dataset from the official rows, in the hub's schema)."""
    import csv

    datasets = pytest.importorskip("datasets")
    from conftest import DATA, STORIES

    def rows(split: str) -> list[dict]:  # enough train rows for MeZO's 1000 train + 500 dev
        with open(DATA / "glue" / "SST-2" / f"{split}.tsv", encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            return [{"sentence": r["sentence"], "label": int(r["label"]), "idx": i}
                    for i, r in zip(range(1600), reader)]

    asked = []

    def load_dataset(path, name=None, split=None, **kwargs):
        asked.append((path, name, split))
        table = datasets.Dataset.from_list(rows("train" if split == "train" else "dev"))
        return table.cast_column("label", datasets.ClassLabel(names=["negative", "positive"]))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("DLZO_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "no-assets"
    empty.mkdir()
    headline = run_demo(DemoConfig(shared=str(empty), out=str(tmp_path / "demo"), hub_model=str(STORIES), steps=2,
                                   num_dev=8, num_test=8))
    assert "no sample assets in" in capsys.readouterr().out
    assert {call[:2] for call in asked} == {("nyu-mll/glue", "sst2")}
    run = json.loads((tmp_path / "demo" / "runs" / "dominant" / "run.json").read_text())
    assert run["config"]["model"] == str(STORIES) and run["config"]["data_dir"] == "hf"
    assert 0 <= headline["dominant_accuracy"] <= 1
