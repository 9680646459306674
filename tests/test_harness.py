"""dlzo.evaluation.harness: a loaded model handed to lm-evaluation-harness on a local, offline task, and the harness's
per-choice log-likelihoods checked against dlzo's own scoring of the same prompt and choices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import STORIES
from dlzo.data.examples import Example
from dlzo.engine.scoring import candidate_scores, encode, token_logprobs
from dlzo.errors import DlzoError
from dlzo.evaluation.harness import evaluate_with_harness
from dlzo.model.loading import load_model, load_tokenizer

TASK = "dlzo_tiny_choice"
ROWS = [
    {"question": "Once upon a time, there was a little", "choices": ["girl", "spoon", "cloud"], "label": 0},
    {"question": "She went to the park to play with her", "choices": ["friend", "soup"], "label": 0},
    {"question": "The sun was shining and the birds were", "choices": ["table", "singing", "blue"], "label": 1},
    {"question": "Tom was very happy. He said thank", "choices": ["door", "you"], "label": 1},
    {"question": "Lily liked to eat", "choices": ["cake", "rocks", "shoes"], "label": 0},
    {"question": "One day, a big dog ran into the", "choices": ["sky", "garden"], "label": 1},
]


def write_task(folder) -> str:
    """A six-row multiple-choice task: a JSONL file and the YAML that reads it with the json builder."""
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        f"  cache_dir: {folder / 'datasets-cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"  # the form docs/hf-trainer.md shows
    )
    return str(tasks)


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory, stories_path):
    pytest.importorskip("lm_eval")
    model, tokenizer = load_model(stories_path, device="cpu"), load_tokenizer(stories_path)
    include = write_task(tmp_path_factory.mktemp("harness"))
    results = evaluate_with_harness(model, tokenizer, [TASK], include_path=include, batch_size=4,
                                    log_samples=True)
    return model, tokenizer, results


@pytest.mark.slow
def test_harness_scores_a_local_task_and_agrees_with_dlzo_scoring(harness_run):
    model, tokenizer, results = harness_run
    samples = results["samples"][TASK]
    assert len(samples) == len(ROWS)
    # the task's accuracy is the mean of the per-row verdicts checked below
    assert results["results"][TASK]["acc,none"] == pytest.approx(sum(s["acc"] for s in samples) / len(ROWS))
    json.dumps(results)  # plain JSON data
    assert tokenizer.padding_side == "left" and not model.training  # the harness leaves dlzo's settings
    for sample in samples:
        row = sample["doc"]
        harness = torch.tensor([float(ll) for ll, _ in sample["filtered_resps"]], dtype=torch.float64)
        # the harness scores context "question" and continuation " choice" (its target delimiter is a space)
        example = Example(row["question"], [" " + c for c in row["choices"]], row["label"])
        batch = encode(tokenizer, [example], pack_single_token=False)
        with torch.no_grad():
            logprobs = token_logprobs(model, batch)
        sums = torch.zeros(len(row["choices"]), dtype=logprobs.dtype).index_add_(0, batch.token_candidate, logprobs)
        counts = torch.bincount(batch.token_candidate, minlength=len(row["choices"]))
        assert torch.allclose(harness, sums.double(), atol=1e-4, rtol=0), (row, harness, sums)
        # dlzo's candidate score is the same sum per answer token, and the harness's pick is dlzo's pick
        assert torch.allclose(candidate_scores(batch, logprobs)[0], sums / counts, atol=1e-6)
        assert sample["acc"] == float(int(harness.argmax()) == row["label"])


@pytest.mark.slow
def test_unknown_task_is_one_line_error(harness_run, tmp_path):
    model, tokenizer, _ = harness_run
    with pytest.raises(DlzoError, match="no task no_such_task"):
        evaluate_with_harness(model, tokenizer, ["no_such_task"], include_path=str(tmp_path))


def test_without_lm_eval_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails as if it were not installed
    with pytest.raises(DlzoError, match=r"needs lm-eval: pip install 'dlzo\[harness\]'"):
        evaluate_with_harness(None, None, ["arc_easy"])


@pytest.mark.requires_shared
@pytest.mark.slow
def test_eval_cli_hands_a_trained_run_to_the_harness(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from safetensors.torch import load_file

    import dlzo.cli.eval as eval_module
    from conftest import DATA
    from dlzo.cli.main import main

    handed, real = [], eval_module.evaluate_with_harness
    monkeypatch.setattr(eval_module, "evaluate_with_harness", lambda model, *a: handed.append(model) or real(model, *a))

    run = tmp_path / "run"
    assert main(["train", "--model", str(STORIES), "--task", "sst2", "--data-dir", str(DATA), "--num-train", "16", "--num-dev", "4",
                 "--num-test", "4", "--batch-size", "4", "--steps", "2", "--eval-every", "0", "--scope", "layer:1",
                 "--lr", "1e-3", "--quiet", "--out", str(run)]) == 0
    include = write_task(tmp_path)
    assert main(["eval", "--run", str(run), "--harness", TASK, "--harness-include", include,
                 "--harness-limit", "4", "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "harness.json").read_text())
    assert 0.0 <= results["results"][TASK]["acc,none"] <= 1.0
    # the harness got the run's checkpoint on the base model, not the base model: its tuned tensors are the
    # run's (without evaluations the best checkpoint is the final one), and they moved
    tuned = load_file(run / "final.safetensors")
    weights = dict(handed[0].named_parameters())
    base = load_file(STORIES / "model.safetensors")
    assert tuned and all(torch.equal(weights[n], t) for n, t in tuned.items())
    assert any(not torch.equal(base[n], t) for n, t in tuned.items())


@pytest.mark.requires_shared
@pytest.mark.slow
def test_a_task_whose_data_is_on_the_hub_offline_is_one_line(tmp_path):
    """The harness reads a task's data from the Hub; offline it raised a ConnectionError traceback."""
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub.yaml").write_text("task: dlzo_hub_task\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\n"
                                    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                                    "doc_to_choice: '{{choices.text}}'\ndoc_to_target: 0\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-m", "dlzo", "eval", "--model", str(STORIES), "--harness", "dlzo_hub_task",
                          "--harness-include", str(tasks), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("dlzo: error: lm-evaluation-harness could not read the data of dlzo_hub_task")
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()
