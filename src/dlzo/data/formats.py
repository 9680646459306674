"""The four formats of your own rows, detected from the rows' fields (or forced with `data_format`):

- text               {"text": ...}                                   loss on every token
- prompt-completion  {"prompt": ..., "completion": ...}              loss on the completion's tokens only
- chat               {"messages": [{"role": ..., "content": ...}]}   rendered with the tokenizer's chat
                                                                     template; loss on every assistant turn
- classification     {"prompt": ..., "options": [...], "label": i}   cross-entropy over the options' scores,
                     (or "answer": "<one of the options>")           as the benchmark tasks; metric accuracy

The first three are generation data: their loss is the mean negative log-likelihood of the scored tokens.
Text is used as written: options and completions are appended to the prompt as they are.
"""

from __future__ import annotations

import math
import re
from typing import Literal, get_args

from dlzo.data.chat import _chat
from dlzo.data.examples import Example, SpanExample
from dlzo.data.readers import Row, _json_cell, _kind, _string
from dlzo.errors import DlzoError

Format = Literal["text", "prompt-completion", "chat", "classification"]
FORMATS = get_args(Format)
DataFormat = Literal["auto", Format]  # --data-format: auto detects the format from the rows' fields




FORMAT_FIELDS = {"text": ("text",), "prompt-completion": ("prompt", "completion"), "chat": ("messages",),
                 "classification": ("prompt", "options")}


FORMATS_HELP = ("text {text}, prompt-completion {prompt, completion}, chat {messages}, "
                "classification {prompt, options, label or answer}")




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

