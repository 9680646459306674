"""Readers of the benchmarks' official files (GLUE TSV, SuperGLUE JSONL, SQuAD/DROP JSON): errors name the file
and the line.

Your own rows have their own readers (dlzo.data.readers): they refuse a key given twice and name the column of
a JSON error, which these never did; sharing one reader would change one set of messages.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from dlzo.errors import DlzoError


def _lines(handle, path: Path) -> Iterator[str]:
    """The file's lines; bytes that are not UTF-8 name the file instead of raising a traceback (the file is decoded
    in blocks, so the line is where reading stopped, not always the bad byte's own)."""
    number = 0
    try:
        for line in handle:
            number += 1
            yield line
    except UnicodeDecodeError as err:
        raise DlzoError(f"{path}: not UTF-8 text (after line {number}: {err.reason})") from None


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(_lines(handle, path), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DlzoError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DlzoError(f"{path}:{number}: expected a JSON object, not {type(row).__name__}")
            missing = [name for name in required if name not in row]
            if missing:
                raise DlzoError(f"{path}:{number}: missing field '{missing[0]}'")
            rows.append(row)
    return rows


def read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DlzoError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise DlzoError(f"{path}: not UTF-8 text ({err.reason})") from None


def label_index(path: Path | str, number: int, value, allowed: dict) -> int:
    if value not in allowed:
        raise DlzoError(f"{path}:{number}: label {value!r} is not one of {list(allowed)}")
    return allowed[value]


def split_file(path: Path, files: dict[str, Path], split: str) -> Path:
    if split not in files or not files[split].exists():
        wanted = files.get(split, path)
        raise DlzoError(f"data file not found: {wanted} (pass the folder of official files with --data-dir)")
    return files[split]

