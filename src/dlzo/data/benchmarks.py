"""The benchmark tasks: MeZO's prompt templates, loaders for the official files (or the Hugging Face hub with
`--data-dir hf`) and MeZO's sampling.

A task turns an official example into an `Example`: a prompt (context) and the continuations to score.
Classification tasks score each candidate continuation; generation tasks (SQuAD, DROP) have one gold
continuation for the LM loss and are evaluated by greedy generation.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dlzo.data.examples import Example, Splits
from dlzo.data.hub import HUB_PREFIX, parse_hub_source
from dlzo.data.official_files import label_index, read_json, read_jsonl, split_file
from dlzo.errors import DlzoError

HUB_SPLITS = {"train": "train", "valid": "validation"}


class Task:
    """A benchmark task. Subclasses give the file layout, how to read a row, and the template.

    Rows come from the official files under `data_dir`, or, with `data_dir="hf"`, from the Hugging Face
    dataset named in `hub` (whose rows `hub_row` turns into the official row layout, so one `build` and one
    template serve both sources)."""

    name: str = ""
    metric: str = "accuracy"
    generation: bool = False
    default_num_dev: int = 500
    folder: str = ""
    splits_files: dict[str, str] = {"train": "train.jsonl", "valid": "val.jsonl"}
    required: tuple[str, ...] = ()
    hub: tuple[str, str | None] = ("", None)  # Hugging Face dataset and config holding the same data
    hub_labels: dict[str, object] = {}  # the hub's ClassLabel name -> the official file's label value

    def __init__(self, data_dir: str | Path):
        # `hf`: each task's dataset; `hf:PATH[:CONFIG]`: a mirror; anything else: a folder of official files
        self.hub_source = parse_hub_source(data_dir)
        if self.hub_source is not None and self.hub_source.split is not None:
            raise DlzoError(f"--data-dir {data_dir}: a task reads its own train and validation splits; give hf or "
                            f"hf:PATH[:CONFIG]")
        self.data_dir = Path(data_dir)

    def files(self) -> dict[str, Path]:
        return {split: self.data_dir / self.folder / name for split, name in self.splits_files.items()}

    def has_split(self, split: str) -> bool:
        if self.hub_source is not None:
            return split in HUB_SPLITS
        return self.files().get(split, Path("/nonexistent")).exists()

    def read_split(self, split: str) -> list[Example]:
        if self.hub_source is not None:
            return self.read_hub(split)
        return self.read_files(split)

    def read_files(self, split: str) -> list[Example]:
        path = split_file(self.data_dir / self.folder, self.files(), split)
        rows = read_jsonl(path, self.required)
        return [self.build(row, path, number) for number, row in enumerate(rows, start=1)]

    def build(self, row: dict, path: Path, number: int) -> Example:
        raise NotImplementedError

    def passages(self, split: str, keys: tuple[str, ...]) -> Iterator[tuple[Path, int, dict, dict]]:
        """(path, line number, row, passage) of a JSONL split whose rows nest a 'passage' object with `keys`."""
        path = split_file(self.data_dir / self.folder, self.files(), split)
        for number, row in enumerate(read_jsonl(path, self.required), start=1):
            passage = row["passage"]
            if not isinstance(passage, dict) or not all(key in passage for key in keys):
                raise DlzoError(f"{path}:{number}: field 'passage' needs " + " and ".join(f"'{k}'" for k in keys))
            yield path, number, row, passage

    # ------------------------------------------------------------------------------ Hugging Face hub

    def hub_dataset(self) -> tuple[str, str | None]:
        """(dataset path, config) to load: the task's own, or the --data-dir override."""
        path, config, _ = self.hub_source or (None, None, None)
        # A mirror of the same multi-config dataset keeps the task's config unless one is given.
        return path or self.hub[0], config or self.hub[1]

    def read_hub(self, split: str) -> list[Example]:
        try:
            import datasets
        except ImportError:
            raise DlzoError(f"--data-dir {HUB_PREFIX} needs the datasets package: pip install 'dlzo[hub]'") from None
        path, config = self.hub_dataset()
        where = f"{HUB_PREFIX}:{path}{':' + config if config else ''}[{HUB_SPLITS[split]}]"
        try:
            dataset = datasets.load_dataset(path, config, split=HUB_SPLITS[split])
        except Exception as err:  # offline, unknown name or config: all user-facing, all one line
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DlzoError(f"could not load {where} with datasets.load_dataset: {reason}") from None
        label_names = getattr(dataset.features.get("label"), "names", None)
        examples = []
        for number, row in enumerate(dataset, start=1):
            if label_names is not None and row.get("label", -1) >= 0:
                name = label_names[row["label"]]
                row = {**row, "label": label_index(where, number, name, self.hub_labels) if self.hub_labels else name}
            empty = next((key for key, value in row.items() if value is None), None)
            if empty is not None:
                raise DlzoError(f"{where}:{number}: field '{empty}' is empty")
            try:
                examples.extend(self.from_hub(row, where, number))
            except KeyError as err:
                raise DlzoError(f"{where}:{number}: missing field {err}") from None
        return examples

    def from_hub(self, row: dict, where: str, number: int) -> list[Example]:
        return [self.build(self.hub_row(row), where, number)]

    def hub_row(self, row: dict) -> dict:
        """A hub row in the official row layout (most tasks: already the same)."""
        return row

    def prompt_text(self, example: Example) -> str:
        return example.prompt + example.continuations[example.label]

    # MeZO's protocol: train+dev drawn together from the train split with the seed, dev = the last
    # num_dev of them; test drawn from the validation split with the same seed (all of it when smaller).
    def splits(self, seed: int = 0, num_train: int = 1000, num_dev: int | None = None,
               num_test: int = 1000) -> Splits:
        num_dev = self.default_num_dev if num_dev is None else num_dev
        notes = []
        valid = self.read_split("valid")
        if self.has_split("train"):
            train_pool = self.read_split("train")
            picked = _sample(train_pool, seed, num_train + num_dev)
            dev, train = (picked[-num_dev:], picked[:-num_dev]) if num_dev else ([], picked)
            test = _sample(valid, seed, num_test)
            if num_train + num_dev > len(train_pool):
                notes.append(f"{self.name}: only {len(train_pool)} training examples, so train={len(train)} "
                             f"and dev={len(dev)} (dev is taken first, as MeZO does)")
        else:
            # No train file (BoolQ in ../shared): train, dev and test all come from the validation file,
            # disjointly. Results are not comparable with papers that train on the official train split.
            order = _sample(valid, seed, len(valid))
            train, dev = order[:num_train], order[num_train : num_train + num_dev]
            test = order[num_train + num_dev :][:num_test]
            notes.append(f"WARNING {self.name}: no train file in {self.data_dir / self.folder}; train, dev and test "
                         f"are drawn disjointly from the validation file ({len(train)}/{len(dev)}/{len(test)})")
        return Splits(train, dev, test, notes)


def _sample(items: list, seed: int, num: int) -> list:
    """MeZO's sample_subset: the first `num` of a seeded numpy permutation."""
    order = np.random.RandomState(seed).permutation(len(items)).tolist()
    return [items[i] for i in order[:num]]


class SST2(Task):
    name, folder = "sst2", "glue/SST-2"
    splits_files = {"train": "train.tsv", "valid": "dev.tsv"}
    hub, hub_labels = ("nyu-mll/glue", "sst2"), {"negative": 0, "positive": 1}

    def read_files(self, split: str) -> list[Example]:
        path = split_file(self.data_dir / self.folder, self.files(), split)
        examples = []
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None or header[:2] != ["sentence", "label"]:
                raise DlzoError(f"{path}:1: expected the header 'sentence<TAB>label', got {header}")
            for number, row in enumerate(reader, start=2):
                if len(row) != 2:
                    raise DlzoError(f"{path}:{number}: expected 2 tab-separated fields, got {len(row)}")
                label = label_index(path, number, row[1].strip(), {"0": 0, "1": 1})
                examples.append(self.build({"sentence": row[0], "label": label}, path, number))
        return examples

    def build(self, row, path, number):
        return Example(f"{row['sentence'].strip()} It was", [" terrible", " great"], row["label"])


class RTE(Task):
    name, folder, required = "rte", "superglue/RTE", ("premise", "hypothesis", "label")
    hub, hub_labels = ("aps/super_glue", "rte"), {"entailment": "entailment", "not_entailment": "not_entailment"}

    def build(self, row, path, number):
        label = label_index(path, number, row["label"], {"entailment": 0, "not_entailment": 1})
        prompt = f"{row['premise']}\nDoes this mean that \"{row['hypothesis']}\" is true? Yes or No?\n"
        return Example(prompt, ["Yes", "No"], label)


class CB(Task):
    name, folder, required, default_num_dev = "cb", "superglue/CB", ("premise", "hypothesis", "label"), 100
    hub = ("aps/super_glue", "cb")
    hub_labels = {"entailment": "entailment", "contradiction": "contradiction", "neutral": "neutral"}

    def build(self, row, path, number):
        label = label_index(path, number, row["label"], {"entailment": 0, "contradiction": 1, "neutral": 2})
        prompt = f"Suppose {row['premise']} Can we infer that \"{row['hypothesis']}\"? Yes, No, or Maybe?\n"
        return Example(prompt, ["Yes", "No", "Maybe"], label)


class BoolQ(Task):
    name, folder, required = "boolq", "superglue/BoolQ", ("passage", "question", "label")
    hub, hub_labels = ("aps/super_glue", "boolq"), {"False": False, "True": True}

    def build(self, row, path, number):
        label = label_index(path, number, row["label"], {True: 0, False: 1})
        question = row["question"]
        question = question[0].upper() + question[1:] + ("" if question.endswith("?") else "?")
        return Example(f"{row['passage']} {question}\n", ["Yes", "No"], label)


class WSC(Task):
    name, folder, required = "wsc", "superglue/WSC", ("text", "target", "label")
    hub, hub_labels = ("aps/super_glue", "wsc.fixed"), {"False": False, "True": True}

    def hub_row(self, row):
        target = {"span1_text": row["span1_text"], "span2_text": row["span2_text"]}
        return {"text": row["text"], "target": target, "label": row["label"]}

    def build(self, row, path, number):
        label = label_index(path, number, row["label"], {False: 0, True: 1})
        target = row["target"]
        if not isinstance(target, dict) or not {"span1_text", "span2_text"} <= set(target):
            raise DlzoError(f"{path}:{number}: field 'target' needs span1_text and span2_text")
        prompt = (f"{row['text']}\nIn the previous sentence, does the pronoun \"{target['span2_text'].lower()}\" "
                  f"refer to {target['span1_text']}? Yes or No?\n")
        return Example(prompt, ["No", "Yes"], label)


class WiC(Task):
    name, folder, required = "wic", "superglue/WiC", ("word", "sentence1", "sentence2", "label")
    hub, hub_labels = ("aps/super_glue", "wic"), {"False": False, "True": True}

    def build(self, row, path, number):
        label = label_index(path, number, row["label"], {False: 0, True: 1})
        prompt = (f"Does the word \"{row['word']}\" have the same meaning in these two sentences? Yes, No?\n"
                  f"{row['sentence1']}\n{row['sentence2']}\n")
        return Example(prompt, ["No", "Yes"], label)


class MultiRC(Task):
    """One example per answer option (MeZO's accuracy is per option)."""

    name, folder, required = "multirc", "superglue/MultiRC", ("passage",)
    hub, hub_labels = ("aps/super_glue", "multirc"), {"False": 0, "True": 1}

    def from_hub(self, row, where, number):
        return [_multirc_example(row["paragraph"], row["question"], row["answer"], row["label"])]

    def read_files(self, split: str) -> list[Example]:
        examples = []
        for path, number, _, passage in self.passages(split, ("text", "questions")):
            for question in passage["questions"]:
                for answer in question.get("answers", []):
                    if "text" not in answer or "label" not in answer:
                        raise DlzoError(f"{path}:{number}: an answer is missing 'text' or 'label'")
                    label = label_index(path, number, answer["label"], {0: 0, 1: 1})
                    examples.append(_multirc_example(passage["text"], question["question"], answer["text"], label))
        return examples


def _multirc_example(paragraph: str, question: str, answer: str, label: int) -> Example:
    prompt = (f"{paragraph}\nQuestion: {question}\nI found this answer \"{answer}\". Is that correct? "
              f"Yes or No?\n")
    return Example(prompt, ["No", "Yes"], label)


class COPA(Task):
    name, folder, required, default_num_dev = "copa", "superglue/COPA", ("premise", "choice1", "choice2", "question", "label"), 100
    hub, hub_labels = ("aps/super_glue", "copa"), {"choice1": 0, "choice2": 1}

    def build(self, row, path, number):
        label = label_index(path, number, row["label"], {0: 0, 1: 1})
        conjunction = {"effect": " so ", "cause": " because "}.get(row["question"])
        if conjunction is None:
            raise DlzoError(f"{path}:{number}: field 'question' is {row['question']!r}, not 'cause' or 'effect'")
        premise = row["premise"].rstrip()
        premise = premise[:-1] if premise.endswith(".") else premise
        return Example(premise + conjunction, [_copa_case(row["choice1"]), _copa_case(row["choice2"])], label)


def _copa_case(choice: str) -> str:
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


class ReCoRD(Task):
    """Classification over the passage's entities, each substituted into the query."""

    name, folder, required = "record", "superglue/ReCoRD", ("passage", "qas")
    hub = ("aps/super_glue", "record")

    def from_hub(self, row, where, number):
        example = _record_example(row["passage"], row["entities"], row["query"], set(row["answers"]))
        return [example] if example else []

    def read_files(self, split: str) -> list[Example]:
        examples = []
        for path, number, row, passage in self.passages(split, ("text", "entities")):
            text = passage["text"]
            entities = [text[e["start"] : e["end"] + 1] for e in passage["entities"]]
            for qa in row["qas"]:
                if "query" not in qa:
                    raise DlzoError(f"{path}:{number}: a qas entry is missing 'query'")
                example = _record_example(text, entities, qa["query"], {a["text"] for a in qa.get("answers", [])})
                if example:
                    examples.append(example)
        return examples


def _record_example(text: str, entities: list[str], query: str, gold: set[str]) -> Example | None:
    """None for an unanswerable query (MeZO skips these too)."""
    entities = list(dict.fromkeys(entities))
    correct = [i for i, e in enumerate(entities) if e in gold]
    if not correct:
        return None
    context = text.replace("@highlight\n", "- ").strip() + "\n- "
    options = [query.replace("@placeholder", e) for e in entities]
    return Example(context, options, correct[0], answers=sorted(gold), correct=correct)


class SQuAD(Task):
    name, folder, metric, generation = "squad", "squad", "f1", True
    splits_files = {"train": "train-v1.1.json", "valid": "dev-v1.1.json"}
    hub = ("rajpurkar/squad", None)

    def from_hub(self, row, where, number):
        answers = list(row["answers"]["text"])
        if not answers:
            raise DlzoError(f"{where}:{number}: question {row.get('id', '?')} has no answers")
        return [_squad_example(row["title"], row["context"], row["question"], answers)]

    def read_files(self, split: str) -> list[Example]:
        path = split_file(self.data_dir / self.folder, self.files(), split)
        data = read_json(path)
        if not isinstance(data, dict) or "data" not in data:
            raise DlzoError(f"{path}: expected a SQuAD v1.1 object with a 'data' list")
        examples = []
        for article_number, article in enumerate(data["data"]):
            for paragraph in article.get("paragraphs", []):
                for qa in paragraph.get("qas", []):
                    answers = [a["text"] for a in qa.get("answers", [])]
                    if not answers:
                        raise DlzoError(f"{path}: question {qa.get('id', '?')} in article {article_number} has no answers")
                    examples.append(_squad_example(article.get("title", ""), paragraph["context"], qa["question"],
                                                   answers))
        return examples


def _squad_example(title: str, context: str, question: str, answers: list[str]) -> Example:
    prompt = f"Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:"
    return Example(prompt, [" " + answers[0]], 0, answers=answers)


class DROP(Task):
    name, folder, metric, generation = "drop", "drop", "f1", True
    splits_files = {"train": "drop_dataset_train.json", "valid": "drop_dataset_dev.json"}
    hub = ("ucinlp/drop", None)

    def from_hub(self, row, where, number):
        # The hub keeps the main answer only, as a list of spans (a number or a date is one span).
        answer = ", ".join(row["answers_spans"]["spans"])
        return [_drop_example(row["passage"], row["question"], [answer])] if answer else []

    def read_files(self, split: str) -> list[Example]:
        path = split_file(self.data_dir / self.folder, self.files(), split)
        data = read_json(path)
        if not isinstance(data, dict):
            raise DlzoError(f"{path}: expected a DROP object keyed by passage id")
        examples = []
        for passage_id, item in data.items():
            if "passage" not in item or "qa_pairs" not in item:
                raise DlzoError(f"{path}: passage {passage_id} needs 'passage' and 'qa_pairs'")
            for qa in item["qa_pairs"]:
                answers = [_drop_answer(a) for a in [qa["answer"], *qa.get("validated_answers", [])]]
                answers = [a for a in dict.fromkeys(answers) if a]
                if not answers:
                    continue
                examples.append(_drop_example(item["passage"], qa["question"], answers))
        return examples


def _drop_example(passage: str, question: str, answers: list[str]) -> Example:
    prompt = f"Passage: {passage}\nQuestion: {question}\nAnswer:"
    return Example(prompt, [" " + answers[0]], 0, answers=answers)


def _drop_answer(answer: dict) -> str:
    if answer.get("number"):
        return str(answer["number"])
    if answer.get("spans"):
        return ", ".join(answer["spans"])
    date = answer.get("date") or {}
    return " ".join(str(date[k]) for k in ("month", "day", "year") if date.get(k))


TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (SST2, RTE, CB, BoolQ, WSC, WiC, MultiRC, COPA, ReCoRD, SQuAD, DROP)
}


def load_task(name: str, data_dir: str | Path) -> Task:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise DlzoError(f"--task {name!r} is not one of {', '.join(TASKS)}")
    return TASKS[key](data_dir)


def task_splits(task: Task, seed: int = 0, num_train: int = 1000, num_dev: int | None = None,
                num_test: int = 1000) -> Splits:
    splits = task.splits(seed, num_train, num_dev, num_test)
    for note in splits.notes:
        print(note, file=sys.stderr)
    return splits

