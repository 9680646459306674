import pytest

from conftest import DATA, tiny_model
from dlzo.data.benchmarks import load_task
from dlzo.engine.layer_choice import layer_parameters, layer_sensitivity, propagation, rank_correlation
from dlzo.engine.scoring import batch_loss, encode
from dlzo.engine.zo import ZOOptimizer


def test_sensitivity_matches_brute_force_perturbation(stories_tokenizer):
    """Every layer, two batches: the prefix below each layer is computed once per batch and reused, and
    each value must still equal perturbing that layer in place and running the whole model."""
    model = tiny_model("llama")
    examples = load_task("sst2", DATA).splits(num_train=8, num_dev=0, num_test=1).train
    batches = [encode(stories_tokenizer, examples[:4]), encode(stories_tokenizer, examples[4:])]
    results = layer_sensitivity(model, batches, eps=1e-2, seeds=2)
    assert [r.layer for r in results] == [0, 1, 2, 3]
    for result in results:
        named = layer_parameters(model, result.layer)
        sampler = ZOOptimizer(named, seed=10_000 + result.layer)  # the measurement's seed for this layer
        expected = []
        for seed in range(2):
            zs = [sampler.sample(seed, i, p) for i, (_, p) in enumerate(named)]
            for batch in batches:
                losses = []
                for sign in (1, -1):
                    for (_, p), z in zip(named, zs):
                        p.data.add_(z, alpha=sign * 1e-2)
                    losses.append(float(batch_loss(model, batch, full_logits=True)))
                    for (_, p), z in zip(named, zs):
                        p.data.add_(z, alpha=-sign * 1e-2)
                expected.append(abs(losses[0] - losses[1]) / 2e-2)
        assert result.values == pytest.approx(expected, rel=1e-3, abs=1e-4)


def test_propagation_is_zero_before_the_perturbed_layer_and_positive_after(stories_tokenizer):
    model = tiny_model("llama")
    examples = load_task("sst2", DATA).splits(num_train=4, num_dev=0, num_test=1).train
    matrix = propagation(model, encode(stories_tokenizer, examples), eps=1e-2)
    assert matrix[2][:2] == [0.0, 0.0] and all(v > 0 for v in matrix[2][2:])




def test_rank_correlation_against_known_values():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # scipy.stats.spearmanr([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) = 0.8; ties get average ranks
    assert rank_correlation([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert rank_correlation([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254, rel=1e-6)
