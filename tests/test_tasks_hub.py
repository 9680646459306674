"""`--data-dir hf`: tasks read from Hugging Face `datasets` must give exactly the examples of the official files.

The hub cannot be reached here, so each test converts official rows into the hub's schema (as published on
the hub: integer ClassLabel labels, flattened MultiRC/ReCoRD, SQuAD answers as lists) and serves them through
a patched `datasets.load_dataset`."""

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import DATA, STORIES
from dlzo.data.benchmarks import load_task
from dlzo.data.hub import parse_hub_source
from dlzo.errors import DlzoError

datasets = pytest.importorskip("datasets")

NAMES = {  # the hub's ClassLabel names, in the hub's order
    "sst2": ["negative", "positive"], "rte": ["entailment", "not_entailment"],
    "cb": ["entailment", "contradiction", "neutral"], "boolq": ["False", "True"], "wsc": ["False", "True"],
    "wic": ["False", "True"], "copa": ["choice1", "choice2"], "multirc": ["False", "True"],
}
FOLDERS = {"rte": "RTE", "cb": "CB", "boolq": "BoolQ", "wsc": "WSC", "wic": "WiC", "copa": "COPA",
           "multirc": "MultiRC"}


def official_rows(task: str, count: int) -> list[dict]:
    if task == "sst2":
        with open(DATA / "glue" / "SST-2" / "dev.tsv", encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            return [row for _, row in zip(range(count), reader)]
    with open(DATA / "superglue" / FOLDERS[task] / "val.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(count), handle)]


def as_hub_rows(task: str, rows: list[dict]) -> list[dict]:
    """Official rows in the hub's schema."""
    label = {name: index for index, name in enumerate(NAMES[task])}
    if task == "sst2":
        return [{"sentence": r["sentence"], "label": int(r["label"]), "idx": i} for i, r in enumerate(rows)]
    if task == "multirc":
        return [{"paragraph": r["passage"]["text"], "question": q["question"], "answer": a["text"],
                 "label": a["label"]} for r in rows for q in r["passage"]["questions"] for a in q["answers"]]
    hub = []
    for index, row in enumerate(rows):
        value = row["label"]
        value = label[str(value)] if task in ("boolq", "wsc", "wic") else value
        value = label[value] if task in ("rte", "cb") else value
        row = {**{k: v for k, v in row.items() if k not in ("target", "label")}, "label": value, "idx": index}
        if task == "wsc":
            target = rows[index]["target"]
            row.update(span1_text=target["span1_text"], span2_text=target["span2_text"],
                       span1_index=target["span1_index"], span2_index=target["span2_index"])
        hub.append(row)
    return hub


def serve(monkeypatch, table: dict, names: list[str] | None = None) -> list:
    """Patch datasets.load_dataset to serve `table[(path, config, split)]`; returns the calls made."""
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        rows = table[(path, name, split)]
        dataset = datasets.Dataset.from_list(rows)
        if names is not None:
            dataset = dataset.cast_column("label", datasets.ClassLabel(names=names))
        return dataset

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("task,hub", [
    ("sst2", ("nyu-mll/glue", "sst2")), ("rte", ("aps/super_glue", "rte")), ("cb", ("aps/super_glue", "cb")),
    ("boolq", ("aps/super_glue", "boolq")), ("wsc", ("aps/super_glue", "wsc.fixed")),
    ("wic", ("aps/super_glue", "wic")), ("copa", ("aps/super_glue", "copa")),
    ("multirc", ("aps/super_glue", "multirc")),
])
@pytest.mark.requires_shared
def test_hub_rows_give_the_official_examples(task, hub, monkeypatch):
    rows = official_rows(task, 2 if task == "multirc" else 40)
    calls = serve(monkeypatch, {(*hub, "validation"): as_hub_rows(task, rows)}, NAMES[task])
    from_hub = load_task(task, "hf").read_split("valid")
    assert calls == [(*hub, "validation")]
    from_files = load_task(task, DATA).read_split("valid")[: len(from_hub)]
    assert len(from_hub) == (len(rows) if task != "multirc" else sum(
        len(q["answers"]) for r in rows for q in r["passage"]["questions"]))
    assert from_hub == from_files
    assert {e.label for e in from_hub} == set(range(len(from_hub[0].continuations)))  # both classes occur


@pytest.mark.requires_shared
def test_hub_sampling_follows_mezo_protocol_with_a_train_split(monkeypatch):
    # BoolQ has no train file in ../shared, but the hub has a train split: the usual protocol applies.
    rows = as_hub_rows("boolq", official_rows("boolq", 60))
    serve(monkeypatch, {("aps/super_glue", "boolq", "train"): rows[:40],
                        ("aps/super_glue", "boolq", "validation"): rows[40:]}, NAMES["boolq"])
    splits = load_task("boolq", "hf").splits(seed=0, num_train=30, num_dev=10, num_test=20)
    assert not splits.notes
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (30, 10, 20)
    assert not {e.prompt for e in splits.train + splits.dev} & {e.prompt for e in splits.test}


def test_record_squad_drop_from_hub_schema(monkeypatch):
    text = "Paris is big.@highlight\nRome is old."
    record = {"passage": text, "query": "@placeholder is a city in Italy.", "entities": ["Paris", "Rome", "Paris"],
              "entity_spans": {}, "answers": ["Rome"], "idx": {"passage": 0, "query": 0}}
    unanswerable = {**record, "answers": ["Milan"]}
    squad = {"id": "1", "title": "T", "context": "C.", "question": "Q?",
             "answers": {"text": ["Ans", "Ans two"], "answer_start": [0, 0]}}
    drop = {"section_id": "nfl_1", "query_id": "b", "passage": "P.", "question": "Who?",
            "answers_spans": {"spans": ["Tom", "Ann"], "types": ["span", "span"]}}
    serve(monkeypatch, {("aps/super_glue", "record", "validation"): [record, unanswerable],
                        ("rajpurkar/squad", None, "validation"): [squad],
                        ("ucinlp/drop", None, "validation"): [drop]})
    [example] = load_task("record", "hf").read_split("valid")
    # the same example as the official-layout loader's (tests/test_tasks.py::test_record_loader)
    assert example.prompt == "Paris is big.- Rome is old.\n- "
    assert example.continuations == ["Paris is a city in Italy.", "Rome is a city in Italy."]
    assert example.label == 1 and example.correct == [1]
    [example] = load_task("squad", "hf").read_split("valid")
    assert example.prompt == "Title: T\nContext: C.\nQuestion: Q?\nAnswer:"
    assert example.continuations == [" Ans"] and example.answers == ["Ans", "Ans two"]
    [example] = load_task("drop", "hf").read_split("valid")
    assert example.prompt == "Passage: P.\nQuestion: Who?\nAnswer:" and example.continuations == [" Tom, Ann"]


@pytest.mark.requires_shared
def test_hub_mirror_and_config_override(monkeypatch):
    rows = as_hub_rows("rte", official_rows("rte", 3))
    calls = serve(monkeypatch, {("me/sg", "rte", "validation"): rows, ("me/rte-only", "plain", "validation"): rows},
                  NAMES["rte"])
    assert len(load_task("rte", "hf:me/sg").read_split("valid")) == 3
    assert len(load_task("rte", "hf:me/rte-only:plain").read_split("valid")) == 3
    assert calls == [("me/sg", "rte", "validation"), ("me/rte-only", "plain", "validation")]
    assert parse_hub_source("../shared/data") is None and parse_hub_source("hf") == (None, None, None)
    with pytest.raises(DlzoError, match="--data-dir hf:me/sg:rte:train: a task reads its own train and validation"):
        load_task("rte", "hf:me/sg:rte:train")


@pytest.mark.requires_shared
def test_hub_row_errors_name_the_dataset_and_row(monkeypatch):
    rows = as_hub_rows("wsc", official_rows("wsc", 3))
    rows[2]["span1_text"] = None
    serve(monkeypatch, {("aps/super_glue", "wsc.fixed", "validation"): rows}, NAMES["wsc"])
    with pytest.raises(DlzoError, match=r"^hf:aps/super_glue:wsc\.fixed\[validation\]:3: field 'span1_text' is empty$"):
        load_task("wsc", "hf").read_split("valid")
    for row in rows:  # a mirror with another schema
        del row["span1_text"]
    with pytest.raises(DlzoError, match=r"^hf:aps/super_glue:wsc\.fixed\[validation\]:1: missing field 'span1_text'$"):
        load_task("wsc", "hf").read_split("valid")
    serve(monkeypatch, {("aps/super_glue", "copa", "validation"): as_hub_rows("copa", official_rows("copa", 2))},
          ["first", "second"])  # a mirror whose labels mean something else must not be read silently
    with pytest.raises(DlzoError, match=r"copa\[validation\]:1: label '(first|second)' is not one of \['choice1', 'choice2'\]"):
        load_task("copa", "hf").read_split("valid")


@pytest.mark.slow
@pytest.mark.requires_shared
def test_offline_hub_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-m", "dlzo", "eval", "--task", "rte", "--model", str(STORIES),
                          "--data-dir", "hf", "--num-test", "4", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.strip().splitlines()[-1:]
    assert line.startswith("dlzo: error: could not load hf:aps/super_glue:rte[") and "load_dataset" in line
    assert "Traceback" not in run.stderr
