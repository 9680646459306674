"""Scalars of a run for TensorBoard or Weights & Biases, through the libraries' own writers.
metrics.jsonl in the run folder is written regardless; this only mirrors it."""

from __future__ import annotations

from pathlib import Path

from dlzo.errors import DlzoError


class ScalarLogger:
    def __init__(self, report_to: str, folder: Path, config: dict):
        self.report_to, self.writer, self.run = report_to, None, None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise DlzoError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise DlzoError("--report-to wandb needs the wandb package: pip install wandb") from None
            self.run = wandb.init(project="dlzo", dir=str(folder), config=config, name=folder.name)

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
