"""dlzo.training.scalars: the TensorBoard mirror holds the numbers metrics.jsonl and trajectory.jsonl hold, read
back with tensorboard's own reader; a missing package or login is one line before anything is written."""

import json
import sys

import pytest

from conftest import small_run
from dlzo.errors import DlzoError
from dlzo.training.config import TrainConfig
from dlzo.training.loop import train
from dlzo.training.scalars import ScalarLogger, check_reporting


def read_events(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_the_tensorboard_writer_keeps_every_value_at_its_step(tmp_path):
    logger = ScalarLogger("tensorboard", tmp_path, {"lr": 1e-3})
    logger.log(0, {"train/loss": 0.75, "train/lr": 1e-3})
    logger.log(1, {"train/loss": 0.5})
    logger.log(4, {"eval/dev_loss": 0.625})
    logger.close()
    assert read_events(tmp_path / "tensorboard") == {"train/loss": {0: 0.75, 1: 0.5}, "train/lr": {0: pytest.approx(1e-3)},
                                                     "eval/dev_loss": {4: 0.625}}


def test_none_mirrors_nothing(tmp_path):
    logger = ScalarLogger("none", tmp_path, {})
    logger.log(0, {"train/loss": 1.0})
    logger.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.requires_shared
def test_a_runs_mirror_holds_its_logged_numbers(tmp_path):
    """Every step's loss and rate, every evaluation's dev loss after step 0: the values of metrics.jsonl and
    trajectory.jsonl, at their steps (TensorBoard keeps float32)."""
    out = tmp_path / "run"
    train(TrainConfig(**small_run(num_train=32, num_dev=8, num_test=8), out=str(out), steps=11, eval_every=5,
                      scope="layer:1", q=2, lr_scheduler="cosine", warmup_steps=2, report_to="tensorboard"))
    events = read_events(out / "tensorboard")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trajectory = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
    assert sorted(events["train/loss"]) == sorted(events["train/lr"]) == list(range(11))
    losses = {r["step"]: r["loss"] for r in metrics if "loss" in r}
    assert sorted(losses) == [0, 10]  # metrics.jsonl logs every tenth step and the last
    assert {s: events["train/loss"][s] for s in losses} == pytest.approx(losses, rel=1e-6)
    assert events["train/lr"] == pytest.approx({r["step"]: r["lr"] for r in trajectory}, rel=1e-6)
    mean_abs = {r["step"]: sum(abs(g) for g in r["grads"]) / len(r["grads"]) for r in trajectory}
    assert events["train/projected_grad"] == pytest.approx(mean_abs, rel=1e-6)  # the size of the step's |g|
    dev = {r["step"]: r["dev_loss"] for r in metrics if "dev_loss" in r}
    assert sorted(dev) == [0, 5, 10, 11]
    assert events["eval/dev_loss"] == pytest.approx({s: v for s, v in dev.items() if s > 0}, rel=1e-6)


def test_a_missing_package_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import fails as if not installed
    with pytest.raises(DlzoError, match="--report-to tensorboard needs the tensorboard package: pip install"):
        check_reporting("tensorboard")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(DlzoError, match="--report-to wandb needs the wandb package: pip install wandb"):
        check_reporting("wandb")
    check_reporting("none")


def test_wandb_offline_needs_no_login_and_a_refused_login_is_one_line(monkeypatch):
    wandb = pytest.importorskip("wandb")

    def refused(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)\ncall wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "login", refused)
    for mode in ("offline", "disabled"):
        monkeypatch.setenv("WANDB_MODE", mode)
        check_reporting("wandb")  # no login asked for
    monkeypatch.delenv("WANDB_MODE")
    with pytest.raises(DlzoError) as caught:
        check_reporting("wandb")
    assert str(caught.value) == ("--report-to wandb: api_key not configured (no-tty) (or set WANDB_MODE=offline)")
