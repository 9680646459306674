"""torch.distributed on CPU: 2 gloo processes launched by torchrun (or accelerate), compared with one process."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import STORIES, flags, small_run
from dlzo.model.checkpoint import checkpoint_metadata
from dlzo.training.config import TrainConfig
from dlzo.training.loop import train

# Float32 losses of differently packed batches differ by ~1e-7; the update scales that by lr/2eps, so
# the tolerance is met with lr 1e-4 (the rate SmolLM2 needs too); see docs/distributed.md.
BASE = small_run("batch_size", lr=1e-4, eps=1e-3, scope="layer:1")
# every test here launches two ranks
pytestmark = [pytest.mark.slow, pytest.mark.requires_shared]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
# accelerate's multi-process launcher is torch.distributed.run underneath; on a CPU-only machine our
# process group falls back to gloo. (accelerate's --cpu mode launches through mpirun instead, which this
# launcher-agnostic code does not read.)
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", "1"]


def torchrun(out, extra: dict, wait: bool = True, launcher: list[str] = TORCHRUN):
    args = [*launcher, "-m", "dlzo", "train", *flags({**BASE, **extra, "out": str(out)})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLZO_DIST_TIMEOUT": "60"}
    if not wait:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run


def assert_same_tensors(a_dir, b_dir, tolerance):
    a, b = load_file(a_dir / "final.safetensors"), load_file(b_dir / "final.safetensors")
    assert set(a) == set(b)
    worst = max(float((a[n] - b[n]).abs().max()) for n in a)
    base = load_file(STORIES / "model.safetensors")
    moved = max(float((a[n] - base[n]).abs().max()) for n in a)
    assert worst <= tolerance, worst
    assert moved > 50 * tolerance  # training moved the weights far more than the ranks disagree
    return moved


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_data_parallel_two_ranks_equal_one_process(tmp_path, launcher):
    settings = dict(steps=4, batch_size=16, eval_every=0)
    train(TrainConfig(**BASE, **settings, out=str(tmp_path / "single")))
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
    torchrun(tmp_path / "ddp", settings, launcher=TORCHRUN if launcher == "torchrun" else ACCELERATE)
    assert_same_tensors(tmp_path / "single", tmp_path / "ddp", 1e-6)
    assert not (tmp_path / "ddp" / "rank1").exists()
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["bytes_exchanged_per_step"] == 16  # one all-reduce of the (L+, L-) pair in float64


def test_perturbation_parallel_q2_equals_one_process(tmp_path):
    settings = dict(steps=3, batch_size=8, eval_every=0, q=2)
    train(TrainConfig(**BASE, **settings, out=str(tmp_path / "single")))
    torchrun(tmp_path / "pp", {**settings, "parallel": "perturbation"})
    assert_same_tensors(tmp_path / "single", tmp_path / "pp", 1e-6)


def test_killed_rank_stops_the_job_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "killed"
    process = torchrun(out, dict(steps=60, batch_size=8, eval_every=2), wait=False)
    deadline = time.time() + 240
    victim = None
    while time.time() < deadline and victim is None:
        if (out / "last.safetensors").exists():
            for child in psutil.Process(process.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == "1":
                        victim = child
                except psutil.Error:
                    continue
        time.sleep(0.2)
    assert victim is not None, "the job never wrote a checkpoint"
    os.kill(victim.pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=240)
    assert process.returncode != 0
    assert "lost contact with the other ranks" in output or "exitcode  : -9" in output or "Signal 9" in output
    last = load_file(out / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in last.values())
    # no finished step lost: the trajectory holds every step from 0 on, at least up to the checkpoint's, and
    # the job did not reach its end (the kill stopped it, not a finish)
    logged = [json.loads(line)["step"] for line in (out / "trajectory.jsonl").read_text().splitlines()]
    checkpoint_step = int(checkpoint_metadata(out / "last.safetensors")["step"])
    assert logged == list(range(len(logged))) and 1 <= checkpoint_step <= len(logged) < 60
    assert not (out / "results.json").exists()
    assert not (out / "final.safetensors").exists()
    # --resume works with another world size: finish the 2-rank run in one process.
    resumed = train(TrainConfig(**BASE, steps=60, batch_size=8, eval_every=2, out=str(out), resume=str(out)))
    assert (out / "final.safetensors").exists() and resumed["steps"] == 60
