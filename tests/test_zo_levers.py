"""The levers of issue 34 on the ZO step: FZOO's normalized step, LOZO's low-rank directions, ZO-Muon's
orthogonalized step and Sparse-MeZO's magnitude mask, each against a brute-force reference, and each replayed
and resumed bit for bit."""

import math

import pytest
import torch
from torch import nn

from conftest import assert_replay_and_resume_exact, small_run
from dlzo.engine.directions import mix, small_magnitudes
from dlzo.engine.update_rules import normalized, orthogonalized, rate_from_weights
from dlzo.engine.zo import ZOOptimizer, direction_seed
from dlzo.errors import DlzoError
from dlzo.model.loading import decoder_layers, load_model
from dlzo.training.config import TrainConfig
from dlzo.training.loop import train
from dlzo.training.run_folder import read_jsonl


def make(**kwargs):
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(12, 10, dtype=torch.float64))
    bias = nn.Parameter(torch.randn(10, dtype=torch.float64))
    return ZOOptimizer([("layer.weight", weight), ("layer.bias", bias)], **kwargs), weight, bias


def loss_of(weight, bias):
    return float(((weight - 0.5) ** 2).sum() + (bias ** 3).sum())


def test_normalized_divides_by_the_unbiased_spread():
    grads = [1.0, 2.0, 6.0]
    spread = torch.tensor(grads, dtype=torch.float64).std().item()  # unbiased, as FZOO's torch.std
    assert normalized(grads) == pytest.approx([g / spread for g in grads])
    assert normalized([3.0, 3.0]) == [0.0, 0.0]  # no spread: no step, never a division by zero


def test_normalized_step_matches_a_brute_force_reference():
    """θ <- θ - lr·mean_d(g_d·z_d)/std(g), with g the one-sided estimates (FZOO's step)."""
    opt, weight, bias = make(lr=0.1, eps=1e-3, q=4, seed=5, estimator="one-sided", update_rule="normalized",
                             distribution="rademacher")
    w0, b0 = weight.detach().clone(), bias.detach().clone()

    def loss_at(tensors):
        return loss_of(w0, b0) if tensors is None else loss_of(tensors["layer.weight"], tensors["layer.bias"])

    result = opt.step_one_sided(loss_at)
    base = loss_of(w0, b0)
    grads, zs = [], []
    for d in range(4):
        seed = direction_seed(5, 0, d)
        zw, zb = opt.directions.sample(seed, 0, w0, 0), opt.directions.sample(seed, 1, b0, 0)
        grads.append((loss_of(w0 + 1e-3 * zw, b0 + 1e-3 * zb) - base) / 1e-3)
        zs.append((zw, zb))
    assert result.projected_grads == pytest.approx(grads, rel=1e-6)
    spread = torch.tensor(grads).std().item()
    step_w = sum(g * zw for g, (zw, _) in zip(grads, zs)) / (4 * spread)
    torch.testing.assert_close(weight.detach(), w0 - 0.1 * step_w)
    assert torch.all((weight.detach() - w0).abs() <= 0.1 * max(abs(g) for g in grads) / spread + 1e-12)


def test_normalized_needs_several_directions():
    with pytest.raises(ValueError, match="q >= 2"):
        make(update_rule="normalized", q=1)
    with pytest.raises(DlzoError, match="--q 2 or more"):
        TrainConfig(**small_run(zo_update="normalized", q=1)).validate()


def test_lowrank_directions_have_rank_r_and_unit_variance():
    opt, _, _ = make(distribution="lowrank", rank=3)
    like = torch.empty(400, 300, dtype=torch.float64)
    z = opt.sample(direction_seed(0, 0, 0), 0, like)
    assert torch.linalg.matrix_rank(z).item() == 3
    assert z.pow(2).mean().item() == pytest.approx(1.0, abs=0.05)  # each element still of unit variance
    vector = opt.sample(direction_seed(0, 0, 0), 1, torch.empty(50, dtype=torch.float64))
    assert vector.shape == (50,)  # norms and biases: Gaussian


def test_lowrank_directions_share_a_subspace_for_lazy_steps():
    """LOZO's lazy V: the steps of one block of `lazy_steps` move each matrix within the same row space (rank r
    together), the next block in a new one (rank 2r together)."""
    opt, weight, _ = make(distribution="lowrank", rank=2, lazy_steps=2, q=1)
    rows = []
    for step in range(4):
        opt.step_count = step
        rows.append(opt.sample(opt.seeds_for_step(step)[0], 0, weight.detach()))
    assert torch.linalg.matrix_rank(torch.cat(rows[:2])).item() == 2
    assert torch.linalg.matrix_rank(torch.cat(rows[1:3])).item() == 4
    assert torch.linalg.matrix_rank(torch.cat(rows[2:])).item() == 2
    assert not torch.equal(rows[0], rows[1])  # U is new every step


def test_mask_is_the_smallest_magnitudes_and_only_they_move():
    opt, weight, bias = make(lr=0.05, eps=1e-3, seed=2, mask_fraction=0.25)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    order = w0.abs().flatten().argsort()
    expected = torch.zeros(w0.numel(), dtype=torch.bool)
    expected[order[: math.ceil(0.25 * w0.numel())]] = True
    assert torch.equal(small_magnitudes(w0, 0.25).flatten(), expected)
    for _ in range(3):
        opt.step(lambda: loss_of(weight, bias))
    moved = (weight.detach() != w0).flatten()
    assert torch.equal(moved, expected)  # exactly the masked quarter moved
    assert (bias.detach() != b0).all()  # vectors are not masked


def test_orthogonalized_is_the_polar_factor_at_unit_rms():
    """A rank-2 matrix plus float rounding: its step is U·Vᵀ of the two real singular directions (the rounding's
    tiny singular values are not made unit directions), scaled to RMS 1; a vector is rescaled only."""
    generator = torch.Generator().manual_seed(3)
    left, right = torch.randn(40, 2, generator=generator), torch.randn(30, 2, generator=generator)
    matrix = (left * torch.tensor([5.0, 0.5])) @ right.T  # singular values far apart
    step = orthogonalized(matrix)
    assert step.pow(2).mean().item() == pytest.approx(1.0, rel=1e-5)
    values = torch.linalg.svdvals(step.double())
    assert values[:2].tolist() == pytest.approx([math.sqrt(40 * 30 / 2)] * 2, rel=1e-4)  # equalized
    assert values[2:].max().item() < 1e-3
    u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    torch.testing.assert_close(step.double(), (u[:, :2] @ vh[:2]) * math.sqrt(600), rtol=1e-4, atol=1e-4)
    vector = torch.tensor([3.0, -4.0])
    torch.testing.assert_close(orthogonalized(vector), vector / math.sqrt(12.5))
    assert not orthogonalized(torch.zeros(4, 3)).any() and not orthogonalized(torch.zeros(3)).any()
    half = orthogonalized(matrix.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


def test_orthogonal_step_matches_a_brute_force_reference():
    """ZO-Muon over low-rank directions: θ <- θ - lr·polar(mean_d g_d·z_d)·sqrt(mn/r), the weight moves within
    the step's rank-r subspace, every singular value of the step equal."""
    opt, weight, bias = make(lr=0.01, eps=1e-3, q=3, seed=4, estimator="one-sided", update_rule="orthogonal",
                             distribution="lowrank", rank=2)
    w0, b0 = weight.detach().clone(), bias.detach().clone()

    def loss_at(tensors):
        return loss_of(w0, b0) if tensors is None else loss_of(tensors["layer.weight"], tensors["layer.bias"])

    result = opt.step_one_sided(loss_at)
    key = mix(4, 0)  # step 0's subspace: the zs drawn again
    zw = [opt.directions.sample(s, 0, w0, key) for s in result.seeds]
    zb = [opt.directions.sample(s, 1, b0, key) for s in result.seeds]
    dw = sum(g * z for g, z in zip(result.projected_grads, zw)) / 3
    db = sum(g * z for g, z in zip(result.projected_grads, zb)) / 3
    u, values, vh = torch.linalg.svd(dw, full_matrices=False)
    assert (values[2:] < 1e-9 * values[0]).all()  # the estimate has rank 2
    expected = (u[:, :2] @ vh[:2]) * math.sqrt(12 * 10 / 2)
    torch.testing.assert_close(weight.detach(), w0 - 0.01 * expected)
    torch.testing.assert_close(bias.detach(), b0 - 0.01 * db / db.pow(2).mean().sqrt())
    moved = torch.linalg.svdvals(weight.detach() - w0)
    assert moved[:2].tolist() == pytest.approx([0.01 * math.sqrt(60)] * 2, rel=1e-9)


def test_orthogonal_step_in_bfloat16_moves_the_weights_and_replays_exactly():
    """bfloat16 weights (float32 on CPU hides rounding): the polar factor is taken in float32 and cast back, so
    the step is not rounded away at a rate of 1e-2 of the weights' size, and replay gives the same bits."""
    def build():
        torch.manual_seed(0)
        weight = nn.Parameter(torch.randn(48, 32).to(torch.bfloat16))
        bias = nn.Parameter(torch.randn(32).to(torch.bfloat16))
        return ZOOptimizer([("layer.weight", weight), ("layer.bias", bias)], lr=1e-2, q=2, seed=3,
                           update_rule="orthogonal", distribution="lowrank", rank=2), weight, bias

    opt, weight, bias = build()
    ref, r_weight, r_bias = build()
    w0 = weight.detach().clone()
    log = [opt.step(lambda: loss_of(weight.double(), bias.double())) for _ in range(3)]
    for result in log:
        ref.replay_step(result.seeds, result.projected_grads, 1e-2, result.skipped)
    assert torch.equal(weight, r_weight) and torch.equal(bias, r_bias)
    moved = (weight.detach() != w0).float().mean().item()
    # an RMS 1e-2 step on N(0, 1) weights, against bfloat16's spacing of about 0.4% of |w|: most elements move
    # (83% here), the largest weights' smallest steps round away (the float32 masters of --master-weights keep them)
    assert moved > 0.75


def test_orthogonal_needs_the_low_rank_subspace():
    for options in (dict(), dict(distribution="lowrank", mask_fraction=0.2)):
        with pytest.raises(ValueError, match="distribution lowrank"):
            make(update_rule="orthogonal", **options)
    with pytest.raises(DlzoError, match="--distribution lowrank"):
        TrainConfig(**small_run(zo_update="orthogonal")).validate()
    with pytest.raises(DlzoError, match="without --zo-mask"):
        TrainConfig(**small_run(zo_update="orthogonal", distribution="lowrank", zo_mask=0.1)).validate()


def test_orthogonalized_in_a_basis_is_the_dense_polar_factor():
    """polar(D·B)·Bᵀ with B spanning D's rows (the subspace of the low-rank directions) equals the dense SVD's."""
    generator = torch.Generator().manual_seed(8)
    right = torch.randn(50, 3, dtype=torch.float64, generator=generator)
    matrix = torch.randn(20, 3, dtype=torch.float64, generator=generator) @ right.T
    basis = torch.linalg.qr(right).Q
    torch.testing.assert_close(orthogonalized(matrix, basis), orthogonalized(matrix))


@pytest.mark.parametrize("options", [dict(update_rule="normalized", q=3, estimator="one-sided"),
                                     dict(update_rule="orthogonal", q=2, estimator="one-sided",
                                          distribution="lowrank", rank=2),
                                     dict(distribution="lowrank", rank=2, lazy_steps=2),
                                     dict(mask_fraction=0.3, q=2)])
def test_levers_replay_bit_exactly(options):
    opt, weight, bias = make(lr=0.02, eps=1e-3, seed=7, **options)
    ref, r_weight, r_bias = make(lr=0.02, eps=1e-3, seed=7, **options)
    log = []
    for _ in range(5):
        if opt.estimator == "one-sided":
            log.append(opt.step_one_sided(lambda t: loss_of(weight, bias) if t is None
                                          else loss_of(t["layer.weight"], t["layer.bias"])))
        else:
            log.append(opt.step_functional(lambda p, m: (loss_of(p["layer.weight"], p["layer.bias"]),
                                                         loss_of(m["layer.weight"], m["layer.bias"]))))
    for result in log:
        ref.replay_step(result.seeds, result.projected_grads, 0.02, result.skipped)
    assert torch.equal(weight, r_weight) and torch.equal(bias, r_bias)
    assert not torch.equal(weight, make()[1])  # it moved


@pytest.mark.parametrize("options,message", [(dict(lowrank_rank=0), "--lowrank-rank"),
                                             (dict(zo_mask=1.0), "--zo-mask"), (dict(zo_mask=-0.1), "--zo-mask"),
                                             (dict(lr_per_rms=0.05), "--zo-update normalized"),
                                             (dict(lr_per_rms=0.05, zo_update="adam"), "or orthogonal"),
                                             (dict(lr_per_rms=-1.0, zo_update="normalized", q=2), "--lr-per-rms")])
def test_bad_lever_options_name_their_flag(options, message):
    with pytest.raises(DlzoError, match=message):
        TrainConfig(**small_run(**options)).validate()


def test_rate_from_weights_is_the_rms_of_the_matrices_alone():
    matrix, other, vector = torch.full((3, 4), 2.0), torch.full((2, 2), -4.0), torch.full((5,), 100.0)
    expected = math.sqrt((12 * 4 + 4 * 16) / 16)  # the vector is left out
    assert rate_from_weights([matrix, vector, other], 0.05) == pytest.approx(0.05 * expected)
    with pytest.raises(ValueError, match="tuned matrix"):
        rate_from_weights([vector], 0.05)


@pytest.mark.requires_shared
def test_lr_per_rms_sets_the_logged_rate_from_the_base_weights(tmp_path):
    run = dict(small_run(num_dev=8, num_test=8), steps=2, scope="layer:1", zo_update="normalized", q=2,
               lr_per_rms=0.05)
    train(TrainConfig(**run, out=str(tmp_path / "run")))
    layer = decoder_layers(load_model(run["model"]))[1]
    matrices = [p.detach().double() for p in layer.parameters() if p.dim() == 2]
    rms = math.sqrt(sum(float(m.square().sum()) for m in matrices) / sum(m.numel() for m in matrices))
    logged = [entry["lr"] for entry in read_jsonl(tmp_path / "run" / "trajectory.jsonl")]
    assert logged == pytest.approx([0.05 * rms] * 2, rel=1e-9)


@pytest.mark.slow
@pytest.mark.requires_shared
@pytest.mark.parametrize("options", [dict(zo_update="normalized", q=3, estimator="one-sided",
                                          distribution="rademacher"),
                                     dict(zo_update="normalized", q=2, lr_per_rms=0.05),
                                     dict(zo_update="orthogonal", q=2, distribution="lowrank", lowrank_rank=2,
                                          lowrank_lazy=3, lr_per_rms=0.01),
                                     dict(distribution="lowrank", lowrank_rank=2, lowrank_lazy=3),
                                     dict(zo_mask=0.1)])
def test_lever_runs_replay_and_resume_bit_exactly(tmp_path, options):
    """A run stopped at step 5 (checkpoint at 4) resumes to the uninterrupted run's tensors: the mask comes from
    the base weights and the low-rank subspace from the step, both rebuilt before the checkpoint is loaded."""
    run = dict(small_run(num_dev=8, num_test=8), steps=8, eval_every=4, scope="layer:1", lr=1e-2, **options)
    assert_replay_and_resume_exact(tmp_path, run, stops=[5])
