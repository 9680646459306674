"""Shared fixtures: tiny random-init models of several architectures and the real assets in ../shared."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from dlzo.training.config import TrainConfig
from dlzo.training.loop import Session, train
from dlzo.training.replay import replay

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = SHARED / "data"


def tiny_config(arch: str, layers: int = 4, vocab: int = 512):
    """A few-thousand-parameter config of the named architecture (random weights, built in the test)."""
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, head_dim=8,
                              num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
                            word_embed_proj_dim=32, max_position_embeddings=256, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=256, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, head_dim=8,
                               num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "phi3":
        return tf.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, **common)
    if arch == "falcon":
        return tf.FalconConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, **common)
    if arch == "phi":
        return tf.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "gemma":
        return tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, head_dim=8,
                              num_attention_heads=4, num_key_value_heads=2, **common)
    raise ValueError(arch)


def tiny_model(arch: str, layers: int = 4, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers))
    model.config.use_cache = False
    return model.eval()


@pytest.fixture(scope="session")
def stories_tokenizer():
    from dlzo.model.loading import load_tokenizer

    return load_tokenizer(str(STORIES))


@pytest.fixture(scope="session")
def stories_path() -> str:
    if not STORIES.exists():
        pytest.skip("../shared/models/stories260K is not beside the checkout")
    return str(STORIES)


def assert_replay_and_resume_exact(tmp_path: Path, options: dict, stops: list[int]) -> tuple[dict, Path]:
    """Train `options` uninterrupted into tmp_path/whole and check that `dlzo replay` rebuilds its tensors bit
    for bit; train it again into tmp_path/stopped, stopped after each step count in `stops` and resumed each
    time (the last stop's final.safetensors and results.json removed, so the resumed run must write them), and
    check that it ends with the same tensors. Returns (the uninterrupted run's tensors, the stopped folder)."""
    train(TrainConfig(**options, out=str(tmp_path / "whole")))
    whole = load_file(tmp_path / "whole" / "final.safetensors")
    rebuilt = replay(tmp_path / "whole")
    assert all(torch.equal(rebuilt[n], whole[n]) for n in whole)
    stopped = tmp_path / "stopped"
    trained: list[int] = []  # the steps each call trains: a resume that started again from 0 ends the same
    original = Session.train_step

    def counting(self, step, lr):
        trained.append(step)
        return original(self, step, lr)
    with mock.patch.object(Session, "train_step", counting):
        for i, (start, steps) in enumerate(zip([0, *stops], [*stops, options["steps"]])):
            if i == len(stops):  # the last stop's final files go, so the resumed run must write them
                for name in ("final.safetensors", "results.json"):
                    (stopped / name).unlink()
            resume = {"resume": str(stopped)} if i else {}
            trained.clear()
            train(TrainConfig(**{**options, "steps": steps}, out=str(stopped), **resume))
            assert trained == list(range(start, steps)), f"call {i} trained steps {trained}, not {start}..{steps - 1}"
    resumed = load_file(stopped / "final.safetensors")
    assert all(torch.equal(resumed[n], whole[n]) for n in whole)
    return whole, stopped
