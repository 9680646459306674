"""Fine-tune on your own data, end to end through the CLI on stories260K: each format trains (one layer and
the dominant scope), resumes and replays bit-exactly, `dlzo eval --data` and `dlzo generate` run, probe /
sweep / sensitivity take --data, and every bad input is one line naming the file, with nothing written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import STORIES
from dlzo.cli.eval import own_eval_rows
from dlzo.cli.main import main
from dlzo.cli.options import EvalConfig
from dlzo.data.user_data import file_digest, load_user_data
from dlzo.evaluation.generation import chat_prompt
from dlzo.model.loading import load_tokenizer
from dlzo.training.replay import replay

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
ZORBISH = [json.loads(line) for line in (EXAMPLES / "zorbish.jsonl").read_text().splitlines()]
# stories260K has no chat template: the tests give a copy of it the template of tests/test_data.py
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
FORMATS = ("text", "prompt-completion", "chat", "classification")
FAST = ["--steps", "4", "--eval-every", "2", "--batch-size", "4", "--lr", "1e-3", "--eval-batch-size", "16",
        "--quiet"]


def word_pairs(count: int = 40) -> list[tuple[str, str]]:
    """(English, Zorbish) from the example file's prompts "Translate to Zorbish: cat ->" and completions."""
    return [(row["prompt"].split(": ")[1][:-3], row["completion"].strip()) for row in ZORBISH[:count]]


def rows_of(fmt: str) -> list[dict]:
    pairs = word_pairs()
    if fmt == "text":
        return [{"text": f"In Zorbish the word for {w} is {z}."} for w, z in pairs]
    if fmt == "prompt-completion":
        return [{"prompt": f"Translate to Zorbish: {w} ->", "completion": f" {z}"} for w, z in pairs]
    if fmt == "chat":
        return [{"messages": [{"role": "user", "content": f"Zorbish for {w}?"},
                              {"role": "assistant", "content": z}]} for w, z in pairs]
    return [{"prompt": f"Is {pairs[(i + i % 2) % len(pairs)][1]} the Zorbish word for {w}? Answer:",
             "options": [" yes", " no"], "label": i % 2} for i, (w, _) in enumerate(pairs)]


def write_lines(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    return {fmt: write_lines(folder / f"{fmt}.jsonl", rows_of(fmt)) for fmt in FORMATS}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, stories_path) -> str:
    """stories260K with a chat template (every format runs on it; only chat rows need the template)."""
    folder = tmp_path_factory.mktemp("stories-chat")
    for item in Path(stories_path).iterdir():
        shutil.copy(item, folder / item.name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return str(folder)


def dlzo(*args, capsys=None) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_args(model: str, data: str, out: Path, *extra) -> list:
    return ["train", "--model", model, "--data", data, "--out", out, *FAST, *extra]


def dev_losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["dev_loss"] for r in lines if "dev_loss" in r}


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("scope", ["layer:1", pytest.param("dominant", marks=pytest.mark.slow)])  # + probe, sensitivity
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_trains_through_the_cli(fmt, scope, files, chat_model, tmp_path, capsys):
    out = tmp_path / "run"
    code, printed, err = dlzo(*train_args(chat_model, files[fmt], out, "--scope", scope), capsys=capsys)
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["data"]["format"] == fmt and record["data"]["source"] == files[fmt]
    assert record["split_record"]["num_train"] == 36 and record["split_record"]["num_dev"] == 4
    assert record["data"]["sha256"] and record["config"]["data"] == files[fmt]
    if scope == "dominant":
        assert "no massive activations" in record["layer_choice"]["reason"]
    losses = dev_losses(out)
    assert sorted(losses) == [0, 2, 4] and losses[4] != losses[0]  # training moved the dev loss
    results = json.loads((out / "results.json").read_text())
    # the reported best is the lowest dev loss the run logged (the untrained model's included)
    assert results["dev_loss_best"] == pytest.approx(min(losses.values())) and results["num_test"] == 4
    assert results["task"] == fmt and results["data"]["format"] == fmt and results["test_split"].startswith("dev")
    if fmt == "classification":
        assert results["test_metric"] == "accuracy" and 0 <= results["test_value"] <= 1
        assert "dev accuracy" in printed
    else:
        assert results["test_metric"] == "perplexity"
        # perplexities of the logged dev losses: the untrained model's and the best checkpoint's (the test rows
        # of a --data run are its dev rows)
        best = min(losses.values())
        assert results["test_value"] == pytest.approx(torch.tensor(best).exp().item(), rel=1e-6)
        assert results["dev_perplexity_start"] == pytest.approx(torch.tensor(losses[0]).exp().item(), rel=1e-6)
        assert "perplexity" in printed


def test_prompt_completion_learns_at_a_workable_rate(chat_model, tmp_path, capsys):
    """Not only a change: ten steps on the 200 Zorbish rows lower the held-out completion loss."""
    out = tmp_path / "run"
    code, _, err = dlzo("train", "--model", chat_model, "--data", EXAMPLES / "zorbish.jsonl", "--out", out,
                        "--scope", "layer:1", "--steps", "10", "--eval-every", "5", "--batch-size", "8",
                        "--lr", "1e-3", "--quiet", capsys=capsys)
    assert code == 0, err
    losses = dev_losses(out)
    assert losses[10] < losses[5] < losses[0]


# three runs each: chat (the template, several spans) in the fast tier, the other formats slow
@pytest.mark.parametrize("fmt", ["chat", *(pytest.param(f, marks=pytest.mark.slow) for f in FORMATS if f != "chat")])
def test_resume_after_a_partial_run_and_replay_are_bit_exact(fmt, files, chat_model, tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    common = ["--scope", "layer:1", "--eval-every", "3"]
    assert dlzo(*train_args(chat_model, files[fmt], whole, *common, "--steps", "6"))[0] == 0
    assert dlzo(*train_args(chat_model, files[fmt], part, *common, "--steps", "3"))[0] == 0
    code, printed, err = dlzo(*train_args(chat_model, files[fmt], part, *common, "--steps", "6", "--resume", part),
                              capsys=capsys)
    assert code == 0, err
    assert "resuming" in printed
    for name in ("final", "best"):
        a, b = load_file(whole / f"{name}.safetensors"), load_file(part / f"{name}.safetensors")
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a), name
    assert (whole / "trajectory.jsonl").read_text() == (part / "trajectory.jsonl").read_text()
    rebuilt, trained = replay(part), load_file(part / "final.safetensors")
    assert all(torch.equal(rebuilt[n], trained[n]) for n in trained)
    assert dlzo("replay", "--run", part, capsys=capsys)[1].count("bit-identical to final.safetensors: True") == 1


def test_resume_refuses_a_changed_data_file(files, chat_model, tmp_path, capsys):
    data = Path(shutil.copy(files["prompt-completion"], tmp_path / "rows.jsonl"))
    out = tmp_path / "run"
    assert dlzo(*train_args(chat_model, data, out, "--scope", "layer:1", "--steps", "2"))[0] == 0
    data.write_text(data.read_text().replace("cotek", "catek"))
    code, _, err = dlzo(*train_args(chat_model, data, out, "--scope", "layer:1", "--steps", "4", "--resume", out),
                        capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and f"--data {data} changed since that run" in err


def test_export_of_a_data_run_loads_in_plain_transformers(files, chat_model, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert dlzo(*train_args(chat_model, files["chat"], out, "--scope", "layer:1", "--steps", "2"))[0] == 0
    assert dlzo("export", "--run", out, "--to", tmp_path / "merged")[0] == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tuned = load_file(out / "best.safetensors")
    params = dict(merged.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in tuned.items())


# ----------------------------------------------------------------------------------------------- eval, generate


@pytest.fixture(scope="module")
def chat_run(files, chat_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chat-run") / "run"
    assert dlzo(*train_args(chat_model, files["chat"], out, "--scope", "layer:1"))[0] == 0
    return out


def test_eval_data_on_a_run_uses_its_held_out_rows(chat_run, files, tmp_path, capsys):
    code, printed, err = dlzo("eval", "--data", files["chat"], "--run", chat_run, "--generate", "--max-new-tokens",
                              "4", "--out", tmp_path / "e", capsys=capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert result["rows"] == "the run's 4 held-out dev rows" and result["num_examples"] == 4
    best = json.loads((chat_run / "results.json").read_text())["dev_loss_best"]
    assert result["loss"] == pytest.approx(best, rel=1e-5)  # the best checkpoint, the same rows, the same loss
    assert result["perplexity"] == pytest.approx(torch.tensor(best).exp().item(), rel=1e-5)
    assert 0 <= result["exact_match"] <= result["f1"] <= 1 and "greedy exact match" in printed


def test_eval_data_on_a_base_model(files, chat_model, tmp_path, capsys):
    code, printed, err = dlzo("eval", "--data", files["classification"], "--model", chat_model, "--out",
                              tmp_path / "c", capsys=capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "c" / "eval.json").read_text())
    assert result["rows"] == "all 40 rows" and 0 <= result["accuracy"] <= 1 and "perplexity" not in result
    code, _, err = dlzo("eval", "--data", files["prompt-completion"], "--model", chat_model, "--num-test", "8",
                        "--generate", "--max-new-tokens", "3", "--out", tmp_path / "p", capsys=capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "p" / "eval.json").read_text())
    assert result["rows"] == "a seeded 8 of 40 rows" and result["perplexity"] > 1 and "exact_match" in result
    code, _, err = dlzo("report", tmp_path / "c", tmp_path / "p", "--out", tmp_path / "report.md", capsys=capsys)
    assert code == 0, err  # an eval of your own rows has no task metric: the report says what it has
    text = (tmp_path / "report.md").read_text()
    assert f"- eval c: {files['classification']} (classification, all 40 rows): accuracy" in text
    assert "- eval p: " in text and "perplexity" in text and "greedy exact match" in text
    code, _, err = dlzo("eval", "--data", files["text"], "--model", chat_model, "--generate", "--out",
                        tmp_path / "t", capsys=capsys)
    assert code == 2 and "text rows, which have no prompt" in err and not (tmp_path / "t").exists()


@pytest.mark.requires_shared
def test_generate_greedy_sampled_and_chat_formatted(chat_run, chat_model, capsys):
    prompt = "Zorbish for cat?"
    code, greedy, err = dlzo("generate", "--run", chat_run, "--prompt", prompt, "--max-new-tokens", "6",
                             capsys=capsys)
    assert code == 0 and greedy.strip(), err
    # a chat run wraps the prompt in the template: the same text as --chat on the plain prompt
    assert dlzo("generate", "--run", chat_run, "--prompt", prompt, "--max-new-tokens", "6", "--chat",
                capsys=capsys)[1] == greedy
    sampled = [dlzo("generate", "--run", chat_run, "--prompt", prompt, "--max-new-tokens", "6", "--sample",
                    "--temperature", "0.9", "--seed", "3", capsys=capsys)[1] for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded
    code, base, _ = dlzo("generate", "--model", chat_model, "--prompt", "Once upon a time", "--max-new-tokens",
                         "5", capsys=capsys)
    assert code == 0 and base.strip()
    code, _, err = dlzo("generate", "--model", STORIES, "--prompt", "hi", "--chat", capsys=capsys)
    assert code == 2 and "no chat template" in err and err.count("\n") == 1


def test_generation_prompt_is_the_training_prompt_of_a_chat_row(chat_model, tmp_path):
    """What `dlzo generate` feeds a chat run is exactly the context its training rows were scored after."""
    tokenizer = load_tokenizer(chat_model)
    rows = [{"messages": [{"role": "user", "content": "Zorbish for cat?"}, {"role": "assistant", "content": "cotek"}]}]
    data = load_user_data(write_lines(tmp_path / "c.jsonl", rows * 2), tokenizer, eval_fraction=0.5)
    assert data.train[0].prompt == chat_prompt(tokenizer, "Zorbish for cat?")


# ----------------------------------------------------------------------------------------------- probe, sweep, sensitivity


@pytest.mark.slow
def test_probe_sweep_and_sensitivity_take_data(files, chat_model, tmp_path, capsys):
    assert dlzo("probe", "--model", chat_model, "--data", files["chat"], "--out", tmp_path / "probe")[0] == 0
    assert json.loads((tmp_path / "probe" / "probe.json").read_text())["layers"]
    code, _, err = dlzo("sensitivity", "--model", chat_model, "--data", files["classification"], "--seeds", "1",
                        "--batches", "1", "--out", tmp_path / "sens", capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "sens" / "sensitivity.json").read_text())["task"] == files["classification"]
    code, printed, err = dlzo("sweep", "--model", chat_model, "--data", files["prompt-completion"], "--layers", "1",
                              "--references", "", "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--out",
                              tmp_path / "sweep", capsys=capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert summary["runs"][-1]["metric"] == "1/perplexity" and 0 < summary["runs"][-1]["test_metric"] < 1
    assert json.loads((tmp_path / "sweep" / "runs" / "layer01" / "run.json").read_text())["data"]


@pytest.mark.slow
def test_two_ranks_on_your_data_equal_one_process(chat_model, tmp_path):
    """Data parallel with --data: 2 gloo ranks (torchrun) give one process's weights (docs/distributed.md)."""
    args = ["--model", chat_model, "--data", str(EXAMPLES / "zorbish.jsonl"), "--scope", "layer:1", "--steps", "3",
            "--batch-size", "8", "--eval-every", "0", "--lr", "1e-4", "--quiet"]
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLZO_DIST_TIMEOUT": "60"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "dlzo", "train", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "final.safetensors"), load_file(tmp_path / "two" / "final.safetensors")
    assert max(float((a[n] - b[n]).abs().max()) for n in a) <= 1e-6
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two")]
    assert results[1]["world_size"] == 2
    assert results[1]["dev_loss_start"] == pytest.approx(results[0]["dev_loss_start"], rel=1e-6)


# ----------------------------------------------------------------------------------------------- bad input


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list, str]]:
    """name -> (extra train arguments, what the one-line error must say, besides naming the file)."""
    good = {"prompt": "Translate to Zorbish: cat ->", "completion": " cotek"}
    path = lambda name: tmp_path / name  # noqa: E731
    write_lines(path("good.jsonl"), [good, good])
    write_lines(path("empty.jsonl"), [])
    write_lines(path("broken.jsonl"), [good, good, '{"prompt": "dog ->", "completion": " dagek"'])
    write_lines(path("nofmt.jsonl"), [good, {"question": "x", "reply": "y"}])
    write_lines(path("mixed.jsonl"), [good, {"text": "a text row"}])
    write_lines(path("label.jsonl"), [{"prompt": "p", "options": [" a", " b"], "label": 0},
                                      {"prompt": "q", "options": [" a", " b"], "label": 5}])
    write_lines(path("content.jsonl"), [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": 5}]}] * 2)
    path("noheader.csv").write_text("Translate cat,cotek\nTranslate dog,dagek\n")
    write_lines(path("nocompletion.jsonl"), [good, {"prompt": "Translate to Zorbish: dog ->", "completion": "  "}])
    hub = path("hub")
    hub.mkdir()
    write_lines(hub / "train.jsonl", [good, good])
    return {
        "missing file": (["--data", path("absent.jsonl")], f"data file not found: {path('absent.jsonl')}"),
        "empty file": (["--data", path("empty.jsonl")], f"{path('empty.jsonl')}: empty file"),
        "invalid JSON": (["--data", path("broken.jsonl")], f"{path('broken.jsonl')}:3: not valid JSON"),
        "no format": (["--data", path("nofmt.jsonl")], f"{path('nofmt.jsonl')}:2: fields 'question', 'reply' match"),
        "mixed formats": (["--data", path("mixed.jsonl")], f"{path('mixed.jsonl')}:2: a text row, but"),
        "label outside options": (["--data", path("label.jsonl")], f"{path('label.jsonl')}:2: label 5 is outside"),
        "non-string content": (["--data", path("content.jsonl")],
                               f"{path('content.jsonl')}:1: the content of message 2 must be a string"),
        "unknown --columns name": (["--data", path("good.jsonl"), "--columns", "prompt=question"],
                                   f"{path('good.jsonl')}:1: no column 'question'"),
        "CSV without header": (["--data", path("noheader.csv")], f"{path('noheader.csv')}:1: no header row"),
        "nonexistent split": (["--data", f"hf:{hub}::validation"], f"hf:{hub}::validation: split 'validation'"),
        "empty completion": (["--data", path("nocompletion.jsonl")], f"{path('nocompletion.jsonl')}:2: empty completion"),
        "broken --eval-data": (["--data", EXAMPLES / "zorbish.jsonl", "--eval-data", path("broken.jsonl")],
                               f"{path('broken.jsonl')}:3: not valid JSON"),
        "--eval-data of another format": (["--data", EXAMPLES / "zorbish.jsonl", "--eval-data", EXAMPLES / "text.jsonl"],
                                          f"{EXAMPLES / 'text.jsonl'}: its rows are text, but those of"),
    }


BAD = ["missing file", "empty file", "invalid JSON", "no format", "mixed formats", "label outside options",
       "non-string content", "unknown --columns name", "CSV without header", "nonexistent split", "empty completion",
       "broken --eval-data", "--eval-data of another format"]


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_naming_the_file_and_nothing_is_written(case, chat_model, tmp_path, capsys,
                                                                      offline_hub):
    extra, expected = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    code, printed, err = dlzo("train", "--model", chat_model, "--out", out, "--scope", "layer:1", *extra,
                              capsys=capsys)
    assert code == 2
    assert err.startswith("dlzo: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.requires_shared
def test_checks_run_in_order_flags_then_folder_then_model_then_data(tmp_path, capsys):
    missing = tmp_path / "absent.jsonl"
    for extra, expected in (
        (["--data-format", "yaml"], "argument --data-format: invalid choice: 'yaml'"),
        (["--columns", "foo=bar"], "--columns foo=bar: unknown field 'foo'"),
        (["--eval-fraction", "1.5"], "--eval-fraction must be between 0 and 1"),
        (["--model", tmp_path / "no-model"], "model path not found"),
    ):
        args = ["train", "--model", STORIES, "--data", missing, "--out", tmp_path / "out", *extra]
        code, _, err = dlzo(*args, capsys=capsys)
        assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert dlzo("train", "--model", STORIES, "--task", "sst2", "--eval-data", missing, "--out", tmp_path / "out",
                capsys=capsys)[2].startswith("dlzo: error: --eval-data needs --data")
    assert not (tmp_path / "out").exists()


@pytest.mark.requires_shared
def test_a_run_is_found_from_any_folder_however_its_files_are_named(files, tmp_path, monkeypatch, capsys):
    """Trained with relative paths: run.json names the model and data absolute, so a resume from another folder
    with the file spelled otherwise is the same run, and `dlzo eval --run --data` scores the held-out rows of
    the run's file whatever path (or copy) names it; an edited file is not the run's and is scored whole."""
    here = tmp_path / "here"
    here.mkdir()
    shutil.copy(files["classification"], here / "rows.jsonl")
    shutil.copytree(STORIES, here / "model")
    monkeypatch.chdir(here)
    assert dlzo(*train_args("model", "rows.jsonl", "run", "--scope", "layer:1", "--steps", "2"))[0] == 0
    config = json.loads((here / "run" / "run.json").read_text())["config"]
    assert config["model"] == str(here / "model") and config["data"] == str(here / "rows.jsonl")
    monkeypatch.chdir(tmp_path)
    code, _, err = dlzo(*train_args("here/model", str(here / "rows.jsonl"), "here/run", "--scope", "layer:1",
                                    "--steps", "4", "--resume", "here/run"), capsys=capsys)
    assert code == 0, err
    copy = shutil.copy(here / "rows.jsonl", tmp_path / "copy.jsonl")
    for name in ("here/rows.jsonl", copy, None):  # None: no --data, the run's own rows (not sst2)
        assert dlzo("eval", *(["--data", name] if name else []), "--run", "here/run", "--out", tmp_path / "e")[0] == 0
        assert json.loads((tmp_path / "e" / "eval.json").read_text())["rows"] == "the run's 4 held-out dev rows"
    Path(copy).write_text(Path(copy).read_text().replace("yes", "yeah", 1))
    assert dlzo("eval", "--data", copy, "--run", "here/run", "--out", tmp_path / "e")[0] == 0
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["rows"] == "all 40 rows"


def test_rows_longer_than_the_models_positions_are_counted_at_its_limit(chat_model, tmp_path, capsys):
    """stories260K has 512 positions: with the default --max-length 1024 the rows are cut at 512, and the run
    says so and how many (the note on the rows counted only those over 1024)."""
    words = " ".join(["word"] * 700)  # about 700 tokens: over 512, under 1024
    rows = [{"prompt": f"{words} {i}:", "completion": " yes"} for i in range(3)]
    rows += [{"prompt": f"Short {i}:", "completion": " no"} for i in range(9)]
    data = write_lines(tmp_path / "long.jsonl", rows)
    code, printed, err = dlzo("train", "--model", chat_model, "--data", data, "--out", tmp_path / "run", "--scope",
                              "layer:1", "--steps", "1", "--batch-size", "4", "--quiet", capsys=capsys)
    assert code == 0, err
    assert "--max-length 1024 is more than the model's 512 positions: every sequence is cut to 512 tokens " \
           "(3 of 12 rows are longer)" in printed


def test_a_dev_file_that_is_the_training_file_is_said(files, chat_model, tmp_path, capsys):
    data = files["prompt-completion"]
    code, printed, err = dlzo(*train_args(chat_model, data, tmp_path / "run", "--scope", "layer:1", "--steps", "1",
                                          "--eval-data", data), capsys=capsys)
    assert code == 0, err
    assert f"{data} holds the rows of {data}: the dev rows are training rows" in printed
    code, _, err = dlzo("export", "--run", tmp_path / "run", "--to", tmp_path / "x", "--checkpoint", "bogus",
                        capsys=capsys)
    assert code == 2 and "argument --checkpoint: invalid choice: 'bogus'" in err


def test_eval_of_a_run_on_its_eval_data_scores_the_dev_rows_it_was_scored_on(tmp_path, stories_tokenizer):
    """A run trained with --eval-data scored a seeded sample of --num-dev (else 500) of that file's rows;
    `dlzo eval --run` on that file (any path, a copy too) scores the same rows, not every row or --num-test."""
    train_rows, dev_rows = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train_rows.write_text("".join(json.dumps({"text": f"train row {i}"}) + "\n" for i in range(20)))
    dev_rows.write_text("".join(json.dumps({"text": f"dev row {i}"}) + "\n" for i in range(700)))
    copy = tmp_path / "elsewhere.jsonl"
    shutil.copyfile(dev_rows, copy)
    record = {"config": {"data": str(train_rows), "eval_data": str(dev_rows), "num_dev": -1, "data_seed": 3,
                         "data_format": "auto", "columns": ""},
              "data": {"sha256": file_digest(str(train_rows)), "eval_sha256": file_digest(str(dev_rows))}}
    trained = load_user_data(str(train_rows), stories_tokenizer, eval_source=str(dev_rows), seed=3, max_eval=500).dev
    _, rows, which = own_eval_rows(EvalConfig(run="R", data=str(copy), num_test=1000), stories_tokenizer, record)
    assert [e.prompt + e.continuations[0] for e in rows] == [e.prompt + e.continuations[0] for e in trained]
    assert len(rows) == 500 and which == "the run's 500 dev rows of its --eval-data"
    _, other, _ = own_eval_rows(EvalConfig(run="R", data=str(train_rows), num_test=1000), stories_tokenizer, record)
    assert len(other) == 20  # another file (here its training file): every row
