"""Float32 master weights for the tuned tensors of half-precision models (dlzo.engine.master): the update survives,
the forward is the half model's, the lazy perturbation is the eager one bit for bit, and a bfloat16 run replays
and resumes exactly."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_replay_and_resume_exact, small_run, tiny_model
from dlzo.engine.fastpath import BranchedForward, tensors_in
from dlzo.engine.master import MasterWeights, install_masters, round_trip_drift
from dlzo.engine.zo import ZOOptimizer, direction_seed
from dlzo.errors import DlzoError
from dlzo.model.loading import decoder_layers
from dlzo.training.config import TrainConfig
from dlzo.training.loop import train
from dlzo.training.replay import replay
from dlzo.training.step import LayerCheckpointing

LAYER = 1


def half_model(dtype=torch.bfloat16):
    return tiny_model("llama").to(dtype)


def layer_names(model, layer=LAYER) -> list[str]:
    return [f"model.layers.{layer}.{n}" for n, _ in decoder_layers(model)[layer].named_parameters()]


def causal_inputs(vocab=512, rows=3, length=10, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def tuned(model, names):
    params = dict(model.named_parameters())
    return [(n, params[n]) for n in names]


def test_masters_stand_in_for_the_half_tensors_and_the_forward_is_the_half_models():
    model, reference = half_model(), half_model()
    names = layer_names(model)
    masters = MasterWeights(model, names)
    params = dict(model.named_parameters())
    assert sorted(masters.masters) == sorted(names) and all(params[n].dtype == torch.float32 for n in names)
    assert all(p.dtype == torch.bfloat16 for n, p in params.items() if n not in names)  # the frozen ones stay
    inputs = causal_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
    owner = decoder_layers(model)[LAYER].mlp.up_proj
    assert owner._parameters["weight"] is masters.masters[f"model.layers.{LAYER}.mlp.up_proj.weight"]  # cast dropped
    assert install_masters(tiny_model("llama"), names, "on", "layers") is None  # float32: nothing to keep
    assert install_masters(half_model(), names, "auto", "full") is None  # full scope: only when asked
    assert install_masters(half_model(), names, "auto", "lezo") is None
    assert install_masters(half_model(), names, "off", "layers") is None
    assert install_masters(half_model(), names, "on", "full")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_update_at_lr_1e_6_survives_with_masters_and_is_rounded_away_without(dtype):
    """The issue's measurement: one Gaussian z, |g| = 1, lr 1e-6 on a layer's tensors."""
    eps = 1e-3
    pair = lambda plus, minus: (eps, -eps)  # noqa: E731 - g = (L+ - L-)/2ε = 1
    changed = {}
    for keep in (True, False):
        model = half_model(dtype)
        names = layer_names(model)
        before = {n: p.detach().float().clone() for n, p in tuned(model, names)}
        masters = MasterWeights(model, names) if keep else None
        opt = ZOOptimizer(tuned(model, names), lr=1e-6, eps=eps, working_dtypes=masters.working if keep else None)
        opt.step_functional(pair)
        after = dict(model.named_parameters())
        moved = sum(int((after[n].detach().float() != before[n]).sum()) for n in names)
        changed[keep] = moved / sum(t.numel() for t in before.values())
    assert changed[True] > 0.99
    assert changed[False] < 0.1  # bfloat16 keeps about 0.1%, float16 about 1%


@pytest.mark.parametrize("rule,estimator,levers", [
    ("sgd", "two-sided", {}), ("adam", "two-sided", {}), ("sgd", "one-sided", {}), ("hizoo", "two-sided", {}),
    ("normalized", "one-sided", {"distribution": "rademacher"}),
    ("sgd", "two-sided", {"distribution": "lowrank", "rank": 2, "lazy_steps": 2}),
    ("sgd", "two-sided", {"mask_fraction": 0.2})])
def test_lazy_perturbation_is_the_eager_one_bit_for_bit(rule, estimator, levers):
    """The same masters stepped twice: perturbed tensors made one module at a time in the working dtype (what a
    run does), and as whole float32 dicts that the masters' cast hook casts. Same losses, same masters."""
    inputs = causal_inputs()
    runs = []
    for lazy in (True, False):
        model = half_model()
        names = layer_names(model)
        masters = MasterWeights(model, names)
        opt = ZOOptimizer(tuned(model, names), lr=1e-2, eps=1e-2, q=2 if rule in ("sgd", "normalized") else 1,
                          update_rule=rule, estimator=estimator, hessian_smooth=0.1,
                          working_dtypes=masters.working if lazy else None, **levers)
        runner = BranchedForward(model, names)

        def loss_at(tensors, model=model):
            with tensors_in(model, tensors) if tensors is not None else contextlib.nullcontext():
                return float(model(**inputs).loss)

        losses = []
        for _ in range(3):
            if rule == "hizoo":
                result = opt.step_hizoo(loss_at)
            elif estimator == "one-sided":
                result = opt.step_one_sided(loss_at)
            else:
                result = opt.step_functional(lambda plus, minus, r=runner: r.pair_model_loss(inputs, plus, minus))
            losses.append((result.loss_plus, result.loss_minus))
        runs.append((losses, {n: p.detach().clone() for n, p in tuned(model, names)}, masters, model))
    (lazy_losses, lazy_tensors, masters, model), (eager_losses, eager_tensors, _, _) = runs
    assert lazy_losses == eager_losses
    assert all(torch.equal(lazy_tensors[n], eager_tensors[n]) for n in lazy_tensors)
    base = dict(half_model().named_parameters())
    assert any(not torch.equal(lazy_tensors[n], base[n].float()) for n in lazy_tensors)  # it did move
    assert all(model.get_parameter(n) is masters.masters[n] for n in lazy_tensors)  # nothing left swapped in


def test_the_drift_of_the_in_place_round_trip_is_measured_with_its_arithmetic():
    model = half_model()
    names = layer_names(model)
    named = tuned(model, names)
    opt = ZOOptimizer(named, eps=1e-3, exact_restore=False)
    seed = direction_seed(0, 0, 0)
    before = {n: p.detach().clone() for n, p in named}
    drift, moved = round_trip_drift(named, lambda i, like: opt.sample(seed, i, like), 1e-3)
    assert all(torch.equal(p, before[n]) for n, p in named)  # measured on copies
    opt.add_noise(seed, 1e-3)
    opt.add_noise(seed, -2e-3)
    opt.add_noise(seed, 1e-3)
    diffs = [(p.detach().float() - before[n].float()).abs() for n, p in named]
    assert drift == max(float(d.max()) for d in diffs) > 0
    assert moved == pytest.approx(sum(int((d > 0).sum()) for d in diffs) / sum(d.numel() for d in diffs))


def test_adamw_steps_the_masters_through_the_cast():
    model = half_model()
    names = layer_names(model)
    masters = MasterWeights(model, names)
    adam = torch.optim.AdamW([p for _, p in tuned(model, names)], lr=1e-3)
    before = {n: p.detach().clone() for n, p in tuned(model, names)}
    model(**causal_inputs()).loss.backward()
    adam.step()
    assert all(masters.masters[n].grad is not None and masters.masters[n].grad.dtype == torch.float32 for n in names)
    assert all(not torch.equal(p, before[n]) for n, p in tuned(model, names))


def test_gradient_checkpointing_recomputes_through_the_casts_and_leaves_the_masters_in_place():
    """--gradient-checkpointing: the backward recomputes the tuned layer through its masters' casts to the
    layer's end, so each module's hook puts its master back (torch's early stop of the recomputation skipped
    the last one's): the same float32 gradients and steps as without, and every tuned tensor a float32 leaf."""
    runs = []
    for checkpointed in (False, True):
        model = half_model()
        names = layer_names(model)
        MasterWeights(model, names)
        checkpointing = LayerCheckpointing(model, LAYER) if checkpointed else None
        adam = torch.optim.AdamW([p for _, p in tuned(model, names)], lr=1e-3)
        for _ in range(2):
            adam.zero_grad()
            with checkpointing.active() if checkpointed else contextlib.nullcontext():
                model(**causal_inputs()).loss.backward()
            assert all(p.is_leaf and p.dtype == torch.float32 and p.grad is not None for _, p in tuned(model, names))
            adam.step()
        runs.append({n: p.detach().clone() for n, p in tuned(model, names)})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_remove_puts_the_cast_masters_back():
    model = half_model()
    names = layer_names(model)
    masters = MasterWeights(model, names)
    with torch.no_grad():
        for _, p in tuned(model, names):
            p.add_(0.01)
    expected = {n: p.detach().to(torch.bfloat16) for n, p in tuned(model, names)}
    masters.remove()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], expected[n]) for n in names)
    assert not decoder_layers(model)[LAYER].mlp.up_proj._forward_pre_hooks


def test_a_bad_master_weights_value_names_its_flag():
    with pytest.raises(DlzoError, match="--master-weights 'yes'"):
        TrainConfig(model="m", master_weights="yes").validate()


# ------------------------------------------------------------------------------------ runs (stories260K)

BF16 = small_run(dtype="bfloat16", steps=6, eval_every=3, lr=1e-4)


@pytest.mark.requires_shared
@pytest.mark.parametrize("changes", [
    dict(scope="layer:1"),
    pytest.param(dict(scope="layer:1", fast_path=False), marks=pytest.mark.slow),
    pytest.param(dict(scope="layer:1", zo_update="adam"), marks=pytest.mark.slow),
    pytest.param(dict(scope="layer:1", estimator="one-sided"), marks=pytest.mark.slow),
    pytest.param(dict(scope="full", master_weights="on"), marks=pytest.mark.slow),
], ids=["fast", "copy", "adam", "one-sided", "full-arithmetic"])
def test_a_bfloat16_run_keeps_float32_masters_and_replays_and_resumes_bit_exactly(tmp_path, changes):
    whole, _ = assert_replay_and_resume_exact(tmp_path, {**BF16, **changes}, stops=[3])
    assert all(t.dtype == torch.float32 for t in whole.values())
    assert json.loads((tmp_path / "whole" / "run.json").read_text())["master_weights"] is True
    base = replay(tmp_path / "whole", upto=0)  # the base weights, cast to float32 as the masters start
    changed = sum(int((whole[n] != base[n]).sum()) for n in whole) / sum(t.numel() for t in whole.values())
    assert changed > 0.99


@pytest.mark.requires_shared
def test_a_bfloat16_full_scope_without_masters_warns_with_the_measured_drift(tmp_path, capsys):
    train(TrainConfig(**{**BF16, "steps": 1, "eval_every": 0}, scope="full", out=str(tmp_path)))
    out = capsys.readouterr().out
    assert "warning: the tuned tensors are bfloat16 without float32 masters" in out
    assert "they are off by up to" in out and "--master-weights on" in out
    final = load_file(tmp_path / "final.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in final.values())  # as before: the update in the tensors' dtype
    assert json.loads((tmp_path / "run.json").read_text())["master_weights"] is False


@pytest.mark.requires_shared
@pytest.mark.slow
def test_a_bfloat16_zo_trainer_keeps_masters_in_its_checkpoints_and_resumes_bit_for_bit(stories_path, tmp_path):
    from test_hf_trainer import make_trainer
    from transformers import AutoModelForCausalLM

    def trainer(out):
        model = AutoModelForCausalLM.from_pretrained(stories_path, torch_dtype=torch.bfloat16)
        return make_trainer(stories_path, out, model=model, max_steps=4, save_strategy="steps", save_steps=2,
                            learning_rate=1e-4)

    straight = trainer(tmp_path / "straight")
    base = {n: p.detach().clone() for n, p in straight.model.named_parameters() if n in straight.zo_scope.names}
    assert straight.zo_masters and all(p.dtype == torch.float32 for p in base.values())
    straight.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    s, r = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.equal(s[n], r[n]) for n in s)
    moved = sum(int((s[n] != base[n]).sum()) for n in base) / sum(t.numel() for t in base.values())
    assert moved > 0.99
