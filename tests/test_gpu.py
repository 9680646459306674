"""The CUDA paths (marked `cuda`: skipped without a GPU; scripts/gpu_check.sh runs them on one): half-precision
weights by default, bench's peak from the CUDA allocator, and dlzo plan's prediction of that peak."""

import pytest
import torch

from conftest import STORIES
from dlzo.cli.plan import PlanConfig, predict
from dlzo.model.loading import load_model
from dlzo.studies.bench import bench
from dlzo.studies.options import BenchConfig

pytestmark = pytest.mark.cuda
PLANNED = {"layer_cached": "zo_step", "inference": "inference", "full": "full_mezo"}


@pytest.mark.requires_shared
def test_auto_dtype_on_cuda_is_bfloat16_weights_on_the_gpu():
    model = load_model(str(STORIES), dtype="auto", device="cuda")
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "cuda")}


@pytest.fixture(scope="module")
def gpu_bench(tmp_path_factory):
    """SmolLM2-135M's shape in bfloat16 on the GPU: the planned variants, batch 16 x 64 tokens."""
    out = tmp_path_factory.mktemp("bench")
    return bench(BenchConfig(shape="smollm2-135m", device="cuda", dtype="bfloat16", variants=",".join(PLANNED),
                             repeats=2, out=str(out)))


def test_bench_reports_the_cuda_allocators_peak(gpu_bench):
    """Every peak holds the bfloat16 weights and is at most what the allocator ever held (an RSS figure of a
    CUDA process would be gigabytes above both)."""
    weights = gpu_bench["parameters"] * 2
    for result in gpu_bench["variants"].values():
        assert weights <= result["peak_mem_bytes"] <= torch.cuda.max_memory_allocated()


def test_plan_predicts_the_gpu_peaks_within_15_percent(gpu_bench):
    planned = predict(PlanConfig(shape="smollm2-135m", dtype="bfloat16", device="cuda", layer=gpu_bench["layer"],
                                 master_weights="off", batch_size=16, max_length=64), baseline=0)
    for variant, key in PLANNED.items():
        measured = gpu_bench["variants"][variant]["peak_mem_bytes"]
        assert planned["cuda"][key] == pytest.approx(measured, rel=0.15), variant
