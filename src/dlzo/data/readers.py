"""Your own rows, read: .jsonl, .json (a list of objects), .csv (a header row naming the columns; options and
messages cells hold JSON), .parquet, or `hf:NAME[:CONFIG][:SPLIT]` (datasets.load_dataset; SPLIT defaults to
train). `columns="prompt=question,completion=answer"` maps the source's column names onto the format's fields.
Every mistake is a DlzoError of one line naming the file and its line (or row, or column).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from dlzo.data.hub import HUB_PREFIX, is_hub_source, parse_hub_source
from dlzo.errors import DlzoError, first_line
from dlzo.fields import comma_list

FIELDS = ("text", "prompt", "completion", "messages", "options", "label", "answer")
JSON_CELL_EXAMPLES = {"options": '[" yes", " no"]', "messages": '[{"role": "user", "content": "..."}, ...]'}
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")


@dataclass
class Row:
    where: str  # "FILE:LINE" or "SOURCE row N": what an error message names
    number: int  # 1-based among the source's data rows (blank lines and a CSV header are not rows)
    fields: dict
    from_text: bool = False  # CSV: every cell is a string; options and messages hold JSON, label an integer


def parse_columns(columns: str) -> dict[str, str]:
    """"prompt=question,completion=answer" -> {"prompt": "question", "completion": "answer"}."""
    mapping: dict[str, str] = {}
    for item in comma_list(columns):
        name, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not name or not column:
            raise DlzoError(f"--columns {item!r}: expected FIELD=COLUMN, e.g. prompt=question")
        if name not in FIELDS:
            raise DlzoError(f"--columns {item}: unknown field '{name}' (the fields are {', '.join(FIELDS)})")
        if name in mapping:
            raise DlzoError(f"--columns: field '{name}' is mapped twice")
        mapping[name] = column
    return mapping


def read_rows(source: str, mapping: dict[str, str] | None = None) -> list[Row]:
    """The rows of a local file or an hf: dataset, in order, each with where it came from."""
    if is_hub_source(source):
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


def _read_hub(source: str) -> list[Row]:
    name, config, split = parse_hub_source(source)
    split = split or "train"
    if name is None:
        raise DlzoError(f"{source}: expected hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT")
    try:
        import datasets
    except ImportError:
        raise DlzoError(f"{source}: {HUB_PREFIX}: sources need the datasets package: pip install 'dlzo[hub]'") from None
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
