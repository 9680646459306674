import json

import pytest
import torch

from conftest import DATA, STORIES
from dlzo.engine.fastpath import BranchedForward
from dlzo.engine.layer_choice import layer_parameters
from dlzo.errors import DlzoError
from dlzo.model.loading import load_model
from dlzo.studies.bench import TimedOptimizer, bench, repeated_batch, run_variant, synthetic_batches
from dlzo.studies.options import BenchConfig

VARIANTS = ["upstream_full", "full", "layer_plain", "layer_fast", "layer_cached", "lora", "floor", "inference"]


@pytest.mark.requires_shared
@pytest.mark.parametrize("task", ["", "sst2"])
def test_bench_writes_every_variant_and_ratios_from_the_same_run(tmp_path, task):
    report = bench(BenchConfig(model=str(STORIES), task=task, data_dir=str(DATA), batch=4, seq=16, layer=1,
                               repeats=1, out=str(tmp_path)))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["ratios"] == pytest.approx(report["ratios"])
    variants = saved["variants"]
    assert list(variants) == VARIANTS
    for result in variants.values():
        assert result["step_s"] > 0 and result["peak_mem_bytes"] > 0 and result["forward_s"] > 0
    assert variants["inference"]["update_s"] == 0 and variants["floor"]["update_s"] == 0
    ratios = saved["ratios"]
    assert ratios["dominant_vs_upstream_full"] == pytest.approx(
        variants["upstream_full"]["step_s"] / variants["layer_fast"]["step_s"])
    assert ratios["dominant_vs_floor"] == pytest.approx(variants["layer_fast"]["step_s"] / variants["floor"]["step_s"])
    assert ratios["cached_vs_fast"] == pytest.approx(variants["layer_fast"]["step_s"] / variants["layer_cached"]["step_s"])
    assert ratios["peak_mem_vs_inference"] == pytest.approx(
        variants["layer_fast"]["peak_mem_bytes"] / variants["inference"]["peak_mem_bytes"])
    # the noise of a one-layer step covers that layer only; full MeZO perturbs all 260k weights
    assert saved["layer_parameters"] < saved["parameters"] / 4
    # the fast path's packed input is never larger than upstream's one padded row per candidate
    assert saved["fast_tokens"] <= saved["upstream_tokens"]


def test_synthetic_batches_pack_two_candidates_per_row():
    packed, separate = synthetic_batches(batch=3, seq=10, vocab=100)
    assert tuple(packed.input_ids.shape) == (3, 10) and tuple(separate.input_ids.shape) == (6, 11)
    assert packed.token_row.tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.requires_shared
def test_a_layer_the_model_lacks_or_no_repeat_is_one_line(tmp_path):
    with pytest.raises(DlzoError, match=r"--layer 99: .* has layers 0\.\.4"):
        bench(BenchConfig(model=str(STORIES), variants="layer_fast", repeats=1, batch=2, seq=8, layer=99,
                          out=str(tmp_path / "b")))
    with pytest.raises(DlzoError, match="--repeats must be at least 1, not 0"):
        bench(BenchConfig(model=str(STORIES), repeats=0, out=str(tmp_path / "b")))
    assert not (tmp_path / "b").exists()


@pytest.mark.requires_shared
def test_unknown_variant_is_an_error(tmp_path):
    with pytest.raises(DlzoError, match="unknown bench variant 'fastest'"):
        bench(BenchConfig(model=str(STORIES), variants="fastest", repeats=1, batch=2, seq=8, out=str(tmp_path)))


@pytest.mark.parametrize("upstream, passes", [(True, 4), (False, 3)])
def test_upstream_variant_keeps_mezo_four_noise_passes(upstream, passes):
    """The upstream baseline must cost what MeZO's code costs, even though our full MeZO fuses a pass away."""
    weight = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = TimedOptimizer([("w", weight)], lr=0.1, eps=1e-2, exact_restore=False, upstream=upstream)
    sampled = []
    original = optimizer.sample
    optimizer.sample = lambda *args: sampled.append(args[:2]) or original(*args)
    optimizer.step(lambda: (weight ** 2).sum())
    assert len(sampled) == passes and optimizer.update_s > 0


@pytest.mark.requires_shared
def test_hf_trainer_variant_steps_the_layer_and_reports_its_memory_ratio(tmp_path):
    """The ZOTrainer step really updates the tuned layer (and only it) and the ratio is its peak over the
    inference forward's, from the same run."""
    model = load_model(str(STORIES))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    packed, separate = synthetic_batches(batch=2, seq=8, vocab=model.config.vocab_size)
    result = run_variant("hf_trainer", model, packed, separate, 1, 1, torch.device("cpu"))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".layers.1." in n for n in changed) and result["peak_mem_bytes"] > 0
    report = bench(BenchConfig(model=str(STORIES), batch=2, seq=8, layer=1, repeats=1,
                               variants="hf_inference,hf_trainer", out=str(tmp_path)))
    variants = report["variants"]
    assert report["ratios"]["hf_trainer_mem_vs_inference"] == pytest.approx(
        variants["hf_trainer"]["peak_mem_bytes"] / variants["hf_inference"]["peak_mem_bytes"])


@pytest.mark.requires_shared
def test_rows_variants_repeat_the_batch_and_report_the_per_direction_ratio(tmp_path):
    """rows_xN runs the cached pair forward over N copies of the batch: the same examples, so the same mean
    loss; bench.json gives each copy count's forward time per copy against rows_x1's."""
    model = load_model(str(STORIES), dtype=torch.float32, device=torch.device("cpu"))
    packed, _ = synthetic_batches(batch=3, seq=10, vocab=model.config.vocab_size)
    four = repeated_batch(packed, "rows_x4")
    assert four.num_examples == 12 and four.input_ids.shape[0] == 4 * packed.input_ids.shape[0]
    names = [n for n, _ in layer_parameters(model, 1)]
    fixed = {n: p.detach() for n, p in model.named_parameters() if n in names}
    runner = BranchedForward(model, names)
    torch.testing.assert_close(torch.stack(runner.loss_pair(four, fixed, fixed)),
                               torch.stack(runner.loss_pair(packed, fixed, fixed)))
    report = bench(BenchConfig(model=str(STORIES), batch=3, seq=10, layer=1, repeats=1, out=str(tmp_path),
                               variants="rows_x1,rows_x2,rows_x4"))
    variants = report["variants"]
    for copies in (2, 4):
        assert report["ratios"][f"rows_x{copies}_per_direction_vs_x1"] == pytest.approx(
            variants[f"rows_x{copies}"]["step_s"] / copies / variants["rows_x1"]["step_s"])
    with pytest.raises(DlzoError, match="power of two"):
        repeated_batch(packed, "rows_x3")


@pytest.mark.requires_shared
@pytest.mark.parametrize("policy", ["auto", "off"])
def test_one_layer_variants_in_bfloat16_step_float32_masters_and_give_the_model_back(monkeypatch, policy):
    """As dlzo train: the layer's tensors become float32 masters the optimizer steps (the forward casts them to
    bfloat16); afterwards the model holds bfloat16 tensors again, for the next variant."""
    model = load_model(str(STORIES), dtype="bfloat16", device="cpu")
    packed, separate = synthetic_batches(batch=2, seq=8, vocab=model.config.vocab_size)
    seen = []
    original = TimedOptimizer.__init__

    def spy(self, named, *args, **kwargs):
        seen.append(({p.dtype for _, p in named}, kwargs.get("working_dtypes")))
        original(self, named, *args, **kwargs)

    monkeypatch.setattr(TimedOptimizer, "__init__", spy)
    result = run_variant("layer_cached", model, packed, separate, 1, 1, torch.device("cpu"), policy)
    assert result["peak_mem_bytes"] > 0
    dtypes, working = seen[0]
    if policy == "auto":
        assert dtypes == {torch.float32} and set(working.values()) == {torch.bfloat16}
    else:
        assert dtypes == {torch.bfloat16} and working is None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
