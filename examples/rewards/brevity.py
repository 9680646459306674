"""The rewards of the brevity example (docs/objectives.md): a short answer within the row's word limit.

    dlzo train --config configs/smollm2-135m/reward-brevity.toml          # reward: short, and on the subject
    dlzo train --config configs/smollm2-135m/reward-brevity.toml --reward examples/rewards/brevity.py:length_only

dlzo calls them with the prompts, the completions and the rows (their "max_words" and "subject").
"""

from __future__ import annotations

import re


def length_score(completion: str, limit: int) -> float:
    """1 for 1 to `limit` words, limit / n for a longer answer of n words (every word less counts), 0 for none."""
    words = len(completion.split())
    return 0.0 if words == 0 else min(1.0, limit / words)


def reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """The length score of an answer that names the row's subject ("rain", or "rains"); 0 for one that does not,
    so that a word like "Awesome." earns nothing."""
    scores = []
    for completion, row in zip(completions, rows):
        words = re.findall(r"[a-z]+", completion.lower())
        named = row["subject"] in words or row["subject"] + "s" in words
        scores.append(length_score(completion, row["max_words"]) if named else 0.0)
    return scores


def length_only(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """The length score alone: what a reward that checks only the length teaches (docs/objectives.md)."""
    return [length_score(completion, row["max_words"]) for completion, row in zip(completions, rows)]
