"""Scalars of a run for TensorBoard or Weights & Biases, through the libraries' own writers.
metrics.jsonl in the run folder is written regardless; this only mirrors it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from dlzo.errors import DlzoError, first_line

ReportTo = Literal["none", "tensorboard", "wandb"]  # --report-to: where the scalars are mirrored


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


def check_reporting(report_to: ReportTo) -> None:
    """Before anything is written: the mirror's package imports, and W&B (unless WANDB_MODE is offline or
    disabled) has a login; it raised a traceback after the run had started."""
    if report_to == "tensorboard":
        _summary_writer()
    elif report_to == "wandb":
        wandb = _wandb()
        if os.environ.get("WANDB_MODE", "") in ("offline", "disabled", "dryrun"):
            return
        try:
            wandb.login(verify=False)
        except Exception as err:  # wandb's UsageError and its kin: all mean no usable login here
            raise DlzoError(f"--report-to wandb: {first_line(err)} (or set WANDB_MODE=offline)") from None


class ScalarLogger:
    def __init__(self, report_to: str, folder: Path, config: dict):
        self.report_to, self.writer, self.run = report_to, None, None
        if report_to == "tensorboard":
            self.writer = _summary_writer()(log_dir=str(folder / "tensorboard"))
        elif report_to == "wandb":
            wandb = _wandb()
            try:
                self.run = wandb.init(project="dlzo", dir=str(folder), config=config, name=folder.name)
            except Exception as err:  # a server that refuses, a bad setting: one line, not wandb's traceback
                raise DlzoError(f"--report-to wandb: {first_line(err)}") from None

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        elif self.run is not None:
            self.run.log(values, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        elif self.run is not None:
            self.run.finish()
