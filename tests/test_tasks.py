import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA
from dlzo.data.benchmarks import load_task
from dlzo.data.examples import Example
from dlzo.data.metrics import best_over_answers, exact_match, f1_score
from dlzo.errors import DlzoError

OFFICIAL_SIZES = {  # (train, validation) rows of the official files in ../shared/data
    "sst2": (67349, 872), "rte": (2490, 277), "cb": (250, 56), "wsc": (554, 104), "wic": (5428, 638),
    "multirc": (27243, 4848), "copa": (400, 100),
}


@pytest.mark.requires_shared
@pytest.mark.parametrize("name", list(OFFICIAL_SIZES))
def test_counts_match_official_sizes(name):
    task = load_task(name, DATA)
    assert (len(task.read_split("train")), len(task.read_split("valid"))) == OFFICIAL_SIZES[name]


@pytest.mark.requires_shared
def test_boolq_has_no_train_file_and_samples_disjointly_from_validation():
    task = load_task("boolq", DATA)
    assert len(task.read_split("valid")) == 3270 and not task.has_split("train")
    splits = task.splits(seed=0)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (1000, 500, 1000)
    prompts = [e.prompt for e in splits.train + splits.dev + splits.test]
    assert len(set(prompts)) > 0.99 * len(prompts)  # (a few passages repeat with other questions)
    assert any("WARNING" in note for note in splits.notes)


@pytest.mark.requires_shared
@pytest.mark.parametrize("name,sizes", [("sst2", (1000, 500, 872)), ("cb", (150, 100, 56)), ("copa", (300, 100, 100)),
                                        ("wsc", (54, 500, 104)), ("multirc", (1000, 500, 1000))])
def test_mezo_sampling_sizes(name, sizes):
    splits = load_task(name, DATA).splits(seed=0)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == sizes


@pytest.mark.requires_shared
def test_sampling_is_mezos_seeded_permutation():
    task = load_task("rte", DATA)
    pool = task.read_split("train")
    splits = task.splits(seed=3, num_train=20, num_dev=10, num_test=5)
    order = np.random.RandomState(3).permutation(len(pool))[:30]
    assert [e.prompt for e in splits.train] == [pool[i].prompt for i in order[:20]]
    assert [e.prompt for e in splits.dev] == [pool[i].prompt for i in order[20:]]


SNAPSHOTS = {
    "sst2": ({"sentence": "a gorgeous film ", "label": 1}, "a gorgeous film It was", [" terrible", " great"], 1),
    "rte": ({"premise": "P.", "hypothesis": "H.", "label": "entailment"},
            'P.\nDoes this mean that "H." is true? Yes or No?\n', ["Yes", "No"], 0),
    "cb": ({"premise": "P.", "hypothesis": "H", "label": "neutral"},
           'Suppose P. Can we infer that "H"? Yes, No, or Maybe?\n', ["Yes", "No", "Maybe"], 2),
    "boolq": ({"passage": "Text.", "question": "is it true", "label": False}, "Text. Is it true?\n", ["Yes", "No"], 1),
    "wsc": ({"text": "Tom saw Ann. She waved.", "target": {"span1_text": "Ann", "span2_text": "She"}, "label": True},
            'Tom saw Ann. She waved.\nIn the previous sentence, does the pronoun "she" refer to Ann? Yes or No?\n',
            ["No", "Yes"], 1),
    "wic": ({"word": "bank", "sentence1": "S1.", "sentence2": "S2.", "label": False},
            'Does the word "bank" have the same meaning in these two sentences? Yes, No?\nS1.\nS2.\n', ["No", "Yes"], 0),
    "copa": ({"premise": "The man fell.", "choice1": "He slipped.", "choice2": "I pushed him.", "question": "cause",
              "label": 0}, "The man fell because ", ["he slipped.", "I pushed him."], 0),
}


@pytest.mark.parametrize("name", list(SNAPSHOTS))
def test_rendered_prompt_snapshot(name, tmp_path):
    row, prompt, continuations, label = SNAPSHOTS[name]
    example = load_task(name, tmp_path).build(row, tmp_path / "x", 1)
    assert (example.prompt, example.continuations, example.label) == (prompt, continuations, label)


def test_multirc_snapshot_from_official_layout(tmp_path):
    folder = tmp_path / "superglue" / "MultiRC"
    folder.mkdir(parents=True)
    row = {"idx": 0, "passage": {"text": "Para.", "questions": [{"question": "Q?", "idx": 0, "answers": [
        {"text": "A1", "label": 1, "idx": 0}, {"text": "A2", "label": 0, "idx": 1}]}]}}
    (folder / "val.jsonl").write_text(json.dumps(row) + "\n")
    examples = load_task("multirc", tmp_path).read_split("valid")
    assert examples[0].prompt == 'Para.\nQuestion: Q?\nI found this answer "A1". Is that correct? Yes or No?\n'
    assert [e.label for e in examples] == [1, 0] and examples[0].continuations == ["No", "Yes"]


def test_record_loader(tmp_path):
    folder = tmp_path / "superglue" / "ReCoRD"
    folder.mkdir(parents=True)
    text = "Paris is big.@highlight\nRome is old."
    row = {"source": "x", "passage": {"text": text, "entities": [{"start": 0, "end": 4}, {"start": 24, "end": 27}]},
           "qas": [{"query": "@placeholder is a city in Italy.", "answers": [{"start": 24, "end": 27, "text": "Rome"}],
                    "idx": 0}]}
    (folder / "val.jsonl").write_text(json.dumps(row) + "\n")
    [example] = load_task("record", tmp_path).read_split("valid")
    assert example.prompt == "Paris is big.- Rome is old.\n- "
    assert example.continuations == ["Paris is a city in Italy.", "Rome is a city in Italy."]
    assert example.label == 1 and example.correct == [1]


def test_squad_loader(tmp_path):
    folder = tmp_path / "squad"
    folder.mkdir()
    data = {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "C.", "qas": [
        {"id": "1", "question": "Q?", "answers": [{"text": "Ans", "answer_start": 0}, {"text": "Ans two", "answer_start": 0}]}]}]}]}
    (folder / "dev-v1.1.json").write_text(json.dumps(data))
    [example] = load_task("squad", tmp_path).read_split("valid")
    assert example.prompt == "Title: T\nContext: C.\nQuestion: Q?\nAnswer:"
    assert example.continuations == [" Ans"] and example.answers == ["Ans", "Ans two"]


def test_drop_loader(tmp_path):
    folder = tmp_path / "drop"
    folder.mkdir()
    data = {"nfl_1": {"passage": "P.", "qa_pairs": [
        {"question": "How many?", "answer": {"number": "3", "date": {"day": "", "month": "", "year": ""}, "spans": []},
         "validated_answers": [{"number": "three", "spans": []}], "query_id": "a"},
        {"question": "Who?", "answer": {"number": "", "date": {}, "spans": ["Tom", "Ann"]}, "query_id": "b"}]}}
    (folder / "drop_dataset_dev.json").write_text(json.dumps(data))
    first, second = load_task("drop", tmp_path).read_split("valid")
    assert first.prompt == "Passage: P.\nQuestion: How many?\nAnswer:" and first.answers == ["3", "three"]
    assert second.continuations == [" Tom, Ann"]


def test_f1_and_exact_match_known_cases():
    assert f1_score("The Eiffel Tower", "eiffel tower") == 1.0
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert f1_score("tower in Paris", "Eiffel tower") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert f1_score("nothing", "else") == 0.0
    assert best_over_answers(f1_score, "red car", ["blue car", "red car"]) == 1.0


def test_malformed_jsonl_names_file_and_line(tmp_path):
    folder = tmp_path / "superglue" / "RTE"
    folder.mkdir(parents=True)
    good = json.dumps({"premise": "p", "hypothesis": "h", "label": "entailment"})
    (folder / "val.jsonl").write_text(good + "\n" + good[:-5] + "\n")
    with pytest.raises(DlzoError, match=r"val\.jsonl:2: not valid JSON"):
        load_task("rte", tmp_path).read_split("valid")
    (folder / "val.jsonl").write_text(good + "\n" + json.dumps({"premise": "p", "hypothesis": "h"}) + "\n")
    with pytest.raises(DlzoError, match=r"val\.jsonl:2: missing field 'label'"):
        load_task("rte", tmp_path).read_split("valid")
    (folder / "val.jsonl").write_text(good + "\n" + good + "\n[1, 2]\n")
    with pytest.raises(DlzoError, match=r"val\.jsonl:3: expected a JSON object, not list"):
        load_task("rte", tmp_path).read_split("valid")
    (folder / "val.jsonl").write_bytes(good.encode() + b"\n" + good.replace("p", "\xe9").encode("latin-1") + b"\n")
    with pytest.raises(DlzoError, match=r"val\.jsonl: not UTF-8 text"):
        load_task("rte", tmp_path).read_split("valid")


def test_unknown_label_lists_allowed_values(tmp_path):
    folder = tmp_path / "superglue" / "CB"
    folder.mkdir(parents=True)
    (folder / "val.jsonl").write_text(json.dumps({"premise": "p", "hypothesis": "h", "label": "maybe"}) + "\n")
    with pytest.raises(DlzoError, match=r"label 'maybe' is not one of \['entailment', 'contradiction', 'neutral'\]"):
        load_task("cb", tmp_path).read_split("valid")


@pytest.mark.slow
@pytest.mark.requires_shared
def test_malformed_tsv_via_cli_is_one_line_exit_2(tmp_path):
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\ngood movie\t1\nbad movie\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    from conftest import STORIES

    run = subprocess.run([sys.executable, "-m", "dlzo", "eval", "--task", "sst2", "--model", str(STORIES),
                          "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == f"dlzo: error: {folder / 'train.tsv'}:3: expected 2 tab-separated fields, got 1"
    assert not (tmp_path / "o" / "eval.json").exists()


@pytest.mark.requires_shared
def test_unknown_task_is_an_error():
    with pytest.raises(DlzoError, match="is not one of"):
        load_task("mnli", DATA)


def test_example_defaults():
    assert Example("p", ["a"], 0).answers == []
