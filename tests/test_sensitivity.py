import json
import re

import pytest

from conftest import DATA, STORIES
from dlzo.data.benchmarks import load_task
from dlzo.engine.layer_choice import layer_sensitivity, leading_batches, rank_correlation
from dlzo.errors import DlzoError
from dlzo.model.loading import load_model, load_tokenizer
from dlzo.studies.options import SensitivityConfig
from dlzo.studies.report import report
from dlzo.studies.sensitivity import sensitivity

pytestmark = pytest.mark.requires_shared


def test_sensitivity_command_and_report(tmp_path):
    data = sensitivity(SensitivityConfig(model=str(STORIES), data_dir=str(DATA), out=str(tmp_path / "s"),
                                         seeds=2, batches=1, batch_size=4))
    assert len(data["layers"]) == 5 and len(data["propagation"]) == 5
    assert json.loads((tmp_path / "s" / "sensitivity.json").read_text())["most_sensitive_layer"] == \
        data["most_sensitive_layer"]
    text = report([str(tmp_path / "s")], str(tmp_path / "report.md"))
    assert "Perturbation sensitivity" in text
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert pictures  # the sensitivity plot is linked
    for picture in pictures:
        assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"


def test_stability_repeats_on_other_directions_and_batches(tmp_path):
    data = sensitivity(SensitivityConfig(model=str(STORIES), data_dir=str(DATA), out=str(tmp_path / "s"),
                                         seeds=2, batches=1, batch_size=4, stability=True))
    second = data["stability"]["second_means"]
    model, tokenizer = load_model(str(STORIES)), load_tokenizer(str(STORIES))
    examples = load_task("sst2", DATA).splits(seed=0).train
    batches = leading_batches(model, tokenizer, examples, 4, 1, skip=1)  # the batch after the first measurement's
    expected = [s.mean for s in layer_sensitivity(model, batches, 1e-3, 2, first_seed=2)]
    assert second == expected and second != [d["mean"] for d in data["layers"]]
    assert data["stability"]["rank_correlation"] == rank_correlation([d["mean"] for d in data["layers"]], second)


def test_no_direction_or_no_batch_is_one_line(tmp_path):
    for flags, message in (({"seeds": 0}, "--seeds must be at least 1, not 0"),
                           ({"batches": 0}, "--batches must be at least 1, not 0"),
                           ({"eps": 0.0}, "--eps must be a positive finite number")):
        with pytest.raises(DlzoError, match=message):
            sensitivity(SensitivityConfig(model=str(STORIES), data_dir=str(DATA), out=str(tmp_path / "s"), **flags))
    assert not (tmp_path / "s").exists()
