"""Prompt rows for a reward (`dlzo train --reward`, `dlzo eval --reward`): {"prompt": ..., any other fields}.

The model continues each prompt and a reward function scores what it wrote; the row's other fields (a
reference answer, a word limit, test cases ...) go to the function untouched. A prompt is written as the user's
words: a model with a chat template gets it as a user turn (dlzo.evaluation.objectives renders it). The held-out
dev rows are chosen as for your other rows (dlzo.data.user_data.held_out).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dlzo.data.examples import Example
from dlzo.data.readers import _kind, _mapped, parse_columns, read_rows
from dlzo.data.user_data import UserData, held_out, row_ranges, source_name
from dlzo.errors import DlzoError

FORMAT = "prompts"  # what run.json and results.json call these rows


@dataclass
class PromptExample(Example):
    """A prompt to continue (`prompt`, as written), the row it came from and where (file:line, for errors)."""

    row: dict = field(default_factory=dict)
    where: str = ""


def _examples(source: str, mapping: dict[str, str]) -> tuple[list[PromptExample], list[int]]:
    rows = _mapped(read_rows(source, mapping), mapping, source)
    examples = []
    for row in rows:
        if "prompt" not in row.fields:
            shown = ", ".join(map(repr, row.fields)) or "no fields"
            raise DlzoError(f"{row.where}: a reward row needs a 'prompt' field (this row has {shown}); map another "
                            f"column with --columns prompt=COLUMN")
        prompt = row.fields["prompt"]
        if not isinstance(prompt, str):
            raise DlzoError(f"{row.where}: field 'prompt' must be a string, not {_kind(prompt)}")
        if not prompt.strip():
            raise DlzoError(f"{row.where}: empty prompt: nothing to continue")
        examples.append(PromptExample(prompt, [""], 0, row=dict(row.fields), where=row.where))
    return examples, [row.number for row in rows]


def load_prompt_rows(source: str, columns: str = "", eval_source: str = "", eval_fraction: float = 0.1,
                     seed: int = 0, max_eval: int = 500) -> UserData:
    """The prompt rows of `source` as training rows, and the dev rows: `eval_source`'s (a seeded sample of
    `max_eval` when more), else a seeded `eval_fraction` of `source` held out."""
    source, eval_source = str(source), str(eval_source or "")
    mapping = parse_columns(columns)
    examples, numbers = _examples(source, mapping)
    record = {"format": FORMAT, "columns": mapping, "seed": seed, "train_source": source,
              "row_numbering": "1-based data rows in file order (blank lines and a CSV header are not rows)"}
    if eval_source:
        dev_all, dev_numbers = _examples(eval_source, mapping)
        picked = sorted(np.random.RandomState(seed).permutation(len(dev_all))[:max_eval].tolist())
        train, dev = examples, [dev_all[i] for i in picked]
        record.update(dev_source=eval_source, train_rows=row_ranges(numbers),
                      dev_rows=row_ranges([dev_numbers[i] for i in picked]), eval_fraction=None)
    else:
        held = held_out(source, len(examples), eval_fraction, max_eval, seed)
        train = [e for i, e in enumerate(examples) if i not in held]
        dev = [e for i, e in enumerate(examples) if i in held]
        record.update(dev_source=source, train_rows=row_ranges([n for i, n in enumerate(numbers) if i not in held]),
                      dev_rows=row_ranges([n for i, n in enumerate(numbers) if i in held]), eval_fraction=eval_fraction)
    record.update(num_train=len(train), num_dev=len(dev))
    notes = [f"{eval_source or source}: {len(dev)} prompts are the dev set (their mean reward chooses the checkpoint)"]
    return UserData(train, dev, FORMAT, True, record, notes, name=source_name(source))


def prompt_batch(rows: list[dict]) -> dict:
    """A `ZOTrainer` batch of prompt rows as they are (its data collator under a reward): {"rows": [...]}."""
    return {"rows": [dict(row) for row in rows]}


def batch_examples(rows: list[dict]) -> list[PromptExample]:
    """A batch of prompt rows (`prompt_batch`) as examples; a row without a string prompt is one line naming its
    place in the batch."""
    examples = []
    for index, row in enumerate(rows, start=1):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str):
            raise DlzoError(f"row {index} of the batch: a reward row needs a string 'prompt', not {_kind(prompt)}")
        examples.append(PromptExample(prompt, [""], 0, row=dict(row), where=f"row {index} of the batch"))
    return examples
