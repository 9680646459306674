import json

import pytest

from conftest import DATA, STORIES, tiny_model
from dlzo.analysis import (
    SensitivityConfig,
    SweepConfig,
    layer_sensitivity,
    propagation,
    report,
    sensitivity,
    sweep,
)
from dlzo.errors import DlzoError
from dlzo.scoring import encode
from dlzo.tasks import load_task

FAST = dict(model=str(STORIES), task="sst2", data_dir=str(DATA), num_train=32, num_dev=16, num_test=16,
            batch_size=4, lr=1e-3)


def test_sensitivity_matches_brute_force_perturbation(stories_tokenizer):
    """Every layer, two batches: the prefix below each layer is computed once per batch and reused, and
    each value must still equal perturbing that layer in place and running the whole model."""
    from dlzo.analysis import layer_parameters
    from dlzo.scoring import batch_loss
    from dlzo.zo import ZOOptimizer

    model = tiny_model("llama")
    examples = load_task("sst2", DATA).splits(num_train=8, num_dev=0, num_test=1).train
    batches = [encode(stories_tokenizer, examples[:4]), encode(stories_tokenizer, examples[4:])]
    results = layer_sensitivity(model, batches, eps=1e-2, seeds=2)
    assert [r.layer for r in results] == [0, 1, 2, 3]
    for result in results:
        named = layer_parameters(model, result.layer)
        sampler = ZOOptimizer(named, seed=10_000 + result.layer)  # the measurement's seed for this layer
        expected = []
        for seed in range(2):
            zs = [sampler.sample(seed, i, p) for i, (_, p) in enumerate(named)]
            for batch in batches:
                losses = []
                for sign in (1, -1):
                    for (_, p), z in zip(named, zs):
                        p.data.add_(z, alpha=sign * 1e-2)
                    losses.append(float(batch_loss(model, batch, full_logits=True)))
                    for (_, p), z in zip(named, zs):
                        p.data.add_(z, alpha=-sign * 1e-2)
                expected.append(abs(losses[0] - losses[1]) / 2e-2)
        assert result.values == pytest.approx(expected, rel=1e-3, abs=1e-4)


def test_propagation_is_zero_before_the_perturbed_layer_and_positive_after(stories_tokenizer):
    model = tiny_model("llama")
    examples = load_task("sst2", DATA).splits(num_train=4, num_dev=0, num_test=1).train
    matrix = propagation(model, encode(stories_tokenizer, examples), eps=1e-2)
    assert matrix[2][:2] == [0.0, 0.0] and all(v > 0 for v in matrix[2][2:])


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


def test_sensitivity_command_and_report(tmp_path):
    data = sensitivity(SensitivityConfig(model=str(STORIES), data_dir=str(DATA), out=str(tmp_path / "s"),
                                         seeds=2, batches=1, batch_size=4))
    assert len(data["layers"]) == 5 and len(data["propagation"]) == 5
    assert json.loads((tmp_path / "s" / "sensitivity.json").read_text())["most_sensitive_layer"] == \
        data["most_sensitive_layer"]
    text = report([str(tmp_path / "s")], str(tmp_path / "report.md"))
    assert "Perturbation sensitivity" in text
    for line in text.splitlines():
        if line.startswith("!["):
            target = tmp_path / line.split("(")[1].rstrip(")")
            assert target.read_bytes()[:4] == b"\x89PNG"
