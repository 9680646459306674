"""Fine-tune on your own data: rows from a file or a Hugging Face dataset become Examples that the trainer
scores exactly as it scores the benchmark tasks.

Four formats (text, prompt-completion, chat, classification: the table in dlzo.data.formats), detected from
the rows' fields or forced with `data_format`; the sources are read by dlzo.data.readers.

Every mistake in the input is a DlzoError of one line naming the file and its line (or row, or column).
Nothing is written (datasets.load_dataset keeps its own cache for hf: sources).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np

from dlzo.data.examples import Example, Splits
from dlzo.data.formats import FORMATS, DataFormat, _check_format, _example, _used_fields
from dlzo.data.hub import is_hub_source
from dlzo.data.readers import _mapped, parse_columns, read_rows
from dlzo.errors import DlzoError


@dataclass
class UserData:
    train: list[Example]
    dev: list[Example]
    format: str  # one of FORMATS
    generation: bool  # text, prompt-completion, chat: NLL of the scored tokens; classification: CE over options
    split_record: dict  # where train and dev came from, row by row (for run.json)
    notes: list[str] = field(default_factory=list)
    name: str = ""  # a short name of the source, for logs and results


class UserTask:
    """Stands where the trainer uses a benchmark `Task`: a name, the metric, generation or not, and splits.
    Classification is evaluated by accuracy; generation data by its dev loss ("loss")."""

    default_num_dev = 500

    def __init__(self, data: UserData):
        self.data = data
        self.name = data.name
        self.generation = data.generation
        self.metric = "loss" if data.generation else "accuracy"
        self.format = data.format

    def splits(self, seed: int = 0, num_train: int | None = None, num_dev: int | None = None,
               num_test: int = 0) -> Splits:
        """All the training rows and the dev rows, as load_user_data split them (the arguments are accepted
        for Task's signature and ignored: the split was made, seeded, when the data was loaded). No test set."""
        return Splits(list(self.data.train), list(self.data.dev), [], list(self.data.notes))

    def has_split(self, split: str) -> bool:
        return split in ("train", "valid")

    def read_split(self, split: str) -> list[Example]:
        return list(self.data.train if split == "train" else self.data.dev)

    def prompt_text(self, example: Example) -> str:
        return example.prompt + example.continuations[example.label]


def load_user_data(source: str, tokenizer=None, data_format: str = "auto", columns: str = "",
                   eval_source: str = "", eval_fraction: float = 0.1, seed: int = 0, max_eval: int = 500,
                   max_length: int = 0) -> UserData:
    """Read `source` (and `eval_source`) into train and dev Examples.

    Without `eval_source`, a seeded `eval_fraction` of the rows (at least 1, at most `max_eval`) is held out
    as the dev set; with it, its rows (a seeded sample of `max_eval` when more) are the dev set. Chat rows
    need `tokenizer` (its chat template renders them). With `tokenizer` and `max_length`, the notes count the
    rows longer than `max_length` tokens, whose prompts encode() cuts from the left."""
    source, eval_source = str(source), str(eval_source or "")
    if data_format not in get_args(DataFormat):
        raise DlzoError(f"--data-format {data_format!r} is not one of auto, {', '.join(FORMATS)}")
    if max_eval < 1:
        raise DlzoError(f"max_eval must be at least 1, not {max_eval}")
    mapping = parse_columns(columns)
    rows = _mapped(read_rows(source, mapping), mapping, source)
    fmt = _check_format(rows, data_format, source)
    train_all = [_example(row, fmt, tokenizer, source) for row in rows]
    notes = []
    ignored = sorted({k for row in rows for k in row.fields} - set(_used_fields(fmt)))
    if ignored:
        notes.append(f"{source}: fields not used by the {fmt} format are ignored: {', '.join(ignored)}")
    record = {"format": fmt, "columns": mapping, "seed": seed, "row_numbering": "1-based data rows in file order "
              "(blank lines and a CSV header are not rows)", "train_source": source}
    if eval_source:
        eval_rows = _mapped(read_rows(eval_source, mapping), mapping, eval_source)
        eval_fmt = _check_format(eval_rows, data_format, eval_source)
        if eval_fmt != fmt:
            raise DlzoError(f"{eval_source}: its rows are {eval_fmt}, but those of {source} are {fmt}")
        dev_all = [_example(row, fmt, tokenizer, eval_source) for row in eval_rows]
        picked = sorted(np.random.RandomState(seed).permutation(len(dev_all))[:max_eval].tolist())
        if len(picked) < len(dev_all):
            notes.append(f"{eval_source}: {len(picked)} of its {len(dev_all)} rows (a seeded sample) are the dev set")
        train, dev = train_all, [dev_all[i] for i in picked]
        record.update(dev_source=eval_source, train_rows=row_ranges([r.number for r in rows]),
                      dev_rows=row_ranges([eval_rows[i].number for i in picked]), eval_fraction=None)
    else:
        if not 0 < eval_fraction < 1:
            raise DlzoError(f"--eval-fraction must be between 0 and 1, not {eval_fraction}")
        held = held_out(source, len(rows), eval_fraction, max_eval, seed)
        train = [e for i, e in enumerate(train_all) if i not in held]
        dev = [e for i, e in enumerate(train_all) if i in held]
        record.update(dev_source=source, train_rows=row_ranges([r.number for i, r in enumerate(rows) if i not in held]),
                      dev_rows=row_ranges([r.number for i, r in enumerate(rows) if i in held]),
                      eval_fraction=eval_fraction)
        notes.append(f"{source}: {len(dev)} of {len(rows)} rows held out as the dev set "
                     f"(eval_fraction {eval_fraction}, at most {max_eval}, seed {seed})")
    record.update(num_train=len(train), num_dev=len(dev))
    if tokenizer is not None and max_length > 0:
        cut = count_truncated(train + dev, tokenizer, max_length)
        record["rows_truncated"] = cut
        if cut:
            notes.append(f"{cut} of {len(train) + len(dev)} rows are longer than {max_length} tokens: encode() cuts "
                         f"their prompts from the left, keeping the completion (a text row loses its end)")
    return UserData(train, dev, fmt, fmt != "classification", record, notes, name=source_name(source))


def held_out(source: str, count: int, eval_fraction: float, max_eval: int, seed: int) -> set[int]:
    """The indices of `source`'s rows held out as the dev set: a seeded `eval_fraction` of `count` rows, at least
    1, at most `max_eval`, never all of them (so a file needs 2 rows)."""
    if count < 2:
        raise DlzoError(f"{source}: only 1 row; at least 2 are needed to hold one out for evaluation "
                        f"(or pass --eval-data)")
    num_dev = min(max_eval, max(1, round(eval_fraction * count)), count - 1)
    return set(np.random.RandomState(seed).permutation(count)[:num_dev].tolist())


def file_digest(source: str) -> str | None:
    """sha256 of a local data file (None for hf: sources and no file), so --resume can tell it changed and
    `dlzo eval --run` can tell a run's own file by its content, however the path is spelled."""
    if not source or is_hub_source(source) or not Path(source).is_file():
        return None
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()


def source_name(source: str) -> str:
    return source if is_hub_source(source) else Path(source).stem


def count_truncated(examples: list[Example], tokenizer, max_length: int) -> int:
    """How many examples are longer than max_length tokens (encode() cuts their prompts from the left)."""
    owners, texts = [], []
    for index, example in enumerate(examples):
        continuations = example.continuations[:1] if getattr(example, "spans", None) else example.continuations
        owners.extend([index] * len(continuations))
        texts.extend(example.prompt + c for c in continuations)
    long = set()
    for start in range(0, len(texts), 1024):  # one call per chunk: fast tokenizers batch it
        ids = tokenizer(texts[start : start + 1024], add_special_tokens=True, verbose=False)["input_ids"]
        long.update(owners[start + i] for i, row in enumerate(ids) if len(row) > max_length)
    return len(long)


def row_ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 5, 7, 8] -> "1-3,5,7-8"."""
    parts: list[str] = []
    numbers = sorted(numbers)
    start = previous = None
    for n in [*numbers, None]:
        if start is not None and (n is None or n != previous + 1):
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if start is None:
            start = n
        previous = n
    return ",".join(parts)

