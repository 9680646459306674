"""torch.distributed helpers. A ZO step exchanges only scalars: the loss pair (8 bytes per direction).

Launcher-agnostic: torchrun and accelerate both set RANK, WORLD_SIZE and LOCAL_RANK. In a single
process every helper is a no-op, so the trainer has one code path.
"""

from __future__ import annotations

import datetime
import functools
import os

import torch
import torch.distributed as torch_dist

from dlzo.errors import DlzoError, first_line

# Bytes all-reduced by the training steps themselves (evaluation traffic is not counted).
STEP_TRAFFIC = {"bytes": 0}


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_if_launched(device: str = "auto") -> None:
    """Join the process group when started by torchrun/accelerate (gloo on CPU, nccl on GPU)."""
    if not launched() or torch_dist.is_initialized():
        return
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get("DLZO_DIST_TIMEOUT", "600")))
    torch_dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)


def _collective(function):
    """Turn a dead peer into one clear error instead of a backend traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except RuntimeError as err:
            raise DlzoError(
                f"rank {rank()} lost contact with the other ranks during {function.__name__} (did a rank die?): "
                f"{first_line(err)}. Checkpoints written so far are intact; continue with --resume "
                f"(any world size)") from None

    return wrapper


def active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if active() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if active() else 1


def is_main_process() -> bool:
    return rank() == 0


@_collective
def barrier() -> None:
    if active():
        torch_dist.barrier()


@_collective
def mean_pair_across_ranks(pair: tuple[float, float]) -> tuple[float, float]:
    """All-reduce the (L+, L-) pair: the only traffic of a data-parallel ZO step."""
    if not active():
        return pair
    values = torch.tensor(pair, dtype=torch.float64)
    torch_dist.all_reduce(values)
    STEP_TRAFFIC["bytes"] += values.numel() * values.element_size()
    values /= world_size()
    return float(values[0]), float(values[1])


@_collective
def mean_across_ranks(value: float) -> float:
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    torch_dist.all_reduce(tensor)
    STEP_TRAFFIC["bytes"] += tensor.numel() * tensor.element_size()
    return float(tensor[0]) / world_size()


@_collective
def sum_across_ranks(values: list[float]) -> list[float]:
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    torch_dist.all_reduce(tensor)
    return tensor.tolist()


@_collective
def gather_directions(q: int, directions: list[int], grads: list[float], plus: list[float],
                      minus: list[float]) -> tuple[list[float], list[float], list[float]]:
    """Perturbation parallel: every rank evaluated some of the q directions; all ranks get all of them,
    in direction order (3 floats per direction on the wire)."""
    table = torch.zeros(3, q, dtype=torch.float64)
    for d, g, p, m in zip(directions, grads, plus, minus):
        table[:, d] = torch.tensor([g, p, m], dtype=torch.float64)
    if active():
        torch_dist.all_reduce(table)
        STEP_TRAFFIC["bytes"] += table.numel() * table.element_size()
    return table[0].tolist(), table[1].tolist(), table[2].tolist()


@_collective
def average_gradients(params: list[torch.Tensor]) -> None:
    """First-order baseline only: average real gradients across ranks."""
    if not active():
        return
    for param in params:
        if param.grad is not None:
            torch_dist.all_reduce(param.grad)
            param.grad /= world_size()
