"""Hugging Face Trainer flag names are accepted as aliases of dlzo's (both spellings), and `dlzo train` names
what it trains on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from conftest import flags, small_run
from dlzo.cli.main import Command, main, parse, resolve
from dlzo.training.config import TrainConfig
from dlzo.training.loop import lr_schedule
from dlzo.training.run_folder import RunFolder
from dlzo.training.step import batch_indices

HF = ["--learning_rate", "3e-4", "--output_dir", "/tmp/o", "--max_steps", "7", "--per_device_train_batch_size", "8",
      "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "2", "--eval_steps", "5",
      "--warmup_steps", "3", "--lr_scheduler_type", "cosine", "--seed", "11"]
# a per-device batch of 8 accumulated twice is 16 examples a step, dlzo's --batch-size 16 --grad-accum 2
OURS = dict(lr=3e-4, out="/tmp/o", steps=7, batch_size=16, eval_batch_size=4, grad_accum=2, eval_every=5,
            warmup_steps=3, lr_scheduler="cosine", seed=11)


@pytest.mark.parametrize("dashes", [False, True])
def test_trainer_names_set_the_same_options(dashes):
    argv = [a.replace("_", "-") if dashes and a.startswith("--") else a for a in HF]
    _, options = parse(["train", "--model", "m", "--task", "sst2", *argv])
    assert {name: getattr(options, name) for name in OURS} == OURS


def test_dlzo_batch_size_is_the_steps_examples_and_hf_per_device_batch_is_one_micro_batch():
    _, ours = parse(["train", "--model", "m", "--task", "sst2", "--batch-size", "8", "--grad-accum", "2"])
    _, hf = parse(["train", "--model", "m", "--task", "sst2", "--per_device_train_batch_size", "8",
                   "--gradient_accumulation_steps", "2"])
    assert (ours.batch_size, ours.grad_accum) == (8, 2) and (hf.batch_size, hf.grad_accum) == (16, 2)


@pytest.mark.parametrize("switch, dtype", [("--bf16", "bfloat16"), ("--fp16", "float16")])
def test_bf16_and_fp16_set_the_dtype(switch, dtype):
    assert parse(["train", "--model", "m", "--task", "sst2", switch])[1].dtype == dtype
    assert parse(["train", "--model", "m", "--task", "sst2"])[1].dtype == "auto"


def test_the_alias_and_dlzo_name_are_one_option():
    """The last one given wins, as for any repeated flag: they are one destination, not two options."""
    assert parse(["train", "--model", "m", "--task", "sst2", "--lr", "1e-3", "--learning_rate", "2e-3"])[1].lr == 2e-3


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "m"], "dlzo train needs what to train on"),
    (["train", "--model", "m", "--task", "sst2", "--data", "rows.jsonl"], "--task and --data both given"),
    (["train", "--model", "m", "--task=rte", "--data=rows.jsonl"], "--task and --data both given"),
])
def test_train_names_a_task_or_data_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_data_alone_and_a_recipe_naming_the_task_are_enough(tmp_path):
    assert parse(["train", "--model", "m", "--data", "rows.jsonl", "--data-dir", "x"])[1].data == "rows.jsonl"
    recipe = tmp_path / "r.toml"
    recipe.write_text('task = "cb"\n')
    assert parse(["train", "--model", "m", "--config", str(recipe)])[1].task == "cb"


# transformers.TrainingArguments' names added for issue 32, each with its dlzo option and a value
MORE_HF = ["--num_train_epochs", "2.5", "--warmup_ratio", "0.25", "--logging_steps", "3", "--save_steps", "20",
           "--run_name", "first-try", "--report_to", "tensorboard", "wandb"]
MORE_OURS = dict(num_train_epochs=2.5, warmup_ratio=0.25, log_every=3, save_every=20, run_name="first-try",
                 report_to="tensorboard,wandb")


@pytest.mark.parametrize("dashes", [False, True])
def test_more_trainer_names_set_the_same_options(dashes):
    argv = [a.replace("_", "-") if dashes and a.startswith("--") else a for a in MORE_HF]
    _, options = parse(["train", "--model", "m", "--task", "sst2", *argv])
    assert {name: getattr(options, name) for name in MORE_OURS} == MORE_OURS


@pytest.mark.parametrize("argv, report_to", [
    (["--report_to", "none"], "none"), (["--report-to", "wandb"], "wandb"), ([], "none"),
    (["--report_to", "tensorboard,wandb"], "tensorboard,wandb"),  # a recipe's (and run.json's) spelling
])
def test_report_to_takes_one_or_several_backends(argv, report_to):
    assert parse(["train", "--model", "m", "--task", "sst2", *argv])[1].report_to == report_to


@pytest.mark.parametrize("argv, message", [
    (["--num_train_epochs", "2", "--max_steps", "10"], "--num-train-epochs and --steps (--max-steps) both given"),
    (["--num-train-epochs=2", "--steps=10"], "--num-train-epochs and --steps (--max-steps) both given"),
    (["--report_to", "tensorboard", "none"], "--report-to 'tensorboard,none': none goes alone"),
    (["--report_to", "mlflow"], "--report-to 'mlflow' is not one of none, tensorboard, wandb"),
    (["--warmup_ratio", "1.5"], "--warmup-ratio must be between 0 and 1, not 1.5"),
    (["--num_train_epochs", "-1"], "--num-train-epochs must not be negative"),
    (["--logging_steps", "0"], "--log-every must be at least 1, not 0"),
    (["--save_steps", "-5"], "--save-every must not be negative"),
])
def test_bad_trainer_values_are_one_line_before_any_work(tmp_path, argv, message, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "m", "--task", "sst2", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_recipe_with_steps_and_epochs_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "m"\ntask = "sst2"\nsteps = 100\n')
    assert main(["train", "--config", str(recipe), "--num_train_epochs", "1"]) == 2
    assert "--num-train-epochs and --steps (--max-steps) both given" in capsys.readouterr().err


@pytest.mark.parametrize("epochs, examples, batch, steps, each", [
    (1, 64, 16, 4, {1}), (2, 64, 16, 8, {2}), (0.5, 64, 4, 8, {0, 1}),
    (2, 100, 16, 12, {1, 2}),  # 6 full batches an epoch: 4 examples left out of each pass
    (2.5, 10, 16, 3, {3}),  # fewer examples than a batch: each step is a pass, rounded up
])
def test_epochs_are_the_steps_of_that_many_passes(epochs, examples, batch, steps, each):
    """--num-train-epochs E: the steps whose batches (batch_indices, the data order) pass over the training
    examples E times, a fraction rounded up (transformers: max_steps = ceil(epochs × steps per epoch))."""
    assert TrainConfig(num_train_epochs=epochs, batch_size=batch).epoch_steps(examples) == steps
    drawn = Counter(i for step in range(steps) for i in batch_indices(step, examples, batch, seed=3))
    assert {drawn[i] for i in range(examples)} == each
    assert sum(drawn.values()) == steps * min(batch, examples)


def test_warmup_ratio_is_transformers_warmup():
    """--warmup-ratio gives transformers' warm-up (4.x's warmup_ratio; 5.x spells it warmup_steps < 1, which
    TrainingArguments.get_warmup_steps reads), and --warmup-steps wins over it."""
    from transformers import TrainingArguments

    for steps, ratio, warmup_steps in [(10, 0.25, 0), (7, 0.1, 0), (10, 0.25, 5)]:
        config = TrainConfig(steps=steps, lr=1.0, lr_scheduler="linear", warmup_ratio=ratio, warmup_steps=warmup_steps)
        lr_at = lr_schedule(config)
        hf = TrainingArguments(output_dir="/tmp/unused", warmup_steps=warmup_steps or ratio)
        expected = hf.get_warmup_steps(steps)
        assert max(range(steps), key=lr_at) == expected and lr_at(0) == 0.0 and lr_at(expected) == 1.0


@pytest.mark.slow
def test_help_imports_no_torch():
    """`dlzo --help` and `dlzo train --help` load no command's dependencies: the command table names modules as
    strings, and the option dataclasses need no torch (dlzo.choices)."""
    check = ("import sys\nfrom dlzo.cli.main import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'numpy') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["generate", "--help"], ["--version"]):
        run = subprocess.run([sys.executable, "-c", check, *argv], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "usage: dlzo" in run.stdout or argv == ["--version"], run.stderr
        assert run.stdout.strip().splitlines()[-1] == "HEAVY []", (argv, run.stdout[-300:])


def test_a_command_s_flags_are_built_only_for_it(monkeypatch):
    """Only the chosen command's options dataclass is imported and turned into flags."""
    asked = []
    monkeypatch.setattr(Command, "options_class", lambda self: asked.append(self.options) or resolve(self.options))
    parse(["probe", "--model", "m"])
    assert set(asked) == {"dlzo.cli.options:ProbeConfig"}


@pytest.mark.requires_shared
def test_a_run_given_trainer_flags_trains_logs_and_saves_as_they_say(tmp_path, monkeypatch):
    """--num_train_epochs 1.5 over 16 examples in batches of 4: 6 steps; --logging_steps 2: a loss line at steps
    0, 2, 4 and the last; --save_steps 3: last.safetensors at step 3 as well as at the end; --run_name: the
    TensorBoard run folder."""
    saved, save = [], RunFolder.save
    monkeypatch.setattr(RunFolder, "save", lambda self, name, tensors, step, *rest: saved.append((name, step))
                        or save(self, name, tensors, step, *rest))
    out = tmp_path / "run"
    argv = ["train", *flags(small_run("lr", num_train=16)), "--learning_rate", "1e-3", "--output_dir", str(out),
            "--scope", "layer:1", "--num_train_epochs", "1.5", "--logging_steps", "2", "--save_steps", "3",
            "--eval_steps", "0", "--report_to", "tensorboard", "--run_name", "first-try"]
    assert main(argv) == 0
    record = json.loads((out / "run.json").read_text())["config"]
    assert record["steps"] == 6 and record["num_train_epochs"] == 1.5
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [0, 2, 4, 5]
    assert [step for name, step in saved if name == "last.safetensors"] == [3, 6]
    assert any((out / "tensorboard" / "first-try").glob("events.out.tfevents.*"))
