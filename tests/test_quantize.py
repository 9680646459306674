"""--quantize int8|int4 (dlzo.model.quantize, dlzo.model.quantized_load): the tuned layer stays in float with the
checkpoint's own values and every other linear but the LM head is quantized; the quantized model's logits stay
near the float model's; a ZO run on it replays and resumes bit for bit; `dlzo eval --run` rebuilds the same
quantized model; the prefix cache on top gives the uncached losses; bad values are one line."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_hf_trainer import make_trainer
from torch import nn
from transformers import AutoModelForCausalLM

import dlzo
from conftest import DATA, SMOLLM2, STORIES, assert_replay_and_resume_exact, small_run, tiny_model
from dlzo.cli.main import main
from dlzo.engine.scope import parse_scope, select
from dlzo.model.loading import load_model, load_tokenizer
from dlzo.model.quantize import (
    dequantized_weight,
    frozen_linears,
    is_quantized,
    logical_parameters,
    quantize_frozen,
    quantized_bytes,
    weight_bytes,
)
from dlzo.model.quantized_load import layer_in_float, load_quantized, random_quantized
from dlzo.training.config import TrainConfig
from dlzo.training.export import export
from dlzo.training.loop import train
from dlzo.training.prepare import tuned_in_float

MODES = ["int8", "int4"]


@pytest.mark.parametrize("mode", MODES)
def test_the_tuned_layer_stays_float_and_every_other_linear_is_quantized(tmp_path, mode):
    """A tiny Llama saved as safetensors, loaded tensor by tensor with --quantize, layer 1 tuned: its linears are
    plain float32 layers holding the checkpoint's exact values and requiring gradients; every other decoder
    linear is quantized and frozen; the LM head stays float; the scope is the float model's, counted unpacked."""
    float_model = tiny_model("llama", layers=3)
    float_model.save_pretrained(tmp_path / "m")
    model = load_quantized(str(tmp_path / "m"), mode, dtype="float32", device="cpu")
    spec = parse_scope("layer:1")
    scope = tuned_in_float(model, select(model, spec, [1]), lambda: select(model, spec, [1]))
    expected = select(float_model, spec, [1])
    assert scope.names == expected.names and scope.total == expected.total == logical_parameters(float_model)
    float_params = dict(float_model.named_parameters())
    quantized = 0
    for name, module in model.named_modules():
        if name.startswith("model.layers.1.") and isinstance(module, nn.Linear):
            assert type(module) is nn.Linear and module.weight.dtype == torch.float32
            assert module.weight.requires_grad and torch.equal(module.weight, float_params[f"{name}.weight"])
        elif isinstance(module, nn.Linear) and name != "lm_head":
            assert is_quantized(module) and not module.weight.requires_grad
            quantized += 1
    assert quantized == 2 * 7 and type(model.lm_head) is nn.Linear
    assert torch.equal(model.model.embed_tokens.weight, float_params["model.embed_tokens.weight"])


@pytest.mark.parametrize("mode, tolerance", [("int8", 0.02), ("int4", 0.4)])
def test_the_quantized_models_logits_are_close_to_the_float_models(mode, tolerance):
    """Every linear but layer 2's and the head quantized (a tiny random Llama): the logits move by less than
    `tolerance` of their spread (measured: int8 0.4%, int4 26%: 4 bits a weight in layers 32 wide), and
    int4 is weight-only: a float model holding the dequantized weights gives the quantized model's logits to
    float rounding."""
    model, reference = tiny_model("llama"), tiny_model("llama")
    ids = torch.randint(3, 500, (4, 24), generator=torch.Generator().manual_seed(0))
    tuned = [n for n, _ in model.named_parameters() if n.startswith("model.layers.2.")]
    names = quantize_frozen(model, tuned, mode)
    assert len(names) == 3 * 7 and names == frozen_linears(reference, tuned)
    with torch.no_grad():
        quantized, exact = model(input_ids=ids).logits, reference(input_ids=ids).logits
    spread = (exact - exact.mean(-1, keepdim=True)).norm()
    assert 0 < (quantized - exact).norm() < tolerance * spread
    if mode == "int4":
        for name in names:
            reference.get_submodule(name).weight.data = dequantized_weight(model.get_submodule(name), torch.float32)
        with torch.no_grad():
            assert torch.allclose(quantized, reference(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows, inputs", [(1536, 576), (192, 576), (172, 64)])
def test_quantized_bytes_is_what_a_layer_holds(mode, rows, inputs):
    """The layout `dlzo plan` counts (quantized_bytes) is what a quantized layer holds, byte for byte, also for
    weights whose blocks do not fill QLoRA's 256-block scales (SmolLM2's k_proj, 192 x 576; stories260K's
    MLP, 172 x 64); and the layer computes with what it holds."""
    module = nn.Sequential(nn.Linear(inputs, rows, bias=False))
    original = module[0].weight.detach().clone()
    quantize_frozen(module, [], mode)
    assert weight_bytes(module[0]) == quantized_bytes(rows, inputs, mode)
    assert weight_bytes(module[0]) < rows * inputs * (1.1 if mode == "int8" else 0.6)
    error = dequantized_weight(module[0], torch.float32) - original
    assert 0 < error.norm() < (0.01 if mode == "int8" else 0.15) * original.norm()


def test_a_random_shape_is_made_quantized_layer_by_layer():
    """dlzo bench --shape with --quantize: the model is made with its linears quantized but layer 1's."""
    from conftest import tiny_config

    model = random_quantized(tiny_config("llama"), torch.float32, torch.device("cpu"), "int4", 1)
    kinds = {name: is_quantized(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert not any(v for n, v in kinds.items() if n.startswith("model.layers.1.") or n == "lm_head")
    assert sum(kinds.values()) == 3 * 7
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.requires_shared
@pytest.mark.slow
def test_a_quantized_zo_run_replays_and_resumes_exactly(tmp_path):
    assert_replay_and_resume_exact(tmp_path, small_run(quantize="int8", scope="layer:2", steps=6, eval_every=3),
                                   stops=[3])


@pytest.mark.requires_shared
@pytest.mark.slow
def test_eval_of_a_quantized_run_rebuilds_the_quantized_model_and_export_merges_into_the_base(tmp_path, capsys):
    """`dlzo eval --run` of an int4 run scores the run's test examples with the same quantized model (the
    accuracy the run reported; the log says the layers were quantized); `dlzo export` merges the tuned layer
    into the base model's full-precision layers."""
    results = train(TrainConfig(**small_run(quantize="int4", scope="layer:2", steps=4, eval_every=2),
                                out=str(tmp_path / "run")))
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "eval")]) == 0
    assert "--quantize int4: 35 linear layers held in 4-bit NF4" in capsys.readouterr().out
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["value"] == results["test_value"]
    # the merged export is a plain model: the tuned layer from the checkpoint, the frozen ones the base model's
    export(tmp_path / "run", tmp_path / "merged")
    assert "the export holds them in full precision" in capsys.readouterr().out
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(STORIES).named_parameters())
    tuned = load_file(tmp_path / "run" / "best.safetensors")
    assert tuned and all(torch.equal(merged[n], t) for n, t in tuned.items())
    assert all(torch.equal(merged[n], base[n]) for n in base if n not in tuned)


@pytest.mark.requires_shared
@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_the_prefix_cache_on_a_quantized_model_gives_the_uncached_losses(tmp_path, mode):
    """Weight-only quantization keeps a sequence's output independent of its batch: the cache, filled from
    other batches, gives the uncached run's dev loss and projected gradients (to float rounding, as in float)."""
    def run(name, **extra):
        options = dict(model=str(STORIES), task="copa", data_dir=str(DATA), scope="layer:2", steps=8, lr=1e-3,
                       batch_size=4, num_train=16, num_dev=8, num_test=4, eval_every=4, quiet=True,
                       quantize=mode, out=str(tmp_path / name), **extra)
        return train(TrainConfig(**options))

    cached, uncached = run("cached"), run("uncached", prefix_cache_mb=0)
    assert cached["dev_loss_best"] == pytest.approx(uncached["dev_loss_best"], abs=1e-4)
    grads = [[json.loads(line)["grads"][0] for line in (tmp_path / name / "trajectory.jsonl").read_text().splitlines()]
             for name in ("cached", "uncached")]
    assert grads[0] == pytest.approx(grads[1], rel=1e-2, abs=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["train", "--quantize", "int3"], "argument --quantize: invalid choice: 'int3' (choose from 'none', 'int8', 'int4')"),
    (["train", "--quantize", "int8", "--scope", "full"], "--quantize int8: --scope full tunes every weight"),
    (["train", "--quantize", "int4", "--optimizer", "adamw", "--scope", "full"],
     "--quantize int4: --optimizer adamw --scope full tunes every weight, none is frozen"),
    (["train", "--quantize", "int8", "--device", "mps"], "--quantize int8: torchao's weight-only int8 runs on cpu and cuda"),
    (["bench", "--quantize", "int8", "--variants", "layer_cached,full"], "--quantize int8: variant full tunes"),
    (["bench", "--quantize", "int2"], "argument --quantize: invalid choice: 'int2'"),
])
def test_bad_quantize_values_are_one_line_before_any_work(tmp_path, argv, message, capsys):
    model = [] if argv[0] == "bench" else ["--model", str(STORIES), "--task", "sst2", "--data-dir", str(DATA)]
    assert main([*argv, *model, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.requires_shared
def test_the_zo_trainer_quantizes_the_frozen_layers(tmp_path):
    """ZOArguments(quantize="int8"): dlzo.ZOTrainer quantizes every linear outside its layer and trains it."""
    trainer = make_trainer(str(STORIES), tmp_path / "out", zo=dlzo.ZOArguments(scope="layer:2", quantize="int8"))
    linears = {n: m for n, m in trainer.model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert all(is_quantized(m) != n.startswith("model.layers.2.") for n, m in linears.items())
    before = trainer.model.model.layers[2].mlp.up_proj.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.model.model.layers[2].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="--scope full tunes every weight"):
        dlzo.ZOArguments(scope="full", quantize="int4")


def is_quantized_weight(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "qdata")


@pytest.mark.slow
def test_a_gguf_is_read_tensor_by_tensor_with_the_values_of_the_float_conversion(tmp_path, monkeypatch):
    """Without the float32 conversion in the cache --quantize reads SmolLM2's GGUF straight, never converting it
    (an empty cache stays empty): the tensors it keeps in float (embedding, norms, the tuned layer read back)
    are the conversion's exactly, its int8 weights those quantized from the cached conversion, and the
    tokenizer read from the file encodes as the converted one."""
    if not SMOLLM2.exists():
        pytest.skip("../shared SmolLM2 GGUF not present")
    float_model, float_tokenizer = load_model(str(SMOLLM2), dtype="float32"), load_tokenizer(str(SMOLLM2))
    from_conversion = load_quantized(str(SMOLLM2), "int8", dtype="float32", device="cpu")  # the cache's safetensors
    monkeypatch.setenv("DLZO_CACHE", str(tmp_path / "cache"))
    model = load_quantized(str(SMOLLM2), "int8", dtype="float32", device="cpu")
    assert all(torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
               for a, b in zip(model.parameters(), from_conversion.parameters()) if is_quantized_weight(a))
    tokenizer = load_tokenizer(str(SMOLLM2), convert_gguf=False)
    layer_in_float(model, 11)
    assert not (tmp_path / "cache").exists()
    expected = dict(float_model.named_parameters())
    kept = {n: p for n, p in model.named_parameters() if not is_quantized(model.get_submodule(n.rpartition(".")[0]))}
    assert {n for n in kept if ".layers.11." in n} == {n for n in expected if ".layers.11." in n}
    assert all(torch.equal(p, expected[n]) for n, p in kept.items())
    text = "The movie was great, and the popcorn was fine. It was"
    assert tokenizer(text)["input_ids"] == float_tokenizer(text)["input_ids"]


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_quantized_layers_run_on_cuda_as_on_the_cpu(tmp_path, mode):
    """On a GPU: the model read tensor by tensor onto CUDA in bfloat16, quantized there, gives the CPU's
    quantized logits (to bfloat16 rounding); its quantized weights are on the GPU."""
    tiny_model("llama").save_pretrained(tmp_path / "m")
    on_gpu = load_quantized(str(tmp_path / "m"), mode, dtype="bfloat16", device="cuda")
    on_cpu = load_quantized(str(tmp_path / "m"), mode, dtype="bfloat16", device="cpu")
    assert all(p.device.type == "cuda" for p in on_gpu.parameters())
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gpu, cpu = on_gpu(input_ids=ids.cuda()).logits.float().cpu(), on_cpu(input_ids=ids).logits.float()
    assert (gpu - cpu).norm() < 0.02 * cpu.norm()
