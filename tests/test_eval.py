import json

import pytest
import torch

from conftest import DATA, STORIES
from dlzo.cli.eval import _default_to_the_runs_data, _the_runs_pool, eval_command
from dlzo.cli.main import main
from dlzo.cli.options import EvalConfig
from dlzo.data.benchmarks import load_task
from dlzo.engine.scoring import candidate_scores, encode, token_logprobs
from dlzo.errors import DlzoError
from dlzo.evaluation.evaluate import demonstrations, evaluate
from dlzo.model.loading import load_model, load_tokenizer
from dlzo.training.run_folder import recorded_test_options


@pytest.mark.requires_shared
def test_eval_cli_zero_shot_and_in_context(tmp_path, capsys):
    assert main(["eval", "--task", "sst2", "--model", str(STORIES), "--data-dir", str(DATA), "--num-test", "24",
                 "--out", str(tmp_path / "zs")]) == 0
    assert main(["eval", "--task", "sst2", "--model", str(STORIES), "--data-dir", str(DATA), "--num-test", "24",
                 "--icl", "2", "--out", str(tmp_path / "icl")]) == 0
    zero, icl = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("zs", "icl"))
    assert zero["metric"] == "accuracy" and zero["num_examples"] == 24 and icl["icl"] == 2
    assert "sst2 accuracy" in capsys.readouterr().out


@pytest.mark.requires_shared
def test_demonstrations_are_solved_training_examples():
    train = load_task("sst2", DATA).splits(num_train=10, num_dev=0, num_test=1).train
    demos = demonstrations(train, 3, seed=0)
    assert demos.count("\n\n") == 3 and demos.count(" It was ") == 3


@pytest.mark.requires_shared
def test_squad_generation_metrics(tmp_path):
    folder = tmp_path / "squad"
    folder.mkdir()
    qas = [{"id": str(i), "question": "Who is she?", "answers": [{"text": "Lily", "answer_start": 0}]} for i in range(3)]
    data = {"data": [{"title": "Story", "paragraphs": [{"context": "Lily was a little girl.", "qas": qas}]}]}
    (folder / "dev-v1.1.json").write_text(json.dumps(data))
    task = load_task("squad", tmp_path)
    model, tokenizer = load_model(str(STORIES)), load_tokenizer(str(STORIES))
    result = evaluate(model, tokenizer, task, task.read_split("valid"), batch_size=2, quiet=True)
    assert result.metric == "f1" and 0 <= result.exact_match <= result.value <= 1
    assert result.num_examples == 3
    # planted generations (the answer is "Lily"): exact; two words of which one is right; wrong. Only the first
    # line counts. F1 1, 2/3 (precision 1/2, recall 1), 0; exact match 1, 0, 0.
    planted = iter(["Lily\nand more", "Lily was", "Bob"])
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]

    def generate(input_ids, **kwargs):
        rows = [tokenizer(next(planted), add_special_tokens=False)["input_ids"] for _ in range(len(input_ids))]
        width = max(len(r) for r in rows)
        tails = torch.tensor([r + [newline] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, tails], dim=1)
    model.generate = generate
    result = evaluate(model, tokenizer, task, task.read_split("valid"), batch_size=2, quiet=True)
    assert result.value == pytest.approx((1 + 2 / 3 + 0) / 3) and result.exact_match == pytest.approx(1 / 3)


@pytest.mark.requires_shared
@pytest.mark.parametrize("task", ["copa", "wic"])
def test_eval_accuracy_is_the_brute_force_count(task):
    """The fraction of examples whose best candidate (mean answer log-prob) is a right one, each example scored
    alone on the plain path (one sequence per candidate, full logits): 20 examples in batches of 16 and 4."""
    t = load_task(task, DATA)
    model, tokenizer = load_model(str(STORIES)), load_tokenizer(str(STORIES))
    examples = t.splits(num_test=20).test
    result = evaluate(model, tokenizer, t, examples, quiet=True)
    right = 0
    with torch.no_grad():
        for example in examples:
            batch = encode(tokenizer, [example], pack_single_token=False)
            best = int(candidate_scores(batch, token_logprobs(model, batch, full_logits=True))[0].argmax())
            right += best in (example.correct or [example.label])
    assert result.num_examples == 20 and result.value == right / 20


def test_a_run_is_evaluated_on_what_it_trained_on_unless_told(tmp_path):
    """`dlzo eval --run R` with no --task: R's task (an RTE run was scored on SST-2 before), or R's own rows;
    an explicit --task wins; no run: sst2."""
    def chosen(record: dict, **flags) -> tuple[str, str]:
        (tmp_path / "run.json").write_text(json.dumps({"config": record}))
        config = EvalConfig(run=str(tmp_path), **flags)
        _default_to_the_runs_data(config)
        return config.task, config.data

    assert chosen({"task": "rte", "data": ""}) == ("rte", "")
    assert chosen({"task": "sst2", "data": "/d/rows.jsonl", "eval_data": ""}) == ("", "/d/rows.jsonl")
    assert chosen({"task": "sst2", "data": "/d/rows.jsonl", "eval_data": "/d/dev.jsonl"}) == ("", "/d/dev.jsonl")
    assert chosen({"task": "rte", "data": ""}, task="cb") == ("cb", "")
    config = EvalConfig()
    _default_to_the_runs_data(config)
    assert config.task == "sst2" and config.data_dir == "../shared/data"
    (tmp_path / "run.json").write_text(json.dumps({"config": {"task": "rte", "data_dir": "/x/data"}}))
    for given, expected in (("", "/x/data"), ("/mine", "/mine")):  # the run's folder of task files, unless given
        config = EvalConfig(run=str(tmp_path), data_dir=given)
        _default_to_the_runs_data(config)
        assert config.data_dir == expected
    record = {"data": "/d/rows.jsonl", "eval_data": "/d/dev.csv", "data_format": "prompt-completion",
              "columns": "prompt=question,completion=answer"}
    (tmp_path / "run.json").write_text(json.dumps({"config": record}))
    config = EvalConfig(run=str(tmp_path))
    _default_to_the_runs_data(config)  # the eval file is read as the run read it
    assert (config.data, config.data_format, config.columns) == ("/d/dev.csv", "prompt-completion",
                                                                  "prompt=question,completion=answer")


@pytest.mark.requires_shared
def test_eval_of_a_run_scores_the_rows_and_cut_its_results_were_measured_on(tmp_path):
    """`dlzo eval --run R` alone reproduces R's test figure: its --num-test, --data-seed, --max-length and
    --eval-batch-size are eval's defaults (it sampled the whole validation split before), and on BoolQ, which
    has no train file, the test rows are what R's --num-train/--num-dev left of the validation file (eval's own
    defaults overlapped R's training rows). A flag still wins."""
    run = tmp_path / "run"
    assert main(["train", "--model", str(STORIES), "--data-dir", str(DATA), "--task", "boolq", "--num-train", "1200",
                 "--num-dev", "8", "--num-test", "12", "--data-seed", "3", "--max-length", "96",
                 "--eval-batch-size", "4", "--steps", "1", "--batch-size", "2", "--scope", "layer:0", "--quiet",
                 "--out", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert main(["eval", "--run", str(run), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert (again["num_examples"], again["value"]) == (results["num_test"], results["test_value"]) == (12, again["value"])
    trained = load_task("boolq", DATA).splits(3, 1200, 8, 12)
    config = EvalConfig(run=str(run), task="boolq")
    assert load_task("boolq", DATA).splits(3, num_test=12, **_the_runs_pool(config)).test == trained.test
    assert main(["eval", "--run", str(run), "--num-test", "5", "--out", str(tmp_path / "five")]) == 0
    assert json.loads((tmp_path / "five" / "eval.json").read_text())["num_examples"] == 5
    record = json.loads((run / "run.json").read_text())
    record["config"]["num_test"] = 0  # a grid run's: no test rows, so eval's own count, not a refused --num-test 0
    (run / "run.json").write_text(json.dumps(record))
    assert recorded_test_options(run) == {"data_seed": 3, "max_length": 96, "batch_size": 4, "max_new_tokens": 50}


@pytest.mark.requires_shared
def test_a_boolq_run_whose_training_used_the_whole_validation_file_has_no_test_rows(tmp_path):
    """BoolQ has no train file: a run that drew train and dev rows from all of the validation file left no test
    rows; eval says so in one line (it divided by zero)."""
    (tmp_path / "run.json").write_text(json.dumps({"config": {"task": "boolq", "num_train": 5000, "num_dev": 0,
                                                               "data_dir": str(DATA)}}))
    with pytest.raises(DlzoError, match="no test rows are left"):
        eval_command(EvalConfig(run=str(tmp_path), task="boolq"))
