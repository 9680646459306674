"""Fine-tune on your own data: rows from a file or a Hugging Face dataset become Examples that the trainer
scores exactly as it scores the benchmark tasks.

Four formats, detected from the rows' fields (or forced with `data_format`):

- text               {"text": ...}                                   loss on every token
- prompt-completion  {"prompt": ..., "completion": ...}              loss on the completion's tokens only
- chat               {"messages": [{"role": ..., "content": ...}]}   rendered with the tokenizer's chat
                                                                     template; loss on every assistant turn
- classification     {"prompt": ..., "options": [...], "label": i}   cross-entropy over the options' scores,
                     (or "answer": "<one of the options>")           as the benchmark tasks; metric accuracy

The first three are generation data: their loss is the mean negative log-likelihood of the scored tokens
(`dlzo.scoring.SpanExample` names the scored character spans). Text is used as written: options and
completions are appended to the prompt as they are (start them with a space where a word begins).

Sources: .jsonl, .json (a list of objects), .csv (a header row naming the columns; options and messages
cells hold JSON), .parquet, or `hf:NAME[:CONFIG][:SPLIT]` (datasets.load_dataset; SPLIT defaults to train).
`columns="prompt=question,completion=answer"` maps the source's column names onto the format's fields.

Every mistake in the input is a DlzoError of one line naming the file and its line (or row, or column).
Nothing is written (datasets.load_dataset keeps its own cache for hf: sources).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlzo.errors import DlzoError, first_line
from dlzo.scoring import SpanExample
from dlzo.tasks import Example, Splits

FORMATS = ("text", "prompt-completion", "chat", "classification")
FIELDS = ("text", "prompt", "completion", "messages", "options", "label", "answer")
FORMAT_FIELDS = {"text": ("text",), "prompt-completion": ("prompt", "completion"), "chat": ("messages",),
                 "classification": ("prompt", "options")}
FORMATS_HELP = ("text {text}, prompt-completion {prompt, completion}, chat {messages}, "
                "classification {prompt, options, label or answer}")
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
HUB_PREFIX = "hf:"
JSON_CELL_EXAMPLES = {"options": '[" yes", " no"]', "messages": '[{"role": "user", "content": "..."}, ...]'}


@dataclass
class Row:
    where: str  # "FILE:LINE" or "SOURCE row N": what an error message names
    number: int  # 1-based among the source's data rows (blank lines and a CSV header are not rows)
    fields: dict
    from_text: bool = False  # CSV: every cell is a string; options and messages hold JSON, label an integer


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


# ----------------------------------------------------------------------------------------------- loading


def load_user_data(source: str, tokenizer=None, data_format: str = "auto", columns: str = "",
                   eval_source: str = "", eval_fraction: float = 0.1, seed: int = 0, max_eval: int = 500,
                   max_length: int = 0) -> UserData:
    """Read `source` (and `eval_source`) into train and dev Examples.

    Without `eval_source`, a seeded `eval_fraction` of the rows (at least 1, at most `max_eval`) is held out
    as the dev set; with it, its rows (a seeded sample of `max_eval` when more) are the dev set. Chat rows
    need `tokenizer` (its chat template renders them). With `tokenizer` and `max_length`, the notes count the
    rows longer than `max_length` tokens, whose prompts encode() cuts from the left."""
    source, eval_source = str(source), str(eval_source or "")
    if data_format not in ("auto", *FORMATS):
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
        if len(rows) < 2:
            raise DlzoError(f"{source}: only 1 row; at least 2 are needed to hold one out for evaluation "
                            f"(or pass --eval-data)")
        num_dev = min(max_eval, max(1, round(eval_fraction * len(rows))), len(rows) - 1)
        held = set(np.random.RandomState(seed).permutation(len(rows))[:num_dev].tolist())
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


def file_digest(source: str) -> str | None:
    """sha256 of a local data file (None for hf: sources and no file), so --resume can tell it changed and
    `dlzo eval --run` can tell a run's own file by its content, however the path is spelled."""
    if not source or source.startswith(HUB_PREFIX) or not Path(source).is_file():
        return None
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()


def source_name(source: str) -> str:
    return source if source.startswith(HUB_PREFIX) else Path(source).stem


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


def parse_columns(columns: str) -> dict[str, str]:
    """"prompt=question,completion=answer" -> {"prompt": "question", "completion": "answer"}."""
    mapping: dict[str, str] = {}
    for item in (part.strip() for part in columns.split(",")):
        if not item:
            continue
        name, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not name or not column:
            raise DlzoError(f"--columns {item!r}: expected FIELD=COLUMN, e.g. prompt=question")
        if name not in FIELDS:
            raise DlzoError(f"--columns {item}: unknown field '{name}' (the fields are {', '.join(FIELDS)})")
        if name in mapping:
            raise DlzoError(f"--columns: field '{name}' is mapped twice")
        mapping[name] = column
    return mapping


# ----------------------------------------------------------------------------------------------- reading


def read_rows(source: str, mapping: dict[str, str] | None = None) -> list[Row]:
    """The rows of a local file or an hf: dataset, in order, each with where it came from."""
    if source.startswith(HUB_PREFIX):
        rows = _read_hub(source)
    else:
        path = Path(source)
        if not path.exists():
            raise DlzoError(f"data file not found: {source}")
        if path.is_dir():
            raise DlzoError(f"{source} is a folder: pass a {', '.join(SUFFIXES)} file, or hf:NAME for a dataset")
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            raise DlzoError(f"{source}: unknown file type '{suffix}'; use {', '.join(SUFFIXES)}, or hf:NAME")
        if suffix == ".parquet":
            rows = _read_parquet(path, source)
        else:
            text = _read_text(path, source)
            if not text.strip():
                raise DlzoError(f"{source}: empty file, no rows")
            if suffix == ".csv":
                rows = _read_csv(text, source, set(FIELDS) | set((mapping or {}).values()))
            elif suffix == ".json":
                rows = _read_json(text, source)
            else:
                rows = _read_jsonl(text, source)
    if not rows:
        raise DlzoError(f"{source}: no rows")
    return rows


def _read_text(path: Path, source: str) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DlzoError(f"{source}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise DlzoError(f"{source}: cannot read ({err.strerror})") from None


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise DlzoError(f"{where}: expected a JSON object {{...}}, got {_kind(value)}")
    return value


class _DuplicateKey(ValueError):
    def at(self, where: str) -> DlzoError:
        return DlzoError(f"{where}: key {self.args[0]!r} appears twice in one object")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON objects with a key twice are refused: json keeps the last silently (a row trained on the second
    'prompt' of {"prompt": "c", ..., "prompt": "x"})."""
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _DuplicateKey(key)
    return dict(pairs)


def _loads(text: str, where: str):
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise err.at(where) from None


def _read_jsonl(text: str, source: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            value = _loads(line, f"{source}:{number}")
        except json.JSONDecodeError as err:
            raise DlzoError(f"{source}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        rows.append(Row(f"{source}:{number}", len(rows) + 1, _object(value, f"{source}:{number}")))
    return rows


def _read_json(text: str, source: str) -> list[Row]:
    try:
        data = json.loads(text)  # duplicate keys are found item by item below, where the line is known
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(text, source)  # JSON Lines named .json
        raise DlzoError(f"{source}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(data, list):
        raise DlzoError(f"{source}: expected a JSON list of objects [{{...}}, ...], got {_kind(data)}")
    # Find the line where each item starts, for the error messages.
    decoder, rows, position, line = json.JSONDecoder(object_pairs_hook=_unique_keys), [], text.index("[") + 1, 1
    line += text.count("\n", 0, position)
    for _ in data:
        start = position
        while text[position] in " \t\r\n,":
            position += 1
        line += text.count("\n", start, position)
        try:
            value, end = decoder.raw_decode(text, position)
        except _DuplicateKey as err:
            raise err.at(f"{source}:{line}") from None
        rows.append(Row(f"{source}:{line}", len(rows) + 1, _object(value, f"{source}:{line}")))
        line += text.count("\n", position, end)
        position = end
    return rows


def _read_csv(text: str, source: str, known: set[str]) -> list[Row]:
    csv.field_size_limit(2**31 - 1)  # a long document is an ordinary text cell (the default stops at 131,072)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
        if not any(name in known for name in header):
            shown = ", ".join(repr(name) for name in header[:4])
            raise DlzoError(f"{source}:1: no header row: the first line ({shown}) names none of the fields "
                            f"{', '.join(FIELDS)}; a CSV needs a header (map other names with --columns)")
        if "" in header:
            raise DlzoError(f"{source}:1: column {header.index('') + 1} has no name in the header")
        repeated = next((name for name in header if header.count(name) > 1), None)
        if repeated:
            raise DlzoError(f"{source}:1: column '{repeated}' appears twice in the header")
        rows = []
        line = reader.line_num + 1
        for cells in reader:
            if any(cell.strip() for cell in cells):
                if len(cells) != len(header):
                    raise DlzoError(f"{source}:{line}: {len(cells)} fields, but the header names {len(header)} columns")
                rows.append(Row(f"{source}:{line}", len(rows) + 1, dict(zip(header, cells)), from_text=True))
            line = reader.line_num + 1
    except csv.Error as err:
        raise DlzoError(f"{source}:{reader.line_num}: not valid CSV ({err})") from None
    return rows


def _read_parquet(path: Path, source: str) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DlzoError(f"{source}: reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises assorted errors for foreign or truncated files
        raise DlzoError(f"{source}: not a readable parquet file ({first_line(err)})") from None
    return [Row(f"{source} row {n}", n, row) for n, row in enumerate(table.to_pylist(), start=1)]


def parse_hub_source(source: str) -> tuple[str, str | None, str]:
    """hf:NAME[:CONFIG][:SPLIT] -> (name, config or None, split, default train). The split may be a datasets
    slice, train[:100] (its colon was read as a fourth part and refused)."""
    parts = source[len(HUB_PREFIX) :].split(":", 2)
    if not parts[0] or (len(parts) == 3 and ":" in re.sub(r"\[[^\]]*\]", "", parts[2])):  # colons: in a slice only
        raise DlzoError(f"{source}: expected hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 else "") or None, (parts[2] if len(parts) > 2 else "")
    return name, config, split or "train"


def _read_hub(source: str) -> list[Row]:
    name, config, split = parse_hub_source(source)
    try:
        import datasets
    except ImportError:
        raise DlzoError(f"{source}: hf: sources need the datasets package: pip install 'dlzo[hub]'") from None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name, config or split: all user-facing, all one line
        reason = first_line(err)
        if "split" in reason.lower() and ("unknown" in reason.lower() or "should be one of" in reason.lower()):
            raise DlzoError(f"{source}: split '{split}' does not exist ({reason})") from None
        offline = (isinstance(err, ConnectionError) or "offline" in reason.lower()
                   or "couldn't reach" in reason.lower() or "connection" in reason.lower())
        if offline:
            raise DlzoError(f"{source}: cannot reach the Hugging Face Hub (offline?): {reason}; pass a local "
                            f".jsonl, .csv or .parquet file instead") from None
        raise DlzoError(f"{source}: datasets.load_dataset failed: {reason}") from None
    return [Row(f"{source} row {n}", n, dict(row)) for n, row in enumerate(dataset, start=1)]


def _mapped(rows: list[Row], mapping: dict[str, str], source: str) -> list[Row]:
    """Rows with their mapped columns renamed to the fields they stand for."""
    if not mapping:
        return rows
    sources = set(mapping.values())
    for row in rows:
        missing = next((f"{name}={column}" for name, column in mapping.items() if column not in row.fields), None)
        if missing:
            column = missing.partition("=")[2]
            raise DlzoError(f"{row.where}: no column '{column}' (from --columns {missing}); this row has "
                            f"{', '.join(map(repr, row.fields)) or 'no fields'}")
        fields = {k: v for k, v in row.fields.items() if k not in sources}
        fields.update({name: row.fields[column] for name, column in mapping.items()})
        row.fields = fields
    return rows


# ----------------------------------------------------------------------------------------------- formats


def detect_format(fields: dict) -> str | None:
    keys = set(fields)
    if "messages" in keys:
        return "chat"
    if "options" in keys:
        return "classification"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    if "text" in keys:
        return "text"
    return None


def _check_format(rows: list[Row], data_format: str, source: str) -> str:
    if data_format != "auto":
        for row in rows:
            missing = next((f for f in FORMAT_FIELDS[data_format] if f not in row.fields), None)
            if missing:
                raise DlzoError(f"{row.where}: missing field '{missing}' for the {data_format} format "
                                f"(this row has {', '.join(map(repr, row.fields)) or 'no fields'})")
        return data_format
    first_fmt = None
    for row in rows:
        fmt = detect_format(row.fields)
        if fmt is None:
            raise DlzoError(f"{row.where}: fields {', '.join(map(repr, row.fields)) or '(none)'} match no format; "
                            f"the formats are {FORMATS_HELP}")
        if first_fmt is None:
            first_fmt, first_where = fmt, row.where
        elif fmt != first_fmt:
            raise DlzoError(f"{row.where}: a {fmt} row, but {first_where} is a {first_fmt} row: one file holds "
                            f"one format")
    return first_fmt


def _used_fields(fmt: str) -> tuple[str, ...]:
    return FORMAT_FIELDS[fmt] + (("label", "answer") if fmt == "classification" else ())


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _string(row: Row, name: str) -> str:
    value = row.fields[name]
    if not isinstance(value, str):
        raise DlzoError(f"{row.where}: field '{name}' must be a string, not {_kind(value)}")
    return value


def _json_cell(row: Row, name: str, expected: str):
    value = row.fields[name]
    if row.from_text and isinstance(value, str):
        try:
            value = _loads(value, row.where)
        except json.JSONDecodeError:
            example = JSON_CELL_EXAMPLES.get(name, "")
            raise DlzoError(f"{row.where}: column '{name}' must hold a JSON {expected}, e.g. {example}") from None
    return value


def _example(row: Row, fmt: str, tokenizer, source: str) -> Example:
    if fmt == "text":
        text = _string(row, "text")
        if not text.strip():
            raise DlzoError(f"{row.where}: empty text: nothing to learn from this row")
        return SpanExample("", [text], 0, answers=[text], spans=[(0, len(text))])
    if fmt == "prompt-completion":
        prompt, completion = _string(row, "prompt"), _string(row, "completion")
        if not completion.strip():
            raise DlzoError(f"{row.where}: empty completion: nothing to learn from this row")
        return SpanExample(prompt, [completion], 0, answers=[completion.strip()],
                           spans=[(len(prompt), len(prompt) + len(completion))])
    if fmt == "classification":
        return _classification(row)
    return _chat(row, tokenizer, source)


def _classification(row: Row) -> Example:
    prompt = _string(row, "prompt")
    options = _json_cell(row, "options", "list of strings")
    if not isinstance(options, list):
        raise DlzoError(f"{row.where}: field 'options' must be a list of strings, not {_kind(options)}")
    if len(options) < 2:
        raise DlzoError(f"{row.where}: field 'options' needs at least 2 options, has {len(options)}")
    for index, option in enumerate(options):
        if not isinstance(option, str):
            raise DlzoError(f"{row.where}: option {index} must be a string, not {_kind(option)}")
        if not option:
            raise DlzoError(f"{row.where}: option {index} is empty")
        if options.index(option) != index:
            raise DlzoError(f"{row.where}: option {option!r} appears twice")
    label, value = None, _absent_as_none(row, "label")
    if row.from_text and isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        value = int(value)  # (str.isdigit took '²' and '--1' too, and int() then raised)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a parquet column of labels with gaps is float: 1.0
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DlzoError(f"{row.where}: field 'label' must be an integer index into options, not "
                            f"{_kind(value)} {value!r}")
        if not 0 <= value < len(options):
            raise DlzoError(f"{row.where}: label {value} is outside the {len(options)} options (0 to {len(options) - 1})")
        label = value
    if _absent_as_none(row, "answer") is not None:
        answer = _string(row, "answer")
        if answer not in options:
            raise DlzoError(f"{row.where}: answer {answer!r} is not one of the options {options}")
        if label is not None and options[label] != answer:
            raise DlzoError(f"{row.where}: label {label} ({options[label]!r}) and answer {answer!r} disagree")
        label = options.index(answer)
    if label is None:
        raise DlzoError(f"{row.where}: a classification row needs 'label' (an index into options) or 'answer' "
                        f"(one of the options)")
    return Example(prompt, options, label)


def _absent_as_none(row: Row, name: str):
    """A field's value, None where a table leaves it out: an empty CSV cell, a NaN of a parquet column."""
    value = row.fields.get(name)
    if (row.from_text and value == "") or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _chat(row: Row, tokenizer, source: str) -> SpanExample:
    messages = _json_cell(row, "messages", "list of messages")
    if not isinstance(messages, list) or not messages:
        raise DlzoError(f"{row.where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DlzoError(f"{row.where}: message {index} needs 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                raise DlzoError(f"{row.where}: the {key} of message {index} must be a string, not "
                                f"{_kind(message[key])}")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DlzoError(f"{row.where}: no assistant turn: nothing to learn from this conversation")
    scored = [i for i in turns if messages[i]["content"].strip()]  # render_chat leaves empty turns unscored
    if not scored:
        raise DlzoError(f"{row.where}: every assistant turn is empty: nothing to learn from this conversation")
    if tokenizer is None:
        raise DlzoError(f"{source}: chat rows are rendered with the model's chat template: load them with its tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise DlzoError(f"{source}: the model's tokenizer has no chat template, so chat rows cannot be rendered; "
                        f"write the rows as prompt-completion instead ({{\"prompt\": ..., \"completion\": ...}})")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    full, spans = render_chat(tokenizer, messages, row.where)
    first = spans[0][0]
    return SpanExample(full[:first], [full[first:]], 0, answers=[messages[scored[0]]["content"]], spans=spans)


def render_chat(tokenizer, messages: list[dict], where: str = "chat") -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the chat template, and the character span of each assistant turn (its
    content and the template's end-of-turn text, which the model must learn to emit too)."""

    def render(part: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja's TemplateError, the template's raise_exception(): one line
            raise DlzoError(f"{where}: the chat template refused this conversation: {first_line(err)}") from None

    full = render(messages, False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = render(messages[:index], True)
        except DlzoError:
            before = None  # a template that refuses a conversation not starting with a user turn
        upto = render(messages[: index + 1], False)
        if before is not None and full.startswith(upto) and upto.startswith(before) and len(before) >= cursor \
                and len(upto) > len(before):
            span = (len(before), len(upto))
        else:  # the template renders earlier turns differently (drops reasoning, say): find the content
            start = full.find(message["content"], cursor)
            if start < 0:
                raise DlzoError(f"{where}: cannot find assistant turn {index + 1} in the chat template's output")
            span = (start, start + len(message["content"]))
        if span[1] > span[0] and message["content"].strip():  # an empty turn would teach empty replies
            spans.append(span)
        cursor = span[1]
    # The template writes the BOS token as text; the tokenizer adds its own, so drop the written one.
    bos = getattr(tokenizer, "bos_token", None)
    if bos and full.startswith(bos):
        ids = tokenizer("", add_special_tokens=True, verbose=False)["input_ids"]
        if ids[:1] == [tokenizer.bos_token_id]:
            full = full[len(bos) :]
            spans = [(max(s - len(bos), 0), e - len(bos)) for s, e in spans]
    return full, spans
