"""What `dlzo train --scope dominant` picks on each model, task and seed, by every layer rule that costs only the
probe (issue 35): the guarded rule (the default), the paper's sun rule and the onset rule, with the premise's
evidence (how many calibration sequences carry the outlier, how far the later layers climb above it). Each row is
`dlzo train`'s own choice (dlzo.engine.layer_choice.choose_dominant_layer) on that seed's training examples; no
training.

    python scripts/layer_picks.py OUT.json --model MODEL [--model MODEL2] --tasks sst2,rte,cb,copa --seeds 0,1,2

Writes {"rows": [{"model", "task", "seed", "guarded", "sun", "onset", "premise", "seconds"}], "command"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--tasks", default="sst2")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--data-dir", default="../shared/data")
    args = parser.parse_args(argv)

    from dlzo.data.benchmarks import load_task
    from dlzo.engine.layer_choice import choose_dominant_layer
    from dlzo.model.loading import decoder_layers, load_model, load_tokenizer

    rows = []
    for name in args.model:
        model, tokenizer = load_model(name, dtype="float32", device="cpu"), load_tokenizer(name)
        for task_name in args.tasks.split(","):
            task = load_task(task_name, args.data_dir)
            for seed in (int(s) for s in args.seeds.split(",")):
                started = time.perf_counter()  # `dlzo train`'s own choice on the seed's training examples
                choice = choose_dominant_layer(model, tokenizer, task.splits(seed).train, eps=1e-3, rule="guarded")
                rows.append({"model": Path(name).name, "task": task_name, "seed": seed,
                             "layers": len(decoder_layers(model)), "guarded": choice["layer"],
                             "sun": choice["rule_layers"]["sun"], "onset": choice["rule_layers"]["onset"],
                             "premise": choice["premise"], "seconds": round(time.perf_counter() - started, 2)})
                print(json.dumps(rows[-1]))
        del model
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": "python scripts/layer_picks.py " + " ".join(argv).replace(str(Path.home()), "~"),
                                          "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
