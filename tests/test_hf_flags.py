"""Hugging Face Trainer flag names are accepted as aliases of dlzo's (both spellings), and `dlzo train` names
what it trains on."""

from __future__ import annotations

import pytest

from dlzo.cli.main import main, parse

HF = ["--learning_rate", "3e-4", "--output_dir", "/tmp/o", "--max_steps", "7", "--per_device_train_batch_size", "8",
      "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps", "2", "--eval_steps", "5",
      "--warmup_steps", "3", "--lr_scheduler_type", "cosine", "--seed", "11"]
OURS = dict(lr=3e-4, out="/tmp/o", steps=7, batch_size=8, eval_batch_size=4, grad_accum=2, eval_every=5,
            warmup_steps=3, lr_scheduler="cosine", seed=11)


@pytest.mark.parametrize("dashes", [False, True])
def test_trainer_names_set_the_same_options(dashes):
    argv = [a.replace("_", "-") if dashes and a.startswith("--") else a for a in HF]
    _, options = parse(["train", "--model", "m", "--task", "sst2", *argv])
    assert {name: getattr(options, name) for name in OURS} == OURS


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
