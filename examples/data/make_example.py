"""Regenerate zorbish.jsonl: 200 prompt-completion rows of a made-up language, Zorbish.

Zorbish was invented for dlzo's examples (it is no real language and no data set): a Zorbish word is the
English word with its vowels rotated (a->o, e->i, i->u, o->a, u->e) and "ek" appended, so "cat" is "cotek".
The rule is learnable, so the held-out rows measure whether fine-tuning learned it.

    python examples/data/make_example.py            # rewrites examples/data/zorbish.jsonl
    python examples/data/make_example.py OUT.jsonl  # writes elsewhere

The output is a pure function of this file: same bytes on every run, platform and Python version.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WORDS = """
cat dog fish bird horse cow pig sheep goat duck mouse frog snake bear wolf fox lion tiger rabbit deer
apple bread cheese milk water rice soup cake honey lemon orange grape melon pear plum bean corn salt sugar egg
house door window roof floor wall table chair bed lamp clock cup plate spoon knife fork bowl glass box bag
tree flower grass leaf root seed forest river lake sea hill mountain stone sand rain snow wind cloud sun moon
star sky fire smoke ice storm field garden road bridge city town village farm market school church tower
book pen paper letter word song story name number line color music dance game ball kite drum bell coin ring
hand foot head nose mouth ear eye hair arm leg heart bone skin tooth finger knee neck back face voice dream
mother father sister brother friend child king queen doctor teacher farmer baker sailor soldier singer
red blue green yellow black white brown small big long short warm cold soft hard old young happy sad
run walk jump swim sing read write sleep eat drink open close give take find keep build climb carry paint
ship boat train car wheel map rope nail hammer basket candle blanket pillow mirror button ladder
""".split()


def zorbish(word: str) -> str:
    rotated = word.translate(str.maketrans("aeiou", "oiuae"))
    return rotated + "ek"


def rows() -> list[dict]:
    assert len(set(WORDS)) == len(WORDS) >= 200, "every English word once"
    return [{"prompt": f"Translate to Zorbish: {word} ->", "completion": f" {zorbish(word)}"} for word in WORDS[:200]]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("zorbish.jsonl")
    with open(out, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows():
            handle.write(json.dumps(row, ensure_ascii=True) + "\n")
    print(f"wrote {len(rows())} rows to {out}")


if __name__ == "__main__":
    main()
