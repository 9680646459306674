import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import STORIES, assert_replay_and_resume_exact, flags, small_run, tiny_model
from dlzo.cli.main import main
from dlzo.errors import DlzoError
from dlzo.training.config import TrainConfig
from dlzo.training.loop import train
from dlzo.training.replay import replay
from dlzo.training.step import batch_indices

pytestmark = pytest.mark.requires_shared

SMALL = small_run(eps=1e-3)


def test_train_end_to_end_writes_run_folder(tmp_path):
    results = train(TrainConfig(**SMALL, out=str(tmp_path), steps=6, eval_every=3, scope="layer:2"))
    for name in ("run.json", "metrics.jsonl", "trajectory.jsonl", "best.safetensors", "last.safetensors",
                 "final.safetensors", "results.json"):
        assert (tmp_path / name).exists(), name
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"]["lr"] == 1e-3 and run["versions"]["torch"] and run["perturbation"] == "functional"
    final = load_file(tmp_path / "final.safetensors")
    assert all(".layers.2." in name for name in final)  # only the tuned layer is stored
    assert results["test_metric"] == "accuracy" and 0 <= results["test_value"] <= 1
    assert len((tmp_path / "trajectory.jsonl").read_text().splitlines()) == 6


def test_dominant_scope_falls_back_to_sensitivity_on_stories(tmp_path, capsys):
    train(TrainConfig(**SMALL, out=str(tmp_path), steps=1, eval_every=0, scope="dominant", rule="sun"))
    choice = json.loads((tmp_path / "run.json").read_text())["layer_choice"]
    assert "no massive activations" in choice["reason"] and 0 <= choice["layer"] < 5
    assert "fell back to the most perturbation-sensitive layer" in capsys.readouterr().out


@pytest.mark.parametrize("scope,fast", [("layer:1", True), ("full", False), ("lora", True)])
def test_replay_rebuilds_weights_bit_exactly(tmp_path, scope, fast):
    train(TrainConfig(**SMALL, out=str(tmp_path), steps=5, eval_every=0, scope=scope, fast_path=fast))
    trained = load_file(tmp_path / "final.safetensors")
    rebuilt = replay(tmp_path)
    assert set(rebuilt) == set(trained)
    assert all(torch.equal(rebuilt[n], trained[n]) for n in trained)


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(tmp_path):
    steps = 16
    reference = tmp_path / "reference"
    train(TrainConfig(**SMALL, out=str(reference), steps=steps, eval_every=4, scope="layer:1"))
    interrupted = tmp_path / "interrupted"
    options = dict(SMALL, out=str(interrupted), steps=steps, eval_every=4, scope="layer:1")
    args = [sys.executable, "-m", "dlzo", "train", *flags(options)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = 6 + int(time.time()) % 5  # a step between the checkpoints at 4 and 8 .. 12
    trajectory = interrupted / "trajectory.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if trajectory.exists() and len(trajectory.read_text().splitlines()) >= kill_after:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert not (interrupted / "final.safetensors").exists(), "the run finished before it was killed"
    done = subprocess.run([*args, "--resume", str(interrupted)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = load_file(reference / "final.safetensors"), load_file(interrupted / "final.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)
    lines = [json.loads(x) for x in trajectory.read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(steps))


def test_resume_with_different_arguments_is_refused(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path), steps=2, eval_every=0, scope="layer:1"))
    with pytest.raises(DlzoError, match="--lr was 0.001"):
        train(TrainConfig(**{**SMALL, "lr": 1e-2}, out=str(tmp_path), steps=4, scope="layer:1", resume=str(tmp_path)))


def test_resume_with_fewer_steps_than_logged_is_refused(tmp_path):
    """A constant-rate run may be extended on resume, but not cut below the steps it has logged: the resume
    re-applied them all and results.json called the weights of step 4 those of step 2."""
    train(TrainConfig(**SMALL, out=str(tmp_path), steps=4, eval_every=0, scope="layer:1"))
    with pytest.raises(DlzoError, match="--steps 2 is below the 4 steps that run has already logged"):
        train(TrainConfig(**SMALL, out=str(tmp_path), steps=2, eval_every=0, scope="layer:1", resume=str(tmp_path)))


def test_existing_run_folder_is_not_overwritten(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path), steps=1, eval_every=0, scope="layer:1"))
    with pytest.raises(DlzoError, match="already holds a run"):
        train(TrainConfig(**SMALL, out=str(tmp_path), steps=1, eval_every=0, scope="layer:1"))


def test_gradient_accumulation_uses_one_direction(tmp_path, monkeypatch):
    """Each step of --grad-accum 2 evaluates two micro-batches of 2 under the same direction: the halves'
    mean equals the 4-row batch's loss only if both saw the same z (another z per micro-batch would not)."""
    import dlzo.training.loop as training_module
    sizes, original = [], training_module.step_batches

    def recording(*args, **kwargs):
        batches = original(*args, **kwargs)
        sizes.append([b.num_examples for b in batches])
        return batches
    monkeypatch.setattr(training_module, "step_batches", recording)
    train(TrainConfig(**SMALL, out=str(tmp_path / "one"), steps=3, eval_every=0, scope="layer:1"))
    assert sizes[-3:] == [[4]] * 3
    train(TrainConfig(**SMALL, out=str(tmp_path / "two"), steps=3, eval_every=0, scope="layer:1", grad_accum=2))
    assert sizes[-3:] == [[2, 2]] * 3
    one = [json.loads(x) for x in (tmp_path / "one" / "trajectory.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "trajectory.jsonl").read_text().splitlines()]
    assert [x["seeds"] for x in one] == [x["seeds"] for x in two]
    for a, b in zip(one, two):  # CE means over 2x2 equal halves equal the mean over 4
        assert a["grads"][0] == pytest.approx(b["grads"][0], rel=1e-3, abs=1e-3)


def test_multiple_directions_are_logged(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path), steps=2, eval_every=0, scope="layer:1", q=3))
    entry = json.loads((tmp_path / "trajectory.jsonl").read_text().splitlines()[0])
    assert len(entry["seeds"]) == 3 and len(set(entry["seeds"])) == 3


def test_non_finite_guard_stops_with_remedy(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan-model")
    import shutil

    from conftest import STORIES as stories

    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(stories / name, tmp_path / "nan-model" / name)
    config = TrainConfig(**{**SMALL, "model": str(tmp_path / "nan-model")}, out=str(tmp_path / "run"), steps=20,
                         eval_every=0, scope="layer:1", max_nonfinite=3)
    with pytest.raises(DlzoError, match="3 non-finite losses in a row at step 2.*float16"):
        train(config)


def test_adamw_baseline_changes_only_the_scope(tmp_path):
    results = train(TrainConfig(**SMALL, out=str(tmp_path), steps=3, eval_every=0, scope="layer:3", optimizer="adamw"))
    final = load_file(tmp_path / "final.safetensors")
    assert all(".layers.3." in n for n in final) and results["optimizer"] == "adamw"


def test_adamw_with_gradient_checkpointing_trains_the_same_weights_and_keeps_the_option(tmp_path, capsys,
                                                                                        monkeypatch):
    """--gradient-checkpointing recomputes activations in the backward: transformers' checkpoint runs each layer
    from the tuned one up (2, 3 and 4 of 5) at each step, the same weights after AdamW steps of a layer scope,
    the option in run.json, kept by --resume (whose recorded options are the defaults), and with --optimizer zo
    one line naming the flag."""
    import transformers.modeling_utils

    calls, real = [], transformers.modeling_utils.checkpoint
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    options = dict(**SMALL, steps=2, eval_every=0, scope="layer:2", optimizer="adamw")
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    train(TrainConfig(**options, out=str(plain)))
    assert calls == []
    train(TrainConfig(**options, out=str(checkpointed), gradient_checkpointing=True))
    assert len(calls) == 2 * 3  # two steps of one micro-batch; the evaluations run without gradients
    a, b = load_file(plain / "final.safetensors"), load_file(checkpointed / "final.safetensors")
    assert set(a) == set(b) and all(".layers.2." in n for n in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1.3e-6, atol=1e-5)
    assert json.loads((checkpointed / "run.json").read_text())["config"]["gradient_checkpointing"] is True
    assert json.loads((plain / "run.json").read_text())["config"]["gradient_checkpointing"] is False

    assert main(["train", "--resume", str(checkpointed), "--no-gradient-checkpointing"]) == 2
    assert "--gradient-checkpointing was True in that run, now False" in capsys.readouterr().err
    for name in ("last.safetensors", "final.safetensors", "results.json"):
        (checkpointed / name).unlink()  # as if killed before its first save: the resume starts clean
    assert main(["train", "--resume", str(checkpointed)]) == 0
    assert json.loads((checkpointed / "run.json").read_text())["config"]["gradient_checkpointing"] is True
    b = load_file(checkpointed / "final.safetensors")
    assert all(torch.allclose(b[name], a[name], rtol=1.3e-6, atol=1e-5) for name in a)

    capsys.readouterr()
    zo = flags({k: v for k, v in options.items() if k != "optimizer"})
    assert main(["train", *zo, "--out", str(tmp_path / "zo"), "--gradient-checkpointing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--gradient-checkpointing needs --optimizer adamw" in err
    assert not (tmp_path / "zo").exists()  # nothing written before the flags are checked


def test_batch_order_is_a_function_of_the_step():
    batch = batch_indices(7, 64, 4, 0)
    torch.manual_seed(123)
    np.random.seed(123)  # the global generators do not enter: a resumed run draws the same batch
    assert batch_indices(7, 64, 4, 0) == batch
    assert batch_indices(8, 64, 4, 0) != batch and batch_indices(7, 64, 4, 1) != batch
    epoch = [i for step in range(16) for i in batch_indices(step, 64, 4, 0)]
    assert sorted(epoch) == list(range(64))


@pytest.mark.slow
def test_bad_scope_flag_is_one_line_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "dlzo", "train", *flags(dict(SMALL, out=str(tmp_path), steps=1,
                                                                             scope="layer:x"))],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("dlzo: error: --scope") and "Traceback" not in run.stderr


def test_zero_nonfinite_allowance_is_refused_before_the_run(tmp_path):
    with pytest.raises(DlzoError, match="--max-nonfinite must be at least 1, not 0"):
        train(TrainConfig(**SMALL, out=str(tmp_path / "run"), steps=2, max_nonfinite=0))
    assert not (tmp_path / "run").exists()  # 0 would have stopped a healthy run at step 0


def test_export_writes_a_folder_plain_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    from dlzo.training.export import export

    train(TrainConfig(**SMALL, out=str(tmp_path / "run"), steps=3, eval_every=0, scope="layer:2"))
    export(tmp_path / "run", tmp_path / "merged", "final")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tuned = load_file(tmp_path / "run" / "final.safetensors")
    params = dict(merged.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in tuned.items())
    base = load_file(STORIES / "model.safetensors")
    assert torch.equal(params["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert merged.config.use_cache  # training turns the KV cache off; the exported model generates with it


def test_lora_export_merges_adapters_on_grouped_query_qwen3(tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    from dlzo.training.export import export

    folder = tmp_path / "qwen3"
    tiny_model("qwen3").save_pretrained(folder)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(STORIES / name, folder / name)
    train(TrainConfig(**{**SMALL, "model": str(folder), "lr": 1e-1}, out=str(tmp_path / "run"), steps=3,
                      eval_every=0, scope="dominant-lora"))
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert all("lora_" in n and f".layers.{run['layer_choice']['layer']}." in n for n in run["tuned_names"])
    export(tmp_path / "run", tmp_path / "merged", "final")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ids = torch.randint(3, 500, (1, 6))
    assert not torch.allclose(merged(ids).logits, tiny_model("qwen3")(ids).logits)  # the adapters changed it


@pytest.mark.parametrize("params,expect,reject", [("mlp", "mlp.", "self_attn"), ("attn", "self_attn", "mlp."),
                                                  (r"q_proj", "q_proj", "k_proj")])
def test_params_narrow_the_tuned_tensors(tmp_path, params, expect, reject):
    train(TrainConfig(**SMALL, out=str(tmp_path), steps=1, eval_every=0, scope="layer:2", params=params))
    names = json.loads((tmp_path / "run.json").read_text())["tuned_names"]
    assert names and all(expect in n and reject not in n for n in names)


# one run a task: BoolQ (no train file: train, dev and test from the validation file) in the fast tier
@pytest.mark.parametrize("task", ["boolq", *(pytest.param(t, marks=pytest.mark.slow)
                                             for t in ["sst2", "rte", "cb", "wsc", "wic", "multirc", "copa"])])
def test_every_shared_task_trains_a_step(task, tmp_path):
    results = train(TrainConfig(**{**SMALL, "task": task, "num_train": 8, "num_dev": 4, "num_test": 4},
                                out=str(tmp_path), steps=1, eval_every=0, scope="layer:1"))
    assert results["test_metric"] == "accuracy" and results["num_test"] == 4


def test_resume_before_the_first_checkpoint_starts_clean(tmp_path):
    train(TrainConfig(**SMALL, out=str(tmp_path), steps=3, eval_every=0, scope="layer:1"))
    for name in ("last.safetensors", "final.safetensors", "results.json"):
        (tmp_path / name).unlink()  # as if killed after 3 logged steps, before any save
    train(TrainConfig(**SMALL, out=str(tmp_path), steps=3, eval_every=0, scope="layer:1", resume=str(tmp_path)))
    steps = [json.loads(x)["step"] for x in (tmp_path / "trajectory.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    dev_at_zero = [x for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"step": 0, "dev_loss"' in x]
    assert len(dev_at_zero) == 1


def test_device_map_auto_loads_through_accelerate_and_trains_the_same(tmp_path, monkeypatch):
    # on a CPU-only machine accelerate places every module on the CPU; the run must equal a plain one
    from transformers import AutoModelForCausalLM
    asked, real = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: asked.append(k.get("device_map")) or real(*a, **k))
    plain = train(TrainConfig(**SMALL, out=str(tmp_path / "plain"), steps=2, eval_every=0, scope="layer:1"))
    mapped = train(TrainConfig(**SMALL, out=str(tmp_path / "mapped"), steps=2, eval_every=0, scope="layer:1",
                               device_map="auto"))
    assert asked == [None, "auto"]  # the flag reached transformers' loader (which hands it to accelerate)
    a, b = load_file(tmp_path / "plain" / "final.safetensors"), load_file(tmp_path / "mapped" / "final.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert plain["test_value"] == mapped["test_value"]


@pytest.mark.slow
@pytest.mark.parametrize("fast", [True, False])
def test_lezo_run_replays_and_resumes_bit_exactly(tmp_path, fast):
    options = dict(**SMALL, steps=8, eval_every=3, scope="lezo:2", fast_path=fast)
    trained, _ = assert_replay_and_resume_exact(tmp_path, options, stops=[5])
    base = load_file(STORIES / "model.safetensors")
    untouched = [n for n in trained if torch.equal(trained[n], base[n])]
    assert len(untouched) < len(trained)  # some layers moved; with 8 steps x 2 of 5 layers most did
