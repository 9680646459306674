"""Regenerate brevity.jsonl: 120 prompt rows for the reward example (docs/objectives.md).

Each row asks for a short answer about an everyday thing, says how short, and names the thing:
{"prompt": ..., "max_words": 12, "subject": "rain"}. The rewards (examples/rewards/brevity.py) read these fields:
`reward` wants at most max_words words that name the subject, `length_only` the length alone. Made up for dlzo
(no data set was copied).

    python examples/data/make_brevity.py            # rewrites examples/data/brevity.jsonl
    python examples/data/make_brevity.py OUT.jsonl  # writes elsewhere

The output is a pure function of this file: same bytes on every run, platform and Python version.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

THINGS = """
the sun|a cat|rain|a library|the moon|coffee|a bicycle|music|the ocean|a tree|bread|a computer|snow|a river|a bird
|fire|a city|chess|a garden|the wind|a teacher|a map|a clock|a bridge|honey|a volcano|a camera|winter|a forest|salt
|a dog|a pencil|a train|summer|an apple|a mountain|a song|a book|glass|a phone|a horse|cheese|a kite|a candle|ice
|a farm|a school|a doctor|a ladder|a mirror|a boat|a market|a bee|soup|a lamp|a drum|a desert|a cloud|a key|paper
""".replace("\n", "")
TEMPLATES = ["In one short sentence, what is {}?", "Briefly, what is {}?", "Describe {} in a few words.",
             "What is {}? Keep it short."]
MAX_WORDS = 12


def rows() -> list[dict]:
    things = [t.strip() for t in THINGS.split("|") if t.strip()]
    # each thing under the two templates its place picks, so that no prompt repeats
    return [{"prompt": TEMPLATES[(i + k) % len(TEMPLATES)].format(thing), "max_words": MAX_WORDS,
             "subject": thing.split()[-1]}
            for k in (0, 2) for i, thing in enumerate(things)]


def main(out: str = str(Path(__file__).with_name("brevity.jsonl"))) -> None:
    Path(out).write_text("".join(json.dumps(row) + "\n" for row in rows()), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
