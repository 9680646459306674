"""Scalars of a run for TensorBoard and/or Weights & Biases, through the libraries' own writers.
metrics.jsonl in the run folder is written regardless; this only mirrors it."""

from __future__ import annotations

import os
from pathlib import Path

from dlzo.choices import report_targets
from dlzo.errors import DlzoError, first_line


def _summary_writer():
    """TensorBoard's SummaryWriter, or one line saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DlzoError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _wandb():
    """The wandb module, or one line saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise DlzoError("--report-to wandb needs the wandb package: pip install wandb") from None
    return wandb


def check_reporting(report_to: str) -> None:
    """Before anything is written: each backend's package imports, and W&B (unless WANDB_MODE is offline or
    disabled) has a login; it raised a traceback after the run had started."""
    targets = report_targets(report_to)
    if "tensorboard" in targets:
        _summary_writer()
    if "wandb" in targets:
        wandb = _wandb()
        if os.environ.get("WANDB_MODE", "") in ("offline", "disabled", "dryrun"):
            return
        try:
            wandb.login(verify=False)
        except Exception as err:  # wandb's UsageError and its kin: all mean no usable login here
            raise DlzoError(f"--report-to wandb: {first_line(err)} (or set WANDB_MODE=offline)") from None


class ScalarLogger:
    """The scalars mirrored to each backend of --report-to (comma-separated: "tensorboard,wandb" writes both),
    under --run-name (default: the run folder's name): W&B's run name, TensorBoard's run folder
    (FOLDER/tensorboard/NAME; FOLDER/tensorboard itself without a name)."""

    def __init__(self, report_to: str, folder: Path, config: dict, run_name: str = ""):
        self.report_to, self.writer, self.run = report_to, None, None
        targets = report_targets(report_to)
        if "tensorboard" in targets:
            log_dir = folder / "tensorboard" / run_name if run_name else folder / "tensorboard"
            self.writer = _summary_writer()(log_dir=str(log_dir))
        if "wandb" in targets:
            wandb = _wandb()
            try:
                self.run = wandb.init(project="dlzo", dir=str(folder), config=config, name=run_name or folder.name)
            except Exception as err:  # a server that refuses, a bad setting: one line, not wandb's traceback
                raise DlzoError(f"--report-to wandb: {first_line(err)}") from None

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.run is not None:
            self.run.log(values, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
