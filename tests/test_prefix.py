"""The frozen-prefix cache (dlzo.engine.prefix): same losses as the uncached fast path and the plain path, the layers
below really skipped, exact resume with the cache on, and the limit."""

import json
from dataclasses import replace

import pytest
import torch

from conftest import DATA, small_run, tiny_model
from dlzo.data.benchmarks import load_task
from dlzo.data.examples import Example
from dlzo.engine.fastpath import BranchedForward
from dlzo.engine.layer_choice import layer_parameters
from dlzo.engine.prefix import FrozenPrefix, sequence_spans
from dlzo.engine.prefix_store import PrefixStore, prefix_fingerprint, start_loss_key
from dlzo.engine.scoring import batch_loss, encode, supports_packing
from dlzo.evaluation.evaluate import dev_loss
from dlzo.training.config import TrainConfig
from dlzo.training.loop import train


def _examples():
    examples = load_task("copa", DATA).splits(num_train=6, num_dev=0, num_test=1).train
    return examples + [Example("Once upon a time there was", [" a", " the"], 1)]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "opt"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_cached_prefix_gives_the_uncached_losses(arch, layout, stories_tokenizer):
    model = tiny_model(arch, layers=4)
    if layout == "packed" and not supports_packing(model, stories_tokenizer):
        pytest.skip(f"{arch} refuses packed sequences")
    examples = _examples()
    named = layer_parameters(model, 2)
    torch.manual_seed(0)
    plus = {n: p.detach() + 1e-2 * torch.randn_like(p) for n, p in named}
    minus = {n: 2 * p.detach() - plus[n] for n, p in named}
    frozen = FrozenPrefix(model, 2, 2**30)
    # filled from other batch shapes than the one read below: three examples at a time
    for start in range(0, len(examples), 3):
        frozen.fill(encode(stories_tokenizer, examples[start : start + 3], layout=layout))
    batch = encode(stories_tokenizer, examples, layout=layout)
    cached = BranchedForward(model, list(plus), frozen).loss_pair(batch, plus, minus)
    uncached = BranchedForward(model, list(plus)).loss_pair(batch, plus, minus)
    assert abs(float(cached[0] - cached[1])) > 1e-6
    for c, u in zip(cached, uncached):
        assert float(c) == pytest.approx(float(u), abs=1e-5)
    # a plain (unperturbed) forward through the cache: the model's own loss
    with frozen.applied(batch):
        through = float(batch_loss(model, batch))
    assert through == pytest.approx(float(batch_loss(model, batch)), abs=1e-5)
    assert all("forward" not in layer.__dict__ for layer in frozen.layers)


def test_cached_layers_do_not_run(stories_tokenizer):
    """The layers below the tuned one are not called once the cache holds the batch."""
    model = tiny_model("llama", layers=4)
    batch = encode(stories_tokenizer, _examples())
    frozen = FrozenPrefix(model, 3, 2**30)
    frozen.fill(batch)
    calls = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, layer in
             enumerate(frozen.layers)]
    named = layer_parameters(model, 3)
    tensors = {n: p.detach() for n, p in named}
    BranchedForward(model, list(tensors), frozen).loss_pair(batch, tensors, tensors)
    for hook in hooks:
        hook.remove()
    # the three frozen layers' work never runs; the tuned layer runs once per branch
    assert calls == [3, 3]


def test_sequence_spans_of_packed_and_padded_rows(stories_tokenizer):
    examples = [Example("Hello there", [" a", " b"], 0), Example("Once upon a time", [" x", " y"], 1)]
    padded = encode(stories_tokenizer, examples, layout="padded", padding_side="left")
    lengths = padded.attention_mask.sum(-1).tolist()
    assert [(end - start) for _, start, end in sequence_spans(padded)] == lengths
    packed = encode(stories_tokenizer, examples, layout="packed")
    spans = sequence_spans(packed)
    assert sum(end - start for _, start, end in spans) == packed.input_ids.numel()
    for row, start, end in spans:
        assert packed.position_ids[row, start:end].tolist() == list(range(end - start))


def test_a_cache_over_its_limit_is_dropped(stories_tokenizer):
    model = tiny_model("llama", layers=4)
    batch = encode(stories_tokenizer, _examples())
    frozen = FrozenPrefix(model, 2, limit_bytes=1000)
    frozen.fill(batch)
    assert frozen.dropped and not frozen.entries
    plain = float(batch_loss(model, batch))
    with frozen.applied(batch):  # runs the layers instead: exactly the uncached loss
        assert float(batch_loss(model, batch)) == plain


def test_dev_loss_through_the_cache(stories_tokenizer):
    model = tiny_model("llama", layers=4)
    examples = _examples()
    frozen = FrozenPrefix(model, 2, 2**30)
    plain = dev_loss(model, stories_tokenizer, examples, batch_size=4)
    first = dev_loss(model, stories_tokenizer, examples, batch_size=4, frozen=frozen)
    assert frozen.entries  # the first pass filled the cache
    calls = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, layer in
             enumerate(frozen.layers)]
    again = dev_loss(model, stories_tokenizer, examples, batch_size=4, frozen=frozen)
    for hook in hooks:
        hook.remove()
    assert first == pytest.approx(plain, abs=1e-6) and again == first
    assert calls and min(calls) == 2  # layers 0 and 1 were read from the cache; 2 and 3 ran


def _config(tmp_path, stories_path, name, **extra):
    options = small_run("eval_batch_size", model=stories_path, task="copa", scope="layer:2", steps=12, num_train=16,
                        num_dev=8, num_test=4, eval_every=4)
    return TrainConfig(**options, out=str(tmp_path / name), **extra)


def test_training_with_and_without_the_cache(tmp_path, stories_path, capsys):
    cached = train(_config(tmp_path, stories_path, "cached"))
    assert "frozen prefix: layers 0-1 cached for" in capsys.readouterr().out
    uncached = train(_config(tmp_path, stories_path, "uncached", prefix_cache_mb=0))
    assert cached["dev_loss_best"] == pytest.approx(uncached["dev_loss_best"], abs=1e-4)
    grads = [[json.loads(line)["grads"][0] for line in (tmp_path / name / "trajectory.jsonl").read_text().splitlines()]
             for name in ("cached", "uncached")]
    assert grads[0] == pytest.approx(grads[1], rel=1e-2, abs=1e-3)


def test_resume_with_the_cache_is_exact(tmp_path, stories_path):
    """Stopped after step 8 and resumed: the same tuned tensors as an uninterrupted run (cache on)."""
    from safetensors.torch import load_file

    train(_config(tmp_path, stories_path, "whole"))
    first = _config(tmp_path, stories_path, "resumed")
    first.steps = 8
    train(first)
    rest = _config(tmp_path, stories_path, "resumed", resume=str(tmp_path / "resumed"))
    train(rest)
    whole = load_file(tmp_path / "whole" / "final.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


# ------------------------------------------------------------------------------------ the prefix kept on disk


def test_a_second_run_reads_the_stored_prefix_and_trains_the_same(tmp_path, stories_path, capsys, monkeypatch):
    """Run A fills the store; run B (another folder, same data and model) reads every batch from it, never runs
    the layers below, and ends with A's tensors and A's projected gradients, bit for bit."""
    from safetensors.torch import load_file

    store = tmp_path / "store"
    train(_config(tmp_path, stories_path, "a", prefix_store=str(store)))
    assert "; 0 of " in capsys.readouterr().out  # A found nothing to read
    files = sorted(store.rglob("*.safetensors"))
    assert len({f.parent for f in files}) == 1 and len(files) == 2  # the 16 training examples (one chunk), the dev batch
    computed = []
    run_layers = FrozenPrefix._prefix_output
    monkeypatch.setattr(FrozenPrefix, "_prefix_output", lambda self, batch: computed.append(1) or run_layers(self, batch))
    train(_config(tmp_path, stories_path, "b", prefix_store=str(store)))
    assert "1 of 1 batches read from the store" in capsys.readouterr().out  # before step 0: the training chunk
    assert computed == []  # nor at the evaluations: the dev batch came from the store too
    a, b = (load_file(tmp_path / name / "final.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    grads = [[json.loads(line)["grads"] for line in (tmp_path / name / "trajectory.jsonl").read_text().splitlines()]
             for name in ("a", "b")]
    assert grads[0] == grads[1]


def _step0(folder):
    first = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0
    return first["dev_loss"]


def test_the_dev_loss_at_step_0_is_measured_once_per_layer_and_data(tmp_path, stories_path, capsys, monkeypatch):
    """A sweep's runs of one layer (other rate, other seed) read the untrained model's dev loss that the first
    stored: the very float a run without the store measures. Another layer or another dev set measures it."""
    import dlzo.training.loop

    store = str(tmp_path / "store")
    measured = []
    real = dlzo.training.loop.dev_loss
    monkeypatch.setattr(dlzo.training.loop, "dev_loss", lambda *a, **k: measured.append(1) or real(*a, **k))
    train(_config(tmp_path, stories_path, "a", prefix_store=store))
    assert len(measured) == 4  # steps 0, 4, 8, 12
    (kept,) = (tmp_path / "store").rglob("start-loss-*.json")
    assert json.loads(kept.read_text())["dev_loss"] == _step0(tmp_path / "a")
    measured.clear()
    train(replace(_config(tmp_path, stories_path, "b", prefix_store=store), lr=3e-3, seed=1))
    assert len(measured) == 3  # not at step 0
    assert "read from the store" in capsys.readouterr().out
    train(_config(tmp_path, stories_path, "plain"))  # no store: measured, the same float
    assert _step0(tmp_path / "b") == _step0(tmp_path / "plain") == _step0(tmp_path / "a")
    for name, extra in (("layer1", {"scope": "layer:1"}), ("dev6", {"num_dev": 6})):
        measured.clear()
        train(replace(_config(tmp_path, stories_path, name, prefix_store=store), **extra))
        assert len(measured) == 4, name
    assert len(list((tmp_path / "store").rglob("start-loss-*.json"))) == 3


def test_the_start_loss_key_follows_the_weights_above_and_the_dev_batches(tmp_path, stories_tokenizer):
    model = tiny_model("llama", layers=4)
    examples = _examples()

    def key(chosen=examples):
        return start_loss_key(model, 2, [encode(stories_tokenizer, chosen)], {"examples": len(chosen)})

    before = key()
    flipped = [Example(e.prompt, e.continuations, 1 - e.label) for e in examples]
    assert key(flipped) != before  # same tokens, other answers: another loss
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight[0, 0] += 1e-3  # a layer above the tuned one (a merged model)
    assert key() != before
    store = PrefixStore(tmp_path)
    store.write_start_loss(before, 0.1 + 0.2)
    assert store.read_start_loss(before) == 0.1 + 0.2  # every digit kept
    store._start_file(before).write_text("{not json")
    assert store.read_start_loss(before) is None  # damaged: measured again


def test_the_fingerprint_follows_the_frozen_weights_only():
    """Changing a frozen layer's weight changes the folder; changing the tuned layer's or one above does not."""
    model = tiny_model("llama", layers=4)
    before = prefix_fingerprint(model, 2)
    with torch.no_grad():
        for index in (2, 3):  # the tuned layer and the one above: they change while training
            model.model.layers[index].mlp.up_proj.weight.add_(1.0)
        assert prefix_fingerprint(model, 2) == before
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
        assert prefix_fingerprint(model, 2) != before


@pytest.mark.parametrize("damage", ["cut short", "bytes flipped"])
def test_a_damaged_stored_batch_is_computed_again(tmp_path, stories_tokenizer, damage):
    model = tiny_model("llama", layers=4)
    batch = encode(stories_tokenizer, _examples())
    reference = FrozenPrefix(model, 2, 2**30)
    reference.fill(batch)
    FrozenPrefix(model, 2, 2**30, PrefixStore.open(tmp_path, model, 2)).fill(batch)
    (stored,) = tmp_path.rglob("*.safetensors")
    data = bytearray(stored.read_bytes())
    if damage == "cut short":  # a full disk, a kill while copying the folder
        data = data[:100]
    else:  # a bad disk: the file still parses, its numbers are wrong (safetensors has no checksum: ours finds it)
        data[-8:] = bytes(8 * [0x41])
    stored.write_bytes(bytes(data))
    store = PrefixStore.open(tmp_path, model, 2)
    again = FrozenPrefix(model, 2, 2**30, store)
    again.fill(batch)
    assert store.misses == 1 and store.hits == 0
    assert again.entries.keys() == reference.entries.keys()
    assert all(torch.equal(again.entries[k], reference.entries[k]) for k in reference.entries)
    fresh = PrefixStore.open(tmp_path, model, 2)  # rewritten whole: the next run reads it
    FrozenPrefix(model, 2, 2**30, fresh).fill(batch)
    assert fresh.hits == 1


@pytest.mark.parametrize("arch", ["llama", "falcon"])  # falcon's layers return tuples, llama's tensors
def test_a_batch_read_from_the_store_gives_the_computed_losses(tmp_path, stories_tokenizer, arch):
    """Every batch read from the store (the layers below never run): the losses of a run that computed them,
    whatever the layers return; each file holds the whole batch, so a cache holding part of it reads it too."""
    model = tiny_model(arch, layers=4)
    examples = _examples()
    batch = encode(stories_tokenizer, examples)
    computed = FrozenPrefix(model, 2, 2**30, PrefixStore.open(tmp_path, model, 2))
    computed.fill(batch)
    store = PrefixStore.open(tmp_path, model, 2)
    read = FrozenPrefix(model, 2, 2**30, store)
    read.entries[next(iter(computed.entries))] = next(iter(computed.entries.values()))  # one sequence cached already
    read.fill(batch)
    assert store.hits == 1 and read.entries.keys() == computed.entries.keys()
    plain = float(batch_loss(model, batch))
    for frozen in (computed, read):
        with frozen.applied(batch):
            assert float(batch_loss(model, batch)) == pytest.approx(plain, abs=1e-5)
    with computed.applied(batch):
        through_computed = float(batch_loss(model, batch))
    with read.applied(batch):
        assert float(batch_loss(model, batch)) == through_computed


def test_a_store_that_cannot_be_written_costs_only_itself(tmp_path, stories_tokenizer, capsys):
    model = tiny_model("llama", layers=4)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = PrefixStore.open(blocker, model, 2)  # its folder would sit under a file
    frozen = FrozenPrefix(model, 2, 2**30, store)
    frozen.fill(encode(stories_tokenizer, _examples()))
    assert frozen.entries and not store.writable
    assert "--prefix-store: cannot write to" in capsys.readouterr().out
