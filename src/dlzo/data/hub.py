"""Hugging Face Hub sources, one syntax wherever one is accepted: `--data-dir hf` (each benchmark task's own
dataset, or `hf:PATH[:CONFIG]` for a mirror of it) and `--data hf:NAME[:CONFIG][:SPLIT]` (your own rows; SPLIT
a datasets split or slice, default train).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from dlzo.errors import DlzoError

HUB_PREFIX = "hf"
DATA_DIR_HELP = ("folder of official task files (glue/SST-2/*.tsv, superglue/<Task>/*.jsonl, squad/, drop/), or 'hf' "
                 "to load each task's Hugging Face dataset (online; 'hf:PATH[:CONFIG]' for a mirror)")


class HubSource(NamedTuple):
    name: str | None  # None: a bare `hf` (each task's own dataset)
    config: str | None
    split: str | None


def is_hub_source(text: str | Path) -> bool:
    """`hf` or `hf:...`: a Hub source, not a local path."""
    text = str(text)
    return text == HUB_PREFIX or text.startswith(HUB_PREFIX + ":")


def parse_hub_source(text: str | Path) -> HubSource | None:
    """`hf` or `hf:NAME[:CONFIG][:SPLIT]` -> its parts (an empty one None); anything else (a local path) -> None.
    The split may be a datasets slice, train[:100], whose colon is not a fifth part."""
    text = str(text)
    if not is_hub_source(text):
        return None
    parts = text[len(HUB_PREFIX) + 1 :].split(":", 2)
    if len(parts) == 3 and ":" in re.sub(r"\[[^\]]*\]", "", parts[2]):  # colons: in a slice only
        raise DlzoError(f"{text}: expected hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT")
    parts += [""] * (3 - len(parts))
    return HubSource(*(part or None for part in parts))
