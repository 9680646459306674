"""The example types every task, reader and scorer shares: an `Example` (a prompt and the continuations to
score), a `SpanExample` (a generation example scored on character spans, e.g. a chat's assistant turns) and
the train/dev/test `Splits`.

Classification tasks score each candidate continuation; generation tasks (SQuAD, DROP) have one gold
continuation for the LM loss and are evaluated by greedy generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    prompt: str
    continuations: list[str]  # appended to the prompt; one per candidate (generation: the gold answer)
    label: int  # index of the correct continuation; 0 for generation tasks
    answers: list[str] = field(default_factory=list)  # gold answers for generation metrics
    correct: list[int] = field(default_factory=list)  # all correct candidates (ReCoRD); default [label]


@dataclass
class Splits:
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    notes: list[str] = field(default_factory=list)


@dataclass
class SpanExample(Example):
    """A generation example whose loss is read on `spans`: (start, end) character offsets into
    `prompt + continuations[0]`; the tokens overlapping a span are scored (the first token of the sequence
    never is: nothing predicts it). Without spans it is scored as a plain Example."""

    spans: list[tuple[int, int]] = field(default_factory=list)
