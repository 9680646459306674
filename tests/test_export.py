import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import STORIES, small_run, tiny_model
from dlzo.errors import DlzoError
from dlzo.model.loading import load_model
from dlzo.training.config import TrainConfig
from dlzo.training.export import export_adapter, load_tuned
from dlzo.training.loop import train
from dlzo.training.run_model import load_checkpoint_of_run

pytestmark = pytest.mark.requires_shared

SMALL = small_run("eval_batch_size", num_train=32, num_dev=8, num_test=8, lr=1e-2, eval_every=0)


def test_layer_adapter_round_trip_changes_only_the_tuned_layer(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path / "run"), steps=3, scope="layer:2"))
    folder = export_adapter(tmp_path / "run", tmp_path / "adapter", "final")
    meta = json.loads((folder / "tuned.json").read_text())
    assert meta["base_model"] == str(STORIES) and all(".layers.2." in n for n in meta["names"])
    base, fresh = load_model(str(STORIES)), dict(load_model(str(STORIES)).named_parameters())
    tuned = dict(load_tuned(base, folder).named_parameters())
    final = load_file(tmp_path / "run" / "final.safetensors")
    changed = {n for n in tuned if not torch.equal(tuned[n], fresh[n])}
    assert changed == set(final) and all(torch.equal(tuned[n], final[n]) for n in final)


def test_load_tuned_from_a_run_folder_and_refuses_another_base(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path / "run"), steps=2, scope="layer:1"))
    tuned = dict(load_tuned(load_model(str(STORIES)), tmp_path / "run", "final").named_parameters())
    final = load_file(tmp_path / "run" / "final.safetensors")
    assert all(torch.equal(tuned[n], final[n]) for n in final)
    folder = export_adapter(tmp_path / "run", tmp_path / "adapter", "final")
    other = load_model(str(STORIES))
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight.add_(1.0)
    with pytest.raises(DlzoError, match="different base model"):
        load_tuned(other, folder)
    with pytest.raises(DlzoError, match="different base model"):
        load_tuned(tiny_model("gpt2"), folder)  # another architecture: one line, not a KeyError


def test_lora_adapter_loads_in_peft_with_dlzo_logits(tmp_path):
    from peft import PeftModel

    train(TrainConfig(**{**SMALL, "lr": 1e-1}, out=str(tmp_path / "run"), steps=3, scope="lora"))
    folder = export_adapter(tmp_path / "run", tmp_path / "adapter", "final")
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    ours = load_checkpoint_of_run(tmp_path / "run", "final").model
    theirs = PeftModel.from_pretrained(load_model(str(STORIES)), folder)
    ids = torch.randint(3, 500, (2, 12))
    base_logits = load_model(str(STORIES))(ids).logits
    ours_logits, theirs_logits = ours(ids).logits, theirs(ids).logits
    assert not torch.allclose(ours_logits, base_logits)  # the adapters learnt something
    torch.testing.assert_close(theirs_logits, ours_logits, rtol=0, atol=1e-6)
    with pytest.raises(DlzoError, match="peft.PeftModel.from_pretrained"):  # load_tuned says what reads it
        load_tuned(load_model(str(STORIES)), folder)


def test_tensorboard_scalars_and_cosine_schedule(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = 8
    train(TrainConfig(**{**SMALL, "eval_every": 4}, out=str(tmp_path / "run"), steps=steps, scope="layer:1",
                      lr_scheduler="cosine", warmup_steps=2, report_to="tensorboard"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/projected_grad", "train/steps_per_s", "eval/dev_loss"} <= tags
    assert [e.step for e in events.Scalars("eval/dev_loss")] == [4, 8]
    logged = [json.loads(x)["lr"] for x in (tmp_path / "run" / "trajectory.jsonl").read_text().splitlines()]
    expected = [1e-2 * s / 2 if s < 2 else 1e-2 * 0.5 * (1 + math.cos(math.pi * (s - 2) / (steps - 2)))
                for s in range(steps)]
    assert logged == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_report_to_wandb_in_offline_mode(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(TrainConfig(**{**SMALL, "eval_every": 2}, out=str(tmp_path / "run"), steps=4, scope="layer:1",
                      report_to="wandb"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the offline run log, synced later with `wandb sync`
