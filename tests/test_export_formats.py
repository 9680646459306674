"""`dlzo export --dtype` and `dlzo export --gguf`: a tuned model leaves dlzo in the forms its users run models in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import SMOLLM2, flags, small_run
from dlzo.cli.main import main

pytestmark = pytest.mark.requires_shared


@pytest.fixture(scope="module")
def stories_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", *flags(small_run(steps=2, eval_every=0, scope="layer:1")), "--out", str(run)]) == 0
    return run


def _dtypes(folder: Path) -> set[str]:
    found = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            found |= {str(handle.get_slice(name).get_dtype()) for name in handle.keys()}
    return found


@pytest.mark.parametrize("dtype, stored", [("bfloat16", "BF16"), ("float16", "F16")])
def test_export_dtype_writes_a_folder_of_that_dtype_with_the_tuned_values(stories_run, tmp_path, dtype, stored):
    from transformers import AutoModelForCausalLM

    assert main(["export", "--run", str(stories_run), "--to", str(tmp_path / "out"), "--dtype", dtype,
                 "--checkpoint", "final"]) == 0
    assert _dtypes(tmp_path / "out") == {stored}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype
    assert main(["export", "--run", str(stories_run), "--to", str(tmp_path / "f32"), "--checkpoint", "final"]) == 0
    low = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype=torch.float32)
    tuned = full.model.layers[1].mlp.down_proj.weight
    assert torch.equal(low.model.layers[1].mlp.down_proj.weight, tuned.to(getattr(torch, dtype)))


@pytest.mark.parametrize("argv, message", [
    (["--to", "X", "--gguf", "y.gguf"], "give one of --to"),
    ([], "give one of --to"),
    (["--gguf", "y.bin"], "must end in .gguf"),
    (["--gguf", "y.gguf", "--gguf-type", "q4"], "--gguf-type: invalid choice: 'q4'"),
    (["--to", "X", "--dtype", "int8"], "--dtype 'int8'"),
    (["--gguf", "y.gguf", "--dtype", "float16"], "--adapter and --dtype are for --to"),
])
def test_bad_export_flags_are_one_line(stories_run, tmp_path, capsys, argv, message):
    assert main(["export", "--run", str(stories_run), *[a.replace("X", str(tmp_path / "x")) for a in argv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x").exists()


def test_gguf_export_of_a_hugging_face_base_says_how_to_convert(stories_run, tmp_path, capsys):
    assert main(["export", "--run", str(stories_run), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "convert_hf_to_gguf" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_gguf_export_of_a_smollm2_run_reads_back_with_its_tuned_layer_and_tokenizer(tmp_path):
    """The real file, through the commands: a run on layer 11, exported as f16 and q8_0, read back by transformers'
    GGUF loader: the tuned tensor as written, logits within each type's rounding (measured 0.03 and 0.5 on
    logits of magnitude 26; argmax identical), tokenizer and chat template carried over."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlzo.model.loading import load_model
    from dlzo.training.run_model import load_checkpoint_of_run

    run = tmp_path / "run"
    assert main(["train", *flags(small_run(model=str(SMOLLM2), steps=2, eval_every=0, scope="layer:11",
                                           num_train=8, num_dev=4, num_test=4)), "--out", str(run)]) == 0
    loaded = load_checkpoint_of_run(run, "final")
    tuned, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer("The movie was great, and the", return_tensors="pt").input_ids
    with torch.no_grad():
        reference = tuned(ids).logits
    name = "model.layers.11.mlp.down_proj.weight"
    for kind, tolerance in (("f16", 0.1), ("q8_0", 1.5)):
        assert main(["export", "--run", str(run), "--gguf", str(tmp_path / f"tuned-{kind}.gguf"), "--checkpoint",
                     "final", "--gguf-type", kind]) == 0
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"tuned-{kind}.gguf", dtype=torch.float32)
        with torch.no_grad():
            got = back(ids).logits
        assert (got - reference).abs().max().item() <= tolerance
        assert torch.equal(got.argmax(-1), reference.argmax(-1))
        if kind == "f16":  # the tuned values as written (q8_0 rounds them in blocks)
            written, trained = dict(back.named_parameters())[name], dict(tuned.named_parameters())[name]
            assert torch.allclose(written, trained.to(torch.float16).float())
            back_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=f"tuned-{kind}.gguf")
            assert back_tokenizer("hello world").input_ids == tokenizer("hello world").input_ids
            assert back_tokenizer.chat_template == tokenizer.chat_template
    base = dict(load_model(str(SMOLLM2), dtype="float32", device="cpu").named_parameters())[name]
    assert not torch.equal(dict(tuned.named_parameters())[name], base)  # the run did move layer 11


@pytest.mark.slow
def test_llama_cpp_loads_and_generates_from_an_exported_smollm2_run(tmp_path):
    """What GGUF users run: llama.cpp (llama-cpp-python, an optional install: `pip install llama-cpp-python`)
    loads the exported q8_0 file of a tuned run and its greedy next token is the tuned model's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from dlzo.training.run_model import load_checkpoint_of_run

    run = tmp_path / "run"
    assert main(["train", *flags(small_run(model=str(SMOLLM2), steps=2, eval_every=0, scope="layer:11",
                                           num_train=8, num_dev=4, num_test=4)), "--out", str(run)]) == 0
    out = tmp_path / "tuned.gguf"
    assert main(["export", "--run", str(run), "--gguf", str(out), "--checkpoint", "final", "--gguf-type", "q8_0"]) == 0
    loaded = load_checkpoint_of_run(run, "final")
    text = "The capital of France is"
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = loaded.model(ids).logits[0, -1].argmax().item()
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_threads=2, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids[0].tolist()  # the same tokenizer
    first = next(iter(llm.generate(ids[0].tolist(), temp=0.0)))  # greedy, from the same token ids
    assert first == expected
    assert llm.create_completion(text, max_tokens=8, temperature=0.0)["choices"][0]["text"].strip()
