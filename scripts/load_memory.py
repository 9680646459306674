"""Peak anonymous and file-backed resident memory while dlzo loads a model, per dtype or quantization: what a
whole run's maxrss mixes up (file pages of a memory-mapped checkpoint are clean and reclaimable; anonymous
memory is what the process really needs). Linux only (/proc/self/status). One mode a process, so that no mode
inherits another's heap.

    python scripts/load_memory.py OUT.json MODEL float32 float16 int8

Writes {mode: {"peak": {...}, "after_load": {...}}} in bytes (RssAnon, RssFile, VmRSS).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

KEYS = ("RssAnon", "RssFile", "VmRSS")


def status() -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in KEYS:
            values[key] = int(value.split()[0]) * 1024
    return values


def measure(model: str, mode: str) -> dict:
    from dlzo.model.loading import load_model
    from dlzo.model.quantized_load import load_quantized

    peak, running = dict.fromkeys(KEYS, 0), [True]

    def sample() -> None:
        while running[0]:
            for key, value in status().items():
                peak[key] = max(peak[key], value)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    if mode in ("int8", "int4"):
        loaded = load_quantized(model, mode, dtype="float32", device="cpu")
    else:
        loaded = load_model(model, dtype=mode, device="cpu")
    time.sleep(0.1)
    running[0] = False
    thread.join()
    after = status()
    del loaded
    return {"peak": peak, "after_load": after}


def main(argv: list[str]) -> None:
    if len(argv) >= 3 and argv[0] == "--one":
        print(json.dumps(measure(argv[1], argv[2])))
        return
    if len(argv) < 3:
        raise SystemExit(__doc__)
    out, model, modes = Path(argv[0]), argv[1], argv[2:]
    results = {}
    for mode in modes:
        done = subprocess.run([sys.executable, __file__, "--one", model, mode], capture_output=True, text=True,
                              check=True)
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
