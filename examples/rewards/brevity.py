"""The reward of the brevity example (docs/objectives.md): a short answer within the row's word limit.

    dlzo train --model smollm2-135m --data examples/data/brevity.jsonl --reward examples/rewards/brevity.py:reward ...

1 for an answer of 1 to max_words words, max_words / n for a longer one of n words (so every word less counts),
0 for an empty one. dlzo calls it with the prompts, the completions and the rows (their "max_words").
"""


def reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    scores = []
    for completion, row in zip(completions, rows):
        limit, words = row["max_words"], len(completion.split())
        scores.append(0.0 if words == 0 else min(1.0, limit / words))
    return scores
