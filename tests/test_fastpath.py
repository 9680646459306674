import pytest
import torch

from conftest import DATA, tiny_model
from dlzo.data.benchmarks import load_task
from dlzo.data.examples import Example
from dlzo.engine.fastpath import BranchedForward
from dlzo.engine.layer_choice import layer_parameters
from dlzo.engine.scoring import batch_loss, encode

ARCHS = ["llama", "qwen3", "mistral", "opt", "gpt2", "gemma2", "phi3", "gpt_neox", "falcon"]


def perturbed_pair_plain(model, batch, named, zs, eps):
    """The plain path: perturb in place, one sequence per candidate, logits over the whole vocabulary."""
    losses = []
    for sign in (1, -1):
        for (_, p), z in zip(named, zs):
            p.data.add_(z, alpha=sign * eps)
        losses.append(batch_loss(model, batch, full_logits=True))
        for (_, p), z in zip(named, zs):
            p.data.add_(z, alpha=-sign * eps)
    return losses


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layers,layout", [([1], "padded"), ([0, 2], "padded"), ([2], "packed")])
def test_fast_path_equals_plain_path(arch, layers, layout, stories_tokenizer):
    from dlzo.engine.scoring import supports_packing

    if layout == "packed" and not supports_packing(tiny_model(arch), stories_tokenizer):
        pytest.skip(f"{arch} refuses packed sequences; the trainer pads for it")
    model = tiny_model(arch, layers=4)
    examples = load_task("copa", DATA).splits(num_train=5, num_dev=0, num_test=1).train
    examples += [Example("Once upon a time there was", [" a", " the"], 1)]  # packs into one row
    named = [item for layer in layers for item in layer_parameters(model, layer)]
    torch.manual_seed(0)
    zs = [torch.randn_like(p) for _, p in named]
    eps = 1e-2
    plus = {n: p.detach() + eps * z for (n, p), z in zip(named, zs)}
    minus = {n: p.detach() - eps * z for (n, p), z in zip(named, zs)}
    fast_batch = encode(stories_tokenizer, examples, layout=layout)
    fast = BranchedForward(model, [n for n, _ in named]).loss_pair(fast_batch, plus, minus)
    plain = perturbed_pair_plain(model, encode(stories_tokenizer, examples, pack_single_token=False), named, zs, eps)
    assert abs(float(fast[0] - fast[1])) > 1e-6  # the perturbation matters
    for f, p in zip(fast, plain):
        assert float(f) == pytest.approx(float(p), abs=1e-5)


def test_fast_path_leaves_model_untouched(stories_tokenizer):
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    named = layer_parameters(model, 2)
    runner = BranchedForward(model, [n for n, _ in named])
    batch = encode(stories_tokenizer, [Example("Hello there", [" a", " b"], 0)])
    runner.loss_pair(batch, {n: p + 1 for n, p in named}, {n: p - 1 for n, p in named})
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def test_fast_path_rejects_tensors_outside_layers():
    with pytest.raises(ValueError, match="inside decoder layers"):
        BranchedForward(tiny_model("llama"), ["model.embed_tokens.weight"])


def test_fast_path_under_accelerate_device_hooks(stories_tokenizer):
    """--device-map auto installs accelerate hooks (an instance-level forward) on every layer; the fast path
    must run through them, give the plain path's losses, and leave the hooks in place."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_model("llama")
    examples = load_task("copa", DATA).splits(num_train=4, num_dev=0, num_test=1).train
    batch = encode(stories_tokenizer, examples)
    named = layer_parameters(model, 1)
    zs = [torch.randn_like(p) for _, p in named]
    plus = {n: p.detach() + 1e-2 * z for (n, p), z in zip(named, zs)}
    minus = {n: p.detach() - 1e-2 * z for (n, p), z in zip(named, zs)}
    expected = BranchedForward(model, [n for n, _ in named]).loss_pair(batch, plus, minus)
    fired = []

    class Counting(AlignDevicesHook):
        def pre_forward(self, module, *args, **kwargs):
            fired.append(self.index)
            return super().pre_forward(module, *args, **kwargs)
    for index, layer in enumerate(model.model.layers):
        hook = Counting(execution_device="cpu")
        hook.index = index
        add_hook_to_module(layer, hook)
    hooked = {id(layer): layer.__dict__["forward"] for layer in model.model.layers}
    got = BranchedForward(model, [n for n, _ in named]).loss_pair(batch, plus, minus)
    assert [float(x) for x in got] == pytest.approx([float(x) for x in expected], abs=1e-6)
    assert set(fired) == set(range(len(model.model.layers)))  # every layer ran through its hook
    assert {id(layer): layer.__dict__["forward"] for layer in model.model.layers} == hooked
