"""Which library quantizes dlzo's frozen layers (--quantize): torchao (dlzo's), bitsandbytes and optimum-quanto,
each swapped in for `dlzo.model.quantize.quantize_linear`, measured through dlzo's own commands on SmolLM2-135M,
layer 11, SST-2 (docs/benchmarks.md, "Quantized frozen layers").

    pip install bitsandbytes==0.50.2 optimum-quanto==0.2.7     # the two others (torchao is dlzo's dependency)
    python scripts/quant_libraries.py table OUT           # every library and mode, each in its own process
    python scripts/quant_libraries.py run LIB -- ARGS     # `dlzo ARGS` with LIB's layers (one measurement)
    python scripts/quant_libraries.py loads OUT           # peak RSS of loading SmolLM2, float32 and quantized
    python scripts/quant_libraries.py steps OUT           # step times of all of them in one process, in turn

`table` runs, per library and mode (and once unquantized): `dlzo bench` (layer_cached and inference variants,
16 SST-2 examples) for the step time and peak memory of a dominant-layer step, and a short `dlzo train` (100
steps, lr 1e-3, 1000 training examples, 200 dev, 200 test) for the dev loss after a fixed run and the process's
peak RSS; OUT/table.json collects them. Every process runs with 2 threads, one at a time.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

LIBRARIES = ("torchao", "torchao-intx", "bitsandbytes", "quanto")
MODEL = "smollm2-135m"
CASES = [("none", "none"), ("torchao", "int8"), ("torchao", "int4"), ("torchao-intx", "int4"),
         ("bitsandbytes", "int8"), ("bitsandbytes", "int4"), ("quanto", "int8"), ("quanto", "int4")]


def torchao_intx_linear(linear: nn.Linear, mode: str, device=None) -> nn.Module:
    """torchao 0.18's own int4 on a CPU (IntxWeightOnlyConfig, groups of 64): its packed int4 formats need CUDA
    (or bfloat16 and mslk), so on an x86 CPU each int4 value is kept in a byte. int8 as dlzo's."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from dlzo.model.quantize import quantize_linear

    if mode == "int8":
        return quantize_linear(linear, mode, device)
    linear = linear.to(device) if device is not None else linear
    quantize_(linear, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)))
    return linear


def bitsandbytes_linear(linear: nn.Linear, mode: str, device=None) -> nn.Module:
    """bitsandbytes 0.50: int8 is LLM.int8 (Linear8bitLt, outlier threshold 6: the inputs are quantized per row
    too, the columns above 6 kept in float16); int4 is QLoRA's NF4 (Linear4bit, blocks of 64, double
    quantization), dequantized and multiplied in the working dtype (the AVX512-BF16 repacking, which multiplies
    in bfloat16 and needs rows in multiples of 32, off)."""
    import bitsandbytes as bnb

    weight, bias = linear.weight.detach().to("cpu"), linear.bias  # it quantizes when moved off the CPU
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias is not None,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None,
                                  compute_dtype=weight.dtype, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=64, module=layer)
        layer.support_avx512bf16_for_cpu = False
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu"), requires_grad=False)
    layer = layer.to(device if device is not None else "cpu")
    layer.dlzo_quantized = True
    return layer


def quanto_linear(linear: nn.Linear, mode: str, device=None) -> nn.Module:
    """optimum-quanto 0.2.7 (in maintenance mode since November 2025): qint8 per row, qint4 per group of 128
    (its default), frozen (the integer weights kept, the float ones dropped)."""
    from optimum.quanto import freeze, qint4, qint8, quantize

    if device is not None:
        linear = linear.to(device)
    holder = nn.Sequential(linear)  # quanto replaces the children of the module it is given
    quantize(holder, weights=qint8 if mode == "int8" else qint4)
    freeze(holder)
    holder[0].dlzo_quantized = True
    return holder[0]


def use_library(name: str) -> None:
    """Swap LIB's layers into dlzo (every module that imported quantize_linear or is_quantized)."""
    import dlzo.model.quantize as quantize
    import dlzo.model.quantized_load as quantized_load
    import dlzo.training.prepare as prepare

    if name == "torchao":
        return
    make = {"torchao-intx": torchao_intx_linear, "bitsandbytes": bitsandbytes_linear, "quanto": quanto_linear}[name]
    original = quantize.is_quantized

    def is_quantized(module: nn.Module) -> bool:
        return getattr(module, "dlzo_quantized", False) or original(module)

    for module in (quantize, quantized_load, prepare):
        if hasattr(module, "quantize_linear"):
            module.quantize_linear = make
        if hasattr(module, "is_quantized"):
            module.is_quantized = is_quantized


def run(library: str, args: list[str]) -> None:
    from dlzo.cli.main import main

    torch.set_num_threads(2)
    use_library(library)
    started = time.perf_counter()
    code = 0
    try:
        main(args)
    except SystemExit as stop:
        code = stop.code or 0
    print(json.dumps({"maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "seconds": round(time.perf_counter() - started, 1), "exit": code}))


def measure(library: str, args: list[str]) -> dict:
    command = [sys.executable, __file__, "run", library, "--", *args]
    print("$", " ".join(command[1:]), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "{}"
    if done.returncode or '"exit": 0' not in last:
        raise SystemExit(f"{library} {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(last)


def invariance(library: str, mode: str) -> None:
    """How much an example's candidate scores move when its batch companions change: the 16 SST-2 examples
    scored 16 at a time against one at a time (layer 11 in float, the rest quantized with LIB; `none`: float)."""
    from dlzo.data.benchmarks import load_task
    from dlzo.engine.scoring import candidate_scores, encode, fast_layout, token_logprobs
    from dlzo.model.loading import load_model, load_tokenizer
    from dlzo.model.quantized_load import layer_in_float, load_quantized

    torch.set_num_threads(2)
    use_library(library)
    if mode == "none":
        model = load_model(MODEL, dtype="float32", device="cpu")
    else:
        model = load_quantized(MODEL, mode, dtype="float32", device="cpu")
        layer_in_float(model, 11)
    tokenizer = load_tokenizer(MODEL, convert_gguf=False)
    examples = load_task("sst2", "../shared/data").splits(seed=0).train[:16]
    layout = fast_layout(model, tokenizer)

    def scores(size: int) -> torch.Tensor:
        chunks = [encode(tokenizer, examples[i : i + size], layout=layout) for i in range(0, len(examples), size)]
        return torch.cat([candidate_scores(batch, token_logprobs(model, batch)) for batch in chunks])

    with torch.no_grad():
        together, alone = scores(16), scores(1)
    print(json.dumps({"max_score_change": float((together - alone).abs().max()),
                      "mean_abs_score": float(together.abs().mean())}))


def steps(out: Path, rounds: int = 5) -> None:
    """Step time of a dominant-layer ZO step (dlzo bench's layer_cached, 16 SST-2 examples, layer 11) of every
    library and mode, all in this one process and timed in turn, `rounds` times 3 steps each: on a shared
    machine whose load changes by the minute, the medians stay comparable."""
    import copy
    import statistics

    from dlzo.data.benchmarks import load_task
    from dlzo.engine.scoring import encode, fast_layout
    from dlzo.model.loading import load_model, load_tokenizer
    from dlzo.model.quantize import frozen_linears, quantize_linear, replace_module
    from dlzo.studies.bench import run_variant

    torch.set_num_threads(2)
    base = load_model(MODEL, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(MODEL)
    examples = load_task("sst2", "../shared/data").splits(seed=0).train[:16]
    packed = encode(tokenizer, examples, layout=fast_layout(base, tokenizer))
    separate = encode(tokenizer, examples, pack_single_token=False)
    makers = {"torchao": quantize_linear, "torchao-intx": torchao_intx_linear,
              "bitsandbytes": bitsandbytes_linear, "quanto": quanto_linear}
    models = {"none-none": base}
    tuned = [n for n, _ in base.named_parameters() if n.startswith("model.layers.11.")]
    for library, mode in CASES[1:]:
        model = copy.deepcopy(base)
        for name in frozen_linears(model, tuned):
            replace_module(model, name, makers[library](model.get_submodule(name), mode))
        models[f"{library}-{mode}"] = model
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(run_variant("layer_cached", model, packed, separate, 11, 3, torch.device("cpu"))["step_s"])
    result = {name: {"step_s": statistics.median(t), "rounds": t} for name, t in times.items()}
    (out / "steps.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({n: round(r["step_s"], 3) for n, r in result.items()}))


def measure_invariance(library: str, mode: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "invariance", library, mode], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"invariance {library} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for library, mode in CASES:
        name = f"{library}-{mode}"
        quantize = [] if mode == "none" else ["--quantize", mode]
        bench_dir, train_dir = out / f"bench-{name}", out / f"train-{name}"
        patched = "torchao" if library == "none" else library
        bench = measure(patched, ["bench", "--model", MODEL, "--task", "sst2", "--layer", "11", "--batch", "16",
                                  "--variants", "layer_cached,inference", "--repeats", "5", "--out", str(bench_dir),
                                  *quantize])
        train = measure(patched, ["train", "--model", MODEL, "--task", "sst2", "--scope", "layer:11", "--steps",
                                  "100", "--batch-size", "16", "--lr", "1e-3", "--num-train", "1000", "--num-dev",
                                  "200", "--num-test", "200", "--eval-every", "50", "--seed", "0", "--quiet",
                                  "--out", str(train_dir), *quantize])
        report = json.loads((bench_dir / "bench.json").read_text())
        results = json.loads((train_dir / "results.json").read_text())
        rows.append({"library": library, "mode": mode,
                     "step_s": report["variants"]["layer_cached"]["step_s"],
                     "step_peak_bytes": report["variants"]["layer_cached"]["peak_mem_bytes"],
                     "inference_s": report["variants"]["inference"]["step_s"],
                     "inference_peak_bytes": report["variants"]["inference"]["peak_mem_bytes"],
                     "bench_maxrss_bytes": bench["maxrss_bytes"], "train_maxrss_bytes": train["maxrss_bytes"],
                     "train_seconds": train["seconds"], "batch_invariance": measure_invariance(patched, mode),
                     "results": results})
        (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps(rows[-1])[:600], flush=True)


def load(how: str) -> None:
    """One load of SmolLM2 in this process (`imports`: none, the baseline), its peak RSS and seconds."""
    from dlzo.model.loading import load_model, load_tokenizer
    from dlzo.model.quantized_load import load_quantized

    torch.set_num_threads(2)
    started = time.perf_counter()
    if how == "float32":
        load_model(MODEL, dtype="float32", device="cpu"), load_tokenizer(MODEL)
    elif how in ("int8", "int4"):
        load_quantized(MODEL, how, dtype="float32", device="cpu"), load_tokenizer(MODEL, convert_gguf=False)
    print(json.dumps({"load": how, "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "seconds": round(time.perf_counter() - started, 1)}))


def loads(out: Path) -> None:
    """Peak RSS of loading SmolLM2: float32 with the cached conversion, float32 converting the GGUF first (an
    empty DLZO_CACHE); int8 and int4 from the cached conversion, and read straight from the GGUF (an empty
    DLZO_CACHE: nothing converted)."""
    import os
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for how, fresh in (("imports", False), ("float32", False), ("float32", True), ("int8", False), ("int8", True),
                       ("int4", False), ("int4", True)):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, **({"DLZO_CACHE": cache} if fresh else {})}
            done = subprocess.run([sys.executable, __file__, "load", how], capture_output=True, text=True, env=env)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({**row, "empty_cache": fresh})
        print(json.dumps(rows[-1]), flush=True)
    (out / "loads.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "table":
        table(Path(sys.argv[2]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "loads":
        loads(Path(sys.argv[2]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "load":
        load(sys.argv[2])
    elif len(sys.argv) >= 3 and sys.argv[1] == "steps":
        steps(Path(sys.argv[2]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "invariance":
        invariance(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 4 and sys.argv[1] == "run" and sys.argv[3] == "--":
        run(sys.argv[2], sys.argv[4:])
    else:
        raise SystemExit(__doc__)
