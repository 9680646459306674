import json
import os

import pytest
import torch

from dlzo.model.checkpoint import atomic_write_json, atomic_write_text, load_tensors, save_tensors


def test_tensors_round_trip_as_safetensors(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2, dtype=torch.bfloat16)}
    save_tensors(tmp_path / "x.safetensors", tensors, metadata={"step": "7"})
    loaded = load_tensors(tmp_path / "x.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    header_length = int.from_bytes((tmp_path / "x.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "x.safetensors").read_bytes()[8 : 8 + header_length])
    assert header["__metadata__"] == {"step": "7"}  # a safetensors header, not a pickle


def test_a_crash_while_writing_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "best.safetensors"
    save_tensors(path, {"w": torch.ones(4)})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped between writing and renaming

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_tensors(path, {"w": torch.zeros(4)})
    assert torch.equal(load_tensors(path)["w"], torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]  # no staging file left behind


def test_atomic_text_and_json_create_folders_and_replace(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.txt", "one")
    atomic_write_text(tmp_path / "a" / "b.txt", "two")
    atomic_write_json(tmp_path / "a" / "c.json", {"x": [1, 2]})
    assert (tmp_path / "a" / "b.txt").read_text() == "two"
    assert json.loads((tmp_path / "a" / "c.json").read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.txt", "c.json"]
