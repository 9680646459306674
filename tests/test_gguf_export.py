"""GGUF export: a tuned model written back as GGUF reads back (transformers' own GGUF loader) to the same logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model
from dlzo.errors import DlzoError
from dlzo.model.gguf_export import _llama_permute, write_gguf


def _tiny_base_gguf(model, path: Path, architecture: str) -> Path:
    """A base GGUF of a tiny random model, written the way llama.cpp's converter writes one (hyperparameters,
    f32 tensors, llama's q/k rows permuted), without a tokenizer: transformers loads the model from it."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    config = model.config
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"] if hasattr(config, "rope_parameters")
                              else config.rope_theta)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    state = model.state_dict()
    for gguf_name, hf_name in get_gguf_hf_weights_map(model, TensorProcessor(), model_type=architecture).items():
        if hf_name not in state or (gguf_name == "output.weight" and config.tie_word_embeddings):
            continue
        array = state[hf_name].numpy()
        if architecture == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = config.num_key_value_heads if ".attn_k." in gguf_name else config.num_attention_heads
            array = _llama_permute(array, config.num_attention_heads, heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_export_reads_back_to_the_tuned_logits(tmp_path, architecture):
    from transformers import AutoModelForCausalLM

    base = tiny_model(architecture, layers=2, seed=1)
    base_file = _tiny_base_gguf(base, tmp_path / "base.gguf", architecture)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="base.gguf", dtype=torch.float32).eval()
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_logits(tuned, ids), _logits(base, ids), atol=1e-5)  # the base file itself is right
    with torch.no_grad():  # "tuning": every tensor of layer 1 moves, q and k included (their rows are permuted)
        for param in tuned.model.layers[1].parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    for kind, tolerance in (("f32", 1e-5), ("f16", 2e-3)):
        out = write_gguf(tuned, base_file, tmp_path / f"tuned-{kind}.gguf", kind)
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
        difference = (_logits(back, ids) - _logits(tuned, ids)).abs().max().item()
        assert difference <= tolerance, (kind, difference)
    assert not (tmp_path / "tuned-f16.gguf.partial").exists()


def test_llama_permutation_is_the_inverse_of_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.arange(8 * 4 * 6, dtype=np.float32).reshape(8 * 4, 6)
    back = LlamaTensorProcessor()._reverse_permute_weights(_llama_permute(weights, 8, 2), 8, 2)
    assert np.array_equal(back, weights) and not np.array_equal(_llama_permute(weights, 8, 2), weights)


def test_bad_type_and_foreign_file_are_one_line(tmp_path):
    model = tiny_model("llama", layers=2)
    with pytest.raises(DlzoError, match="--gguf-type 'q3'"):
        write_gguf(model, tmp_path / "none.gguf", tmp_path / "out.gguf", "q3")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(DlzoError, match="cannot read GGUF file"):
        write_gguf(model, tmp_path / "junk.gguf", tmp_path / "out.gguf", "f16")
    assert not (tmp_path / "out.gguf").exists()
