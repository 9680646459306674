import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import STORIES, assert_replay_and_resume_exact, small_run
from dlzo.cli.commands import replay_command
from dlzo.cli.options import ReplayConfig
from dlzo.engine.zo import ZOOptimizer, direction_seed
from dlzo.errors import DlzoError
from dlzo.training.config import TrainConfig
from dlzo.training.loop import train
from dlzo.training.replay import hessian_summary


def quadratic(params, target):
    return sum(((p - t) ** 2).sum() for p, t in zip(params, target))


def make(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(6, 5, dtype=dtype))
    bias = nn.Parameter(torch.randn(5, dtype=dtype))
    opt = ZOOptimizer([("layer.weight", weight), ("layer.bias", bias)], **kwargs)
    return opt, weight, bias


def test_spsa_step_matches_brute_force():
    opt, weight, bias = make(lr=0.1, eps=1e-2, seed=3)
    target = [torch.zeros_like(weight), torch.ones_like(bias)]
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    result = opt.step(lambda: quadratic([weight, bias], target))
    seed = direction_seed(3, 0, 0)
    zw, zb = opt.sample(seed, 0, w0), opt.sample(seed, 1, b0)
    plus = quadratic([w0 + 1e-2 * zw, b0 + 1e-2 * zb], target)
    minus = quadratic([w0 - 1e-2 * zw, b0 - 1e-2 * zb], target)
    g = float(plus - minus) / 2e-2
    assert result.projected_grads[0] == pytest.approx(g, rel=1e-4)
    torch.testing.assert_close(weight.detach(), w0 - 0.1 * result.projected_grads[0] * zw)
    torch.testing.assert_close(bias.detach(), b0 - 0.1 * result.projected_grads[0] * zb)


def test_many_directions_estimate_the_true_gradient():
    opt, weight, bias = make(lr=0.0, eps=1e-3, q=400)
    target = [torch.zeros_like(weight), torch.zeros_like(bias)]
    result = opt.step(lambda: quadratic([weight, bias], target))
    estimate = torch.zeros_like(weight)
    for seed, g in zip(result.seeds, result.projected_grads):
        estimate += g * opt.sample(seed, 0, weight) / len(result.seeds)
    true = 2 * weight.detach()
    cosine = float((estimate * true).sum() / (estimate.norm() * true.norm()))
    assert cosine > 0.7


def test_noise_is_regenerated_from_seed_not_global_rng():
    opt, weight, _ = make()
    torch.manual_seed(1)
    first = opt.sample(123, 0, weight)
    torch.manual_seed(999)
    torch.randn(100)
    assert torch.equal(first, opt.sample(123, 0, weight))
    assert not torch.equal(first, opt.sample(124, 0, weight))
    seeds = [direction_seed(run, step, direction) for run, step, direction in
             ((0, 5, 0), (0, 5, 1), (1, 5, 0), (0, 6, 0), (1, 4, 0), (0, 4, 1))]
    assert len(set(seeds)) == len(seeds)  # run seed, step and direction each change it; no two collide


def test_rademacher_directions_are_plus_minus_one():
    opt, weight, _ = make(distribution="rademacher")
    z = opt.sample(7, 0, weight)
    assert set(z.unique().tolist()) == {-1.0, 1.0}


def test_copy_restore_is_exact_in_bfloat16_where_arithmetic_drifts():
    exact, weight, bias = make(dtype=torch.bfloat16, lr=0.0, eps=1e-3, exact_restore=True)
    before = weight.detach().clone()
    for _ in range(10):
        exact.step(lambda: weight.float().sum())
    assert torch.equal(weight.detach(), before)
    drifting, weight2, _ = make(dtype=torch.bfloat16, lr=0.0, eps=1e-3, exact_restore=False)
    for _ in range(10):
        drifting.step(lambda: weight2.float().sum())
    assert not torch.equal(weight2.detach(), before)  # why small scopes restore by copy


def test_functional_step_equals_in_place_step():
    a, wa, ba = make(lr=0.05, eps=1e-2, q=2, seed=5)
    b, wb, bb = make(lr=0.05, eps=1e-2, q=2, seed=5)
    target = [torch.zeros_like(wa), torch.ones_like(ba)]
    for _ in range(3):
        a.step(lambda: quadratic([wa, ba], target))
        b.step_functional(lambda plus, minus: (
            quadratic([plus["layer.weight"], plus["layer.bias"]], target),
            quadratic([minus["layer.weight"], minus["layer.bias"]], target)))
    torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ba, bb, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_skips_the_update():
    opt, weight, _ = make(lr=1.0)
    before = weight.detach().clone()
    result = opt.step(lambda: torch.tensor(math.nan))
    assert result.skipped and torch.equal(weight.detach(), before)
    assert opt.step_count == 1


def test_weight_decay_skips_bias_and_norm():
    opt, weight, bias = make(lr=0.1, weight_decay=0.5)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    opt.apply_update([11], [0.0])
    torch.testing.assert_close(weight.detach(), w0 * (1 - 0.05))
    assert torch.equal(bias.detach(), b0)


def test_full_scope_restore_and_update_share_one_noise_pass():
    """MeZO's in-place round trip restores with +εz and then regenerates z for the update; we use one z
    for both, so a step samples z three times per tensor and the weights are bit-identical to MeZO's."""
    fused, weight, bias = make(lr=0.1, eps=1e-2, seed=3, weight_decay=0.5, exact_restore=False)
    mezo, weight_ref, bias_ref = make(lr=0.1, eps=1e-2, seed=3, weight_decay=0.5, exact_restore=False)
    target = [torch.zeros_like(weight), torch.ones_like(bias)]
    sampled = []
    original_sample = fused.sample
    fused.sample = lambda *args: sampled.append(args[:2]) or original_sample(*args)
    for step in range(3):
        fused.step(lambda: quadratic([weight, bias], target))
        seed = direction_seed(3, step, 0)
        mezo.add_noise(seed, 1e-2)
        plus = float(quadratic([weight_ref, bias_ref], target))
        mezo.add_noise(seed, -2e-2)
        minus = float(quadratic([weight_ref, bias_ref], target))
        mezo.add_noise(seed, 1e-2)
        mezo.apply_update([seed], [(plus - minus) / 2e-2])
    assert torch.equal(weight.detach(), weight_ref.detach()) and torch.equal(bias.detach(), bias_ref.detach())
    assert len(sampled) == 3 * 3 * 2  # steps x noise passes x tensors
    assert fused.step_count == 3


def test_full_scope_non_finite_loss_restores_without_update():
    opt, weight, _ = make(lr=1.0, exact_restore=False)
    before = weight.detach().clone()
    result = opt.step(lambda: torch.tensor(math.inf))
    assert result.skipped and opt.step_count == 1
    torch.testing.assert_close(weight.detach(), before)  # the +ε/-2ε/+ε round trip, up to float rounding


@pytest.mark.parametrize("functional", [True, False])
def test_one_direction_update_reuses_its_z(functional):
    """A small-scope step draws z once per tensor; the update gives the same weights as drawing it again."""
    reused, weight, bias = make(lr=0.1, eps=1e-2, seed=4, weight_decay=0.5)
    redrawn, weight_ref, bias_ref = make(lr=0.1, eps=1e-2, seed=4, weight_decay=0.5)
    target = [torch.zeros_like(weight), torch.ones_like(bias)]
    sampled = []
    original_sample = reused.sample
    reused.sample = lambda *args: sampled.append(args[:2]) or original_sample(*args)
    for _ in range(2):
        if functional:
            result = reused.step_functional(lambda plus, minus: (
                quadratic([plus["layer.weight"], plus["layer.bias"]], target),
                quadratic([minus["layer.weight"], minus["layer.bias"]], target)))
        else:
            result = reused.step(lambda: quadratic([weight, bias], target))
        redrawn.apply_update(result.seeds, result.projected_grads)
    assert torch.equal(weight.detach(), weight_ref.detach()) and torch.equal(bias.detach(), bias_ref.detach())
    assert len(sampled) == 2 * 2  # steps x tensors: no second draw for the update


def test_lezo_perturbs_and_updates_only_the_sampled_layers():
    """lezo: each direction draws K of the layer groups from its seed; the other tensors never move."""
    tensors = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(6)]
    groups = [0, 0, 1, 1, 2, 2]
    opt = ZOOptimizer([(f"t{i}", t) for i, t in enumerate(tensors)], lr=0.1, eps=1e-2, seed=5, layer_groups=groups,
                      sampled_layers=1)
    before = [t.detach().clone() for t in tensors]
    targets = [torch.zeros(3, 3)] * 6
    opt.step(lambda: quadratic(tensors, targets))
    seed = direction_seed(5, 0, 0)
    active = opt.active(seed)
    assert len({groups[i] for i in active}) == 1 and len(active) == 2
    assert active == opt.active(seed) == ZOOptimizer([(f"t{i}", t) for i, t in enumerate(tensors)], seed=5,
                                                     layer_groups=groups, sampled_layers=1).active(seed)
    moved = {i for i, (a, b) in enumerate(zip(tensors, before)) if not torch.equal(a.detach(), b)}
    assert moved == active
    draws = {frozenset(opt.active(direction_seed(5, step, 0))) for step in range(40)}
    assert len(draws) == 3  # every layer gets drawn over the run


def reference_updates(rule, seeds_grads, w0, sample, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """Brute force, in float64: the weights after each logged (seed, g) under `rule`."""
    theta, m, v = w0.double().clone(), torch.zeros_like(w0, dtype=torch.float64), torch.zeros_like(w0, dtype=torch.float64)
    for t, (seed, g) in enumerate(seeds_grads, start=1):
        d = g * sample(seed).double()
        if rule == "momentum":
            m = d if t == 1 else beta1 * m + d
            theta = theta - lr * m
        else:
            m, v = beta1 * m + (1 - beta1) * d, beta2 * v + (1 - beta2) * d * d
            theta = theta - lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
    return theta


@pytest.mark.parametrize("rule", ["momentum", "adam"])
def test_stateful_update_rules_match_a_brute_force_reference(rule):
    opt, weight, bias = make(lr=0.05, eps=1e-2, seed=3, update_rule=rule)
    w0 = weight.detach().clone()
    target = [torch.zeros_like(weight), torch.ones_like(bias)]
    logged = []
    for _ in range(5):
        result = opt.step(lambda: quadratic([weight, bias], target))
        logged.append((result.seeds[0], result.projected_grads[0]))
    expected = reference_updates(rule, logged, w0, lambda seed: opt.sample(seed, 0, w0), lr=0.05)
    torch.testing.assert_close(weight.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert opt.updates == 5 and len(opt.moments) == 2  # state over the tuned tensors only


@pytest.mark.parametrize("rule", ["momentum", "adam"])
def test_stateful_rules_replay_bit_exactly_in_place_and_functional(rule):
    target = [torch.zeros(6, 5), torch.ones(5)]
    trained, trained_functional = make(lr=0.05, eps=1e-2, q=2, seed=4, update_rule=rule, weight_decay=0.1), \
        make(lr=0.05, eps=1e-2, seed=4, update_rule=rule)
    opt, weight, bias = trained
    log = [opt.step(lambda: quadratic([weight, bias], target)) for _ in range(6)]
    fopt, fweight, fbias = trained_functional
    flog = [fopt.step_functional(lambda p, m: (quadratic(list(p.values()), target),
                                               quadratic(list(m.values()), target))) for _ in range(6)]
    for (ref, r_weight, r_bias), source in ((make(lr=0.05, eps=1e-2, q=2, seed=4, update_rule=rule, weight_decay=0.1),
                                             (log, weight, bias)),
                                            (make(lr=0.05, eps=1e-2, seed=4, update_rule=rule), (flog, fweight, fbias))):
        for result in source[0]:
            ref.replay_step(result.seeds, result.projected_grads, 0.05, result.skipped)
        assert torch.equal(r_weight, source[1]) and torch.equal(r_bias, source[2])


def test_sgd_rule_keeps_no_state_and_momentum_starts_as_sgd():
    target = [torch.zeros(6, 5), torch.ones(5)]
    sgd, w_sgd, b_sgd = make(lr=0.05, eps=1e-2, seed=2)
    mom, w_mom, b_mom = make(lr=0.05, eps=1e-2, seed=2, update_rule="momentum")
    sgd.step(lambda: quadratic([w_sgd, b_sgd], target))
    mom.step(lambda: quadratic([w_mom, b_mom], target))
    assert torch.equal(w_sgd, w_mom) and not sgd.moments and not sgd.stateful
    with pytest.raises(ValueError, match="update_rule"):
        make(update_rule="lion")


STATEFUL_RUN = small_run(num_dev=8, num_test=8)


@pytest.mark.slow
@pytest.mark.requires_shared
@pytest.mark.parametrize("rule,scope,fast", [("momentum", "layer:1", True), ("adam", "layer:1", False),
                                             ("adam", "full", False)])
def test_stateful_run_replays_and_resumes_bit_exactly(tmp_path, rule, scope, fast):
    """Replay of a momentum / adam run rebuilds its weights bit for bit, and a run stopped at step 5 and at 7
    (the last checkpoint at 5) resumes to the weights and log of an uninterrupted run."""
    options = dict(STATEFUL_RUN, steps=10, eval_every=5, scope=scope, fast_path=fast, zo_update=rule,
                   lr=1e-3 if rule == "adam" else 1e-2, weight_decay=0.01)
    trained, killed = assert_replay_and_resume_exact(tmp_path, options, stops=[5, 7])
    assert (killed / "trajectory.jsonl").read_text() == (tmp_path / "whole" / "trajectory.jsonl").read_text()
    sgd = dict(options, zo_update="sgd")
    train(TrainConfig(**sgd, out=str(tmp_path / "sgd")))
    assert not all(torch.equal(load_file(tmp_path / "sgd" / "final.safetensors")[n], trained[n]) for n in trained)


def test_one_sided_step_matches_brute_force_and_shares_the_base_loss():
    opt, weight, bias = make(lr=0.1, eps=1e-2, q=3, seed=3, estimator="one-sided")
    target = [torch.zeros_like(weight), torch.ones_like(bias)]
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    calls = []

    def closure():
        calls.append(1)
        return quadratic([weight, bias], target)

    result = opt.step(closure)
    assert len(calls) == 4  # q + 1 evaluations, not 2q
    base = float(quadratic([w0, b0], target))
    expected_w, expected_b = w0.clone(), b0.clone()
    for d, seed in enumerate(result.seeds):
        zw, zb = opt.sample(seed, 0, w0), opt.sample(seed, 1, b0)
        g = (float(quadratic([w0 + 1e-2 * zw, b0 + 1e-2 * zb], target)) - base) / 1e-2
        assert result.projected_grads[d] == pytest.approx(g, rel=1e-4)
        expected_w -= 0.1 * g * zw / 3
        expected_b -= 0.1 * g * zb / 3
    torch.testing.assert_close(weight.detach(), expected_w)
    torch.testing.assert_close(bias.detach(), expected_b)


def test_one_sided_functional_equals_in_place_and_replays_exactly():
    a, wa, ba = make(lr=0.05, eps=1e-2, q=2, seed=5, estimator="one-sided")
    b, wb, bb = make(lr=0.05, eps=1e-2, q=2, seed=5, estimator="one-sided")
    target = [torch.zeros_like(wa), torch.ones_like(ba)]
    logged = []
    for _ in range(3):
        logged.append(a.step(lambda: quadratic([wa, ba], target)))
        b.step_one_sided(lambda t: quadratic([wb, bb] if t is None else [t["layer.weight"], t["layer.bias"]], target))
    torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)
    c, wc, bc = make(lr=0.05, eps=1e-2, q=2, seed=5, estimator="one-sided")
    for result in logged:
        c.replay_step(result.seeds, result.projected_grads, 0.05, result.skipped)
    assert torch.equal(wc, wa) and torch.equal(bc, ba)


@pytest.mark.slow
@pytest.mark.requires_shared
@pytest.mark.parametrize("fast,cache", [(True, 2048), (True, 0), (False, 0)])
def test_one_sided_run_replays_and_resumes_bit_exactly(tmp_path, fast, cache):
    """Fast path with the run's prefix cache, with a per-step prefix, and in place (θ copied back)."""
    options = dict(STATEFUL_RUN, steps=8, eval_every=4, scope="layer:1", fast_path=fast, estimator="one-sided", q=3,
                   lr=1e-2, prefix_cache_mb=cache, exact_restore_fraction=0.1 if fast else 1.0)
    assert_replay_and_resume_exact(tmp_path, options, stops=[6])


def test_one_sided_with_the_full_scope_in_place_is_refused():
    with pytest.raises(DlzoError, match="--estimator one-sided"):
        TrainConfig(model=str(STORIES), scope="full", estimator="one-sided").validate()


def test_hizoo_step_matches_a_brute_force_reference():
    """Three HiZOO steps on a quadratic, in place (θ copied back), against the formulas in float64."""
    opt, weight, bias = make(torch.float64, lr=0.05, eps=1e-2, seed=6, update_rule="hizoo", hessian_smooth=0.1)
    target = [torch.zeros_like(weight), torch.ones_like(bias)]
    theta = [weight.detach().double().clone(), bias.detach().double().clone()]
    hessian = [torch.ones_like(t) for t in theta]
    calls = []

    def closure():
        calls.append(1)
        return quadratic([weight, bias], target)

    for _ in range(3):
        result = opt.step(closure)
        zs = [opt.sample(result.seeds[0], i, t) for i, t in enumerate(theta)]
        us = [z / h.sqrt() for z, h in zip(zs, hessian)]
        loss = lambda ts: float(quadratic(ts, target))  # noqa: E731
        base = loss(theta)
        plus, minus = loss([t + 1e-2 * u for t, u in zip(theta, us)]), loss([t - 1e-2 * u for t, u in zip(theta, us)])
        g, c = (plus - minus) / 2e-2, abs(plus + minus - 2 * base) / (2 * 1e-2**2)
        assert result.projected_grads[0] == pytest.approx(g, rel=1e-9)
        assert result.curvatures[0] == pytest.approx(c, rel=1e-6)
        hessian = [h * (1 - 0.1 + 0.1 * c * z * z) for h, z in zip(hessian, zs)]
        theta = [t - 0.05 * g * z / h.sqrt() for t, z, h in zip(theta, zs, hessian)]
    assert len(calls) == 9  # L(θ), L(θ+εu), L(θ-εu) a step
    for index, param in enumerate((weight, bias)):
        torch.testing.assert_close(param.detach(), theta[index], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(opt.hessian[index], hessian[index], rtol=1e-9, atol=1e-10)
    assert not torch.allclose(opt.hessian[0], torch.ones_like(opt.hessian[0]))


def test_hizoo_learns_a_planted_diagonal_curvature():
    """On L = Σ h_i θ_i² with h = 1 on half the elements and 100 on the other half, D ends up ordered like h
    (the estimate's fixed point is proportional to h). Float64: in float32 the rounding of L+ + L- - 2·L0
    is a curvature of its own, which the |.| turns into growth of D."""
    torch.manual_seed(0)
    theta = nn.Parameter(torch.randn(8, dtype=torch.float64))
    curvature = torch.tensor([1.0] * 4 + [100.0] * 4, dtype=torch.float64)
    opt = ZOOptimizer([("theta", theta)], lr=1e-4, eps=1e-3, seed=1, update_rule="hizoo", hessian_smooth=0.005)
    for _ in range(2000):
        opt.step(lambda: (curvature * theta**2).sum())
    low, high = opt.hessian[0][:4].mean(), opt.hessian[0][4:].mean()
    assert high / low > 10
    assert opt.hessian[0][4:].min() > opt.hessian[0][:4].max()


def test_hizoo_replays_bit_exactly_and_needs_its_curvatures():
    target = [torch.zeros(6, 5), torch.ones(5)]
    opt, weight, bias = make(lr=0.05, eps=1e-2, q=2, seed=4, update_rule="hizoo", hessian_smooth=0.05, weight_decay=0.1)
    log = [opt.step(lambda: quadratic([weight, bias], target)) for _ in range(5)]
    ref, r_weight, r_bias = make(lr=0.05, eps=1e-2, q=2, seed=4, update_rule="hizoo", hessian_smooth=0.05,
                                 weight_decay=0.1)
    for result in log:
        ref.replay_step(result.seeds, result.projected_grads, 0.05, result.skipped, curvatures=result.curvatures)
    assert torch.equal(r_weight, weight) and torch.equal(r_bias, bias)
    sgd, s_weight, _ = make(lr=0.05, eps=1e-2, q=2, seed=4, weight_decay=0.1)
    for result in log:
        sgd.replay_step(result.seeds, result.projected_grads, 0.05, result.skipped)
    assert not torch.equal(s_weight, weight)
    with pytest.raises(ValueError, match="curvature"):
        make(update_rule="hizoo")[0].replay_step(log[0].seeds, log[0].projected_grads, 0.05, False)
    with pytest.raises(ValueError, match="step_hizoo"):
        opt.step_functional(lambda p, m: (0.0, 0.0))


@pytest.mark.slow
@pytest.mark.requires_shared
@pytest.mark.parametrize("fast,cache", [(True, 2048), (False, 0)])
def test_hizoo_run_replays_and_resumes_bit_exactly(tmp_path, fast, cache):
    """The fast path with the prefix cache, and in place; the Hessian estimate is rebuilt by replaying the log."""
    options = dict(STATEFUL_RUN, steps=8, eval_every=4, scope="layer:1", fast_path=fast, zo_update="hizoo",
                   hessian_smooth=1e-3, lr=1e-2, prefix_cache_mb=cache, exact_restore_fraction=0.1 if fast else 1.0)
    trained, stopped = assert_replay_and_resume_exact(tmp_path, options, stops=[3, 6])
    entries = [json.loads(line) for line in (stopped / "trajectory.jsonl").read_text().splitlines()]
    assert len(entries) == 8 and all(len(e["curvatures"]) == 1 and e["curvatures"][0] >= 0 for e in entries)
    replay_command(ReplayConfig(run=str(stopped)))
    summary = json.loads((stopped / "hessian.json").read_text())
    assert summary["steps"] == 8 and summary["elements"] == sum(t.numel() for t in trained.values())


def _hizoo_on_a_quadratic(curvature: torch.Tensor, alpha: float, steps: int) -> dict:
    torch.manual_seed(0)
    theta = nn.Parameter(torch.randn(curvature.numel(), dtype=torch.float64))
    opt = ZOOptimizer([("theta", theta)], lr=1e-4, eps=1e-3, seed=1, update_rule="hizoo", hessian_smooth=alpha)
    logged = [c for _ in range(steps) for c in opt.step(lambda: (curvature * theta**2).sum()).curvatures]
    return hessian_summary(opt, logged)


@pytest.mark.slow
def test_hessian_summary_tells_learned_curvature_from_noise():
    """Isotropic curvature over 20,000 elements: every difference between elements of D is z² noise, and the
    spread of log D is the one predicted from the logged curvatures alone (to 5%). A planted 100x curvature
    difference over 8 elements: the spread is well above it."""
    isotropic = _hizoo_on_a_quadratic(torch.ones(20_000, dtype=torch.float64), alpha=1e-5, steps=200)
    assert isotropic["log_D_std"] == pytest.approx(isotropic["log_D_std_if_noise_only"], rel=0.05)
    assert isotropic["D_mean"] > 2 and isotropic["step_scale_mean"] < 0.5  # D grew: the step shrank
    planted = _hizoo_on_a_quadratic(torch.tensor([1.0] * 4 + [100.0] * 4, dtype=torch.float64), alpha=0.005,
                                    steps=2000)
    assert planted["log_D_std"] > 1.3 * planted["log_D_std_if_noise_only"]


@pytest.mark.parametrize("options,message", [
    (dict(zo_update="hizoo", estimator="one-sided"), "--estimator two-sided"),
    (dict(zo_update="hizoo", parallel="perturbation"), "--parallel perturbation"),
    (dict(zo_update="hizoo", hessian_smooth=1.5), "--hessian-smooth"),
    (dict(zo_update="lion"), "--zo-update"),
    (dict(zo_update="hizoo", scope="full"), "--exact-restore-fraction 1"),
    (dict(zo_update="hizoo", scope="lezo:2"), "--scope lezo"),
])
def test_hizoo_bad_options_name_their_flag(options, message):
    with pytest.raises(DlzoError, match=message):
        TrainConfig(model=str(STORIES), **options).validate()


def test_a_non_finite_hizoo_step_leaves_weights_and_hessian_alone_and_replays():
    """A step whose L(θ) is not finite is skipped: θ and D stay as they were, in training and in replay."""
    target = [torch.zeros(6, 5), torch.ones(5)]
    opt, weight, bias = make(lr=0.05, eps=1e-2, seed=9, update_rule="hizoo", hessian_smooth=0.05)
    log = [opt.step(lambda: quadratic([weight, bias], target))]
    before, hessian = weight.detach().clone(), opt.hessian[0].clone()
    calls = []

    def poisoned():  # the first evaluation of the step is L(θ)
        calls.append(1)
        return float("nan") if len(calls) == 1 else quadratic([weight, bias], target)

    log.append(opt.step(poisoned))
    assert log[-1].skipped and torch.equal(weight, before) and torch.equal(opt.hessian[0], hessian)
    log.append(opt.step(lambda: quadratic([weight, bias], target)))
    ref, r_weight, r_bias = make(lr=0.05, eps=1e-2, seed=9, update_rule="hizoo", hessian_smooth=0.05)
    for result in log:
        ref.replay_step(result.seeds, result.projected_grads, 0.05, result.skipped, curvatures=result.curvatures)
    assert torch.equal(r_weight, weight) and torch.equal(r_bias, bias) and torch.equal(ref.hessian[1], opt.hessian[1])
