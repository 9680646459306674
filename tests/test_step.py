"""dlzo.training.step: which examples a step sees, and one ZO step of a real (tiny) model against a brute-force
SPSA step; the first-order reference step skips a non-finite loss."""

import copy
import random

import numpy as np
import pytest
import torch

from conftest import tiny_model
from dlzo.data.examples import Example
from dlzo.engine.scope import parse_scope, select
from dlzo.engine.scoring import batch_loss, encode
from dlzo.engine.zo import ZOOptimizer, direction_seed
from dlzo.errors import DlzoError
from dlzo.model.loading import decoder_layers
from dlzo.training.step import (
    LayerCheckpointing,
    StepRunner,
    adamw_step,
    batch_indices,
    step_batches,
    zo_step,
)

EXAMPLES = [Example("Once upon a time there was", [" a", " the"], 1), Example("The cat sat on", [" the", " a"], 0),
            Example("Lily liked to play in the", [" park", " sun"], 0),
            Example("Tom was very happy. He said thank", [" door", " you"], 1)]


# ----------------------------------------------------------------------------------------------- batch order


@pytest.mark.parametrize("num_examples,batch_size", [(64, 4), (10, 4), (7, 7)])
def test_each_epoch_sees_every_example_at_most_once_and_all_when_the_batches_fit(num_examples, batch_size):
    per_epoch = max(num_examples // batch_size, 1)
    for epoch in range(3):
        seen = [i for step in range(epoch * per_epoch, (epoch + 1) * per_epoch)
                for i in batch_indices(step, num_examples, batch_size, seed=0)]
        assert len(seen) == per_epoch * batch_size == len(set(seen))  # no example twice within an epoch
        assert set(seen) <= set(range(num_examples))
        if num_examples % batch_size == 0:
            assert sorted(seen) == list(range(num_examples))


def test_the_order_is_seeded_shuffled_and_new_each_epoch():
    epoch = lambda seed, index: [i for step in range(16 * index, 16 * (index + 1))  # noqa: E731
                                 for i in batch_indices(step, 64, 4, seed)]
    first = epoch(0, 0)
    assert first != list(range(64))  # shuffled, not file order
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)  # the global generators do not enter: a resumed run draws the same batches
    assert epoch(0, 0) == first
    assert epoch(1, 0) != first and epoch(0, 1) != first  # another run seed, the next epoch: another order


def test_a_batch_larger_than_the_data_is_all_of_it():
    assert sorted(batch_indices(0, 3, 8, seed=5)) == [0, 1, 2]
    assert sorted(batch_indices(1, 3, 8, seed=5)) == [0, 1, 2]


def test_micro_batches_split_a_steps_examples_in_order(stories_tokenizer):
    batches = step_batches(stories_tokenizer, EXAMPLES, 2, torch.device("cpu"), fast_path=False, max_length=512,
                           generation=False, layout="padded")
    assert [b.num_examples for b in batches] == [2, 2]
    assert batches[1].labels.tolist() == [e.label for e in EXAMPLES[2:]]


# ----------------------------------------------------------------------------------------------- the ZO step


@pytest.mark.parametrize("fast_path", [False, True])
@pytest.mark.parametrize("q", [1, 2])
def test_zo_step_is_a_brute_force_spsa_step(stories_tokenizer, fast_path, q):
    """g_d = (L(θ+εz_d) - L(θ-εz_d)) / 2ε from whole-model forwards of perturbed copies (full logits, one
    sequence per candidate), θ ← θ - lr·Σ_d g_d·z_d / q over layer 1's tensors only, z_d from (seed, 0, d)."""
    lr, eps, seed = 1e-2, 1e-2, 7
    model = tiny_model("llama", layers=3)
    scope = select(model, parse_scope("layer:1"), [1])
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = ZOOptimizer([(n, params[n]) for n in scope.names], lr=lr, eps=eps, q=q, seed=seed)
    batches = step_batches(stories_tokenizer, EXAMPLES, 1, torch.device("cpu"), fast_path=fast_path,
                           max_length=512, generation=False, layout="padded")
    result = zo_step(optimizer, StepRunner(model, scope, fast_path), batches)

    plain = encode(stories_tokenizer, EXAMPLES, pack_single_token=False)
    expected = {n: before[n].clone() for n in scope.names}
    assert result.seeds == [direction_seed(seed, 0, d) for d in range(q)]
    for d, direction in enumerate(result.seeds):
        zs = {n: optimizer.sample(direction, i, before[n]) for i, n in enumerate(scope.names)}
        losses = []
        for sign in (1, -1):
            perturbed = copy.deepcopy(model)
            with torch.no_grad():
                for name, p in perturbed.named_parameters():
                    p.copy_(before[name] + sign * eps * zs[name] if name in zs else before[name])
                losses.append(float(batch_loss(perturbed, plain, full_logits=True)))
        g = (losses[0] - losses[1]) / (2 * eps)
        assert result.projected_grads[d] == pytest.approx(g, rel=1e-3, abs=1e-4)
        for name in scope.names:
            expected[name] -= lr * g * zs[name] / q
    assert abs(result.projected_grads[0]) > 1e-3  # the step moved the weights measurably
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-5)
        else:
            assert torch.equal(p.detach(), before[name]), name  # outside the scope nothing moves
    assert optimizer.step_count == 1


def test_adamw_step_trains_the_scope_and_skips_a_non_finite_loss(stories_tokenizer):
    model = tiny_model("llama", layers=3)
    scope = select(model, parse_scope("layer:1"), [1])
    params = [p for n, p in model.named_parameters() if n in scope.names]
    batches = step_batches(stories_tokenizer, EXAMPLES, 2, torch.device("cpu"), fast_path=False, max_length=512,
                           generation=False, layout="padded")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, skipped = adamw_step(model, torch.optim.AdamW(params, lr=1e-2), batches, params)
    whole = float(batch_loss(tiny_model("llama", layers=3), encode(stories_tokenizer, EXAMPLES, pack_single_token=False),
                             full_logits=True))
    assert not skipped and loss == pytest.approx(whole, rel=1e-5)  # two halves averaged: the batch's loss
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == set(scope.names)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    after = {n: p.detach().clone() for n, p in model.named_parameters() if n in scope.names}
    loss, skipped = adamw_step(model, torch.optim.AdamW(params, lr=1e-2), batches, params)
    assert skipped and loss != loss  # NaN
    assert all(torch.equal(p.detach(), after[n]) for n, p in model.named_parameters() if n in scope.names)


def count_forwards(blocks) -> list[int]:
    """How often each block's attention starts: the recomputation calls the block's forward itself, past the
    block's own hooks but through its modules' (and stops once it has what the backward needs)."""
    calls = [0] * len(blocks)
    for index, block in enumerate(blocks):
        block.self_attn.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    return calls


@pytest.mark.parametrize("arch", ["llama", "opt"])  # OPT's layers apply dropout (0.1) in their own forward
def test_gradient_checkpointing_recomputes_the_layers_and_steps_the_same(stories_tokenizer, arch):
    """--gradient-checkpointing: the same losses and weights over two AdamW steps of a layer scope (the step
    runs in eval mode, so no dropout either way), the layers from the tuned one up run twice a micro-batch (the
    forward and the backward's recomputation), those below once, and every module is left in eval mode."""
    batches = step_batches(stories_tokenizer, EXAMPLES, 2, torch.device("cpu"), fast_path=True, max_length=512,
                           generation=False, layout="padded")
    runs = []
    for checkpointed in (False, True):
        model = tiny_model(arch, layers=4)
        params = [p for n, p in model.named_parameters() if n in select(model, parse_scope("layer:1"), [1]).names]
        checkpointing = LayerCheckpointing(model, 1) if checkpointed else None
        calls = count_forwards(decoder_layers(model))
        adam = torch.optim.AdamW(params, lr=1e-2)
        losses = [adamw_step(model, adam, batches, params, checkpointing) for _ in range(2)]
        runs.append((losses, dict(model.named_parameters()), calls))
        assert not any(module.training for module in model.modules())
    (plain_losses, plain, plain_calls), (losses, weights, calls) = runs
    assert [loss for loss, _ in losses] == pytest.approx([loss for loss, _ in plain_losses], rel=1e-6)
    assert not any(skipped for _, skipped in losses)
    for name, param in plain.items():
        torch.testing.assert_close(weights[name], param, rtol=1.3e-6, atol=1e-5)
    assert plain_calls == [4] * 4  # two steps of two micro-batches
    assert calls == [4, 8, 8, 8]


def test_gradient_checkpointing_refuses_a_model_without_transformers_checkpointing():
    model = tiny_model("llama", layers=2)
    model.supports_gradient_checkpointing = False
    with pytest.raises(DlzoError, match="^--gradient-checkpointing: .*does not support"):
        LayerCheckpointing(model, 1)
