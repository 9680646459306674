import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from dlzo.errors import DlzoError
from dlzo.model.loading import (
    decoder_layers,
    decoder_layers_with_path,
    load_model,
    resolve_device,
    resolve_model_source,
)

ALL_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "opt", "gpt2", "gpt_neox", "falcon"]


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_decoder_layers_found_generically(arch):
    model = tiny_model(arch, layers=3)
    layers = decoder_layers(model)
    assert len(layers) == 3
    assert len({type(layer) for layer in layers}) == 1
    assert "Layer" in type(layers[0]).__name__ or "Block" in type(layers[0]).__name__


def test_decoder_layers_through_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    path, layers = decoder_layers_with_path(model)
    assert len(layers) == 4 and path.endswith("layers")


def test_model_without_decoder_blocks_gets_clear_error():
    with pytest.raises(DlzoError, match="cannot find the decoder layers"):
        decoder_layers(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("arch", ["qwen3", "opt", "gpt2"])
def test_load_model_from_local_folder(arch, tmp_path):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ids = torch.randint(3, 500, (1, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.dtype == torch.float32 and not loaded.training


@pytest.mark.slow
def test_missing_hub_model_offline_is_one_line_exit_2(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "dlzo", "probe", "--model", "nobody/no-such-model", "--out",
                          str(tmp_path)], capture_output=True, text=True, env=env)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "nobody/no-such-model" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_gpu_this_machine_lacks_is_one_line():
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last visible GPU, on any machine
    with pytest.raises(DlzoError, match=f"--device {missing}: no such CUDA device here"):
        resolve_device(missing)
    assert resolve_device("cpu") == torch.device("cpu")


def test_missing_local_path_is_an_error():
    with pytest.raises(DlzoError, match="not found"):
        resolve_model_source("./no/such/folder")
