"""dlzo.training.prepare: the model a run tunes, with its scope resolved to the very tensors of the chosen layer
(dominant: the layer choice's, or the one a resumed run recorded), LoRA adapters rebuilt alike from the run
seed, and the ZO optimizer over the model's own tensors."""

import pytest
import torch

import dlzo.training.prepare as prepare
from dlzo.data.examples import Example
from dlzo.model.loading import decoder_layers
from dlzo.training.config import TrainConfig
from dlzo.training.prepare import load_into, make_zo_optimizer, prepare_model

TEXTS = [Example("Once upon a time there was", [" a", " the"], 1), Example("The cat sat on", [" the", " a"], 0)]


def plant_choice(monkeypatch, layer: int) -> list:
    """choose_dominant_layer answers `layer`; returns the calls it got."""
    calls = []

    def planted(model, tokenizer, examples, eps, **kwargs):
        calls.append(examples)
        return {"layer": layer, "reason": "planted"}

    monkeypatch.setattr(prepare, "choose_dominant_layer", planted)
    return calls


def layer_tensors(model, layer: int) -> list[int]:
    return sorted(id(p) for p in decoder_layers(model)[layer].parameters())


def test_the_dominant_scope_resolves_to_the_chosen_layers_tensors(stories_path, monkeypatch):
    calls = plant_choice(monkeypatch, 3)
    prepared = prepare_model(TrainConfig(model=stories_path, scope="dominant"), TEXTS)
    assert calls == [TEXTS]  # chosen on the training examples
    assert prepared.layer_choice["layer"] == 3 and prepared.layer_choice["reason"] == "planted"
    assert isinstance(prepared.layer_choice["seconds"], float)  # its time, which a race counts as training time
    params = dict(prepared.model.named_parameters())
    assert sorted(id(params[n]) for n in prepared.scope.names) == layer_tensors(prepared.model, 3)
    assert all(n.startswith("model.layers.3.") for n in prepared.scope.names)
    assert {n for n, p in params.items() if p.requires_grad} == set(prepared.scope.names)
    assert prepared.scope.tuned == sum(p.numel() for p in decoder_layers(prepared.model)[3].parameters())


def test_a_recorded_choice_is_reused_without_choosing_again(stories_path, monkeypatch):
    """Resume and replay pass the layer run.json recorded: the same tensors, and no probe or sensitivity run."""
    monkeypatch.setattr(prepare, "choose_dominant_layer", lambda *a, **k: pytest.fail("chose the layer again"))
    prepared = prepare_model(TrainConfig(model=stories_path, scope="dominant"), TEXTS,
                             layer_choice={"layer": 1, "reason": "recorded"})
    params = dict(prepared.model.named_parameters())
    assert sorted(id(params[n]) for n in prepared.scope.names) == layer_tensors(prepared.model, 1)
    assert prepared.layer_choice == {"layer": 1, "reason": "recorded"}


def test_dominant_lora_puts_the_adapters_on_the_chosen_layer_only(stories_path, monkeypatch):
    plant_choice(monkeypatch, 2)
    prepared = prepare_model(TrainConfig(model=stories_path, scope="dominant-lora", lora_r=4), TEXTS)
    names = prepared.scope.names
    adapters = [n for n, _ in prepared.model.named_parameters() if "lora_" in n]
    assert names == adapters and names and all(".layers.2." in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    params = dict(prepared.model.named_parameters())
    assert all(params[n].shape[0] == 4 for n in names if "lora_A" in n)  # --lora-r
    assert {n for n, p in params.items() if p.requires_grad} == set(names)


def test_lora_adapters_are_rebuilt_alike_from_the_run_seed(stories_path):
    """LoRA's A is random: replay and resume rebuild the run's adapters from its seed, another seed others."""
    def adapters(seed):
        prepared = prepare_model(TrainConfig(model=stories_path, scope="lora", seed=seed), TEXTS)
        return {n: p.detach().clone() for n, p in prepared.model.named_parameters() if "lora_A" in n}

    torch.manual_seed(99)  # the global generator's state does not enter
    first = adapters(3)
    torch.randn(10)
    again, other = adapters(3), adapters(4)
    assert first and all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)


def test_the_zo_optimizer_steps_the_models_own_tensors_in_scope_order(stories_path):
    config = TrainConfig(model=stories_path, scope="layers:0,4", params="mlp", lr=0.5, eps=0.25, q=3, seed=11)
    prepared = prepare_model(config, TEXTS)
    zo = make_zo_optimizer(prepared)
    params = dict(prepared.model.named_parameters())
    assert [n for n, _ in zo.named] == prepared.scope.names
    assert all(p is params[n] for n, p in zo.named)  # the model's parameters, not copies
    assert {n.split(".")[2] for n in prepared.scope.names} == {"0", "4"}
    assert all(".mlp." in n for n in prepared.scope.names)
    assert (zo.lr, zo.eps, zo.q) == (0.5, 0.25, 3)


def test_load_into_copies_by_name_and_keeps_the_models_dtype(stories_path):
    prepared = prepare_model(TrainConfig(model=stories_path, scope="layer:1"), TEXTS)
    name = prepared.scope.names[0]
    param = dict(prepared.model.named_parameters())[name]
    value = torch.full(param.shape, 0.125, dtype=torch.float64)
    load_into(prepared.model, {name: value})
    assert param.dtype == torch.float32 and torch.equal(param.detach(), value.float())
