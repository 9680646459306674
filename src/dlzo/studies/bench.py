"""`dlzo bench`: step time of full MeZO (upstream-style and ours) against dominant-layer ZO, on one batch.

Variants, all on the same inputs in the same process:
  upstream_full  MeZO's large_models step: one sequence per candidate, logits over the whole vocabulary
                 everywhere, four z passes over all weights (+ε, -2ε, +ε, update)
  full           our full MeZO: packed candidates and answer-only logits, three z passes (the
                 restore and the update share one z)
  layer_plain    one layer, in-place perturbation restored by copy, MeZO-style forwards (no fast path)
  layer_fast     one layer, fast path: shared prefix, both branches in one forward, answer-only logits
  layer_cached   layer_fast with the frozen prefix cached across steps (dlzo.engine.prefix; dlzo train's default):
                 the layers below run no more
  lora           ZO-LoRA (r=8 on q/v of every layer) through the fast path
  floor          the forward a layer-restricted step cannot avoid (layer_fast without noise or update)
  rows_xN        layer_cached's pair forward (no noise, no update) over the batch repeated N times (N a power
                 of two): what N directions batched into one forward of 2NB rows would cost at best (every
                 copy runs the same tuned weights here); rows_xN / N against rows_x1 says how much a bigger
                 forward saves per direction on this machine (1.0: nothing)
  inference      one plain forward of the batch (for the memory ratio)
  hf_trainer     one dlzo.ZOTrainer step on the tuned layer: a causal-LM batch (labels = tokens, -100 on
                 padding) of the padded rows, training_step and the optimizer step (issue 15's memory figure)
  hf_inference   the model's own forward with labels on that batch (what a Trainer evaluation step runs)
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    TrainingArguments,
)

from dlzo.data.benchmarks import load_task
from dlzo.engine.fastpath import BranchedForward
from dlzo.engine.layer_choice import layer_parameters
from dlzo.engine.master import install_masters
from dlzo.engine.prefix import FrozenPrefix
from dlzo.engine.scope import add_lora
from dlzo.engine.scoring import EncodedBatch, batch_loss, encode, fast_layout
from dlzo.engine.zo import ZOOptimizer
from dlzo.errors import DlzoError
from dlzo.fields import comma_list
from dlzo.model.checkpoint import atomic_write_json
from dlzo.model.loading import decoder_layers, load_model, load_tokenizer, resolve_device, resolve_dtype
from dlzo.model.quantize import logical_parameters
from dlzo.model.quantized_load import layer_in_float, load_quantized, random_quantized, trim_heap
from dlzo.studies.options import BenchConfig
from dlzo.training.hf_trainer import ZOArguments, ZOTrainer

SHAPES = {
    # 125m: the SmolLM2-135M / MeZO-125M class shape named in the speed target (vocab 32000).
    "125m": dict(arch="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=32000, tie_word_embeddings=True),
    "350m": dict(arch="llama", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, intermediate_size=2816, vocab_size=32000),
    "llama2-7b": dict(arch="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, intermediate_size=11008, vocab_size=32000),
    "qwen3-8b": dict(arch="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                     tie_word_embeddings=False),
    # the two real models of ../shared, as random-init shapes: their memory and time without their weights (the
    # GGUF files do not travel to a GPU machine; scripts/gpu_check.sh)
    "smollm2-135m": dict(arch="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
}


def shape_config(shape: str) -> PretrainedConfig:
    """The config of a named shape (what `dlzo plan --shape` sizes without building the model)."""
    if shape not in SHAPES:
        raise DlzoError(f"--shape {shape!r} is not one of {', '.join(SHAPES)}")
    spec = dict(SHAPES[shape])
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[spec.pop("arch")]
    return config_class(**spec, use_cache=False)


def random_model(shape: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    config = shape_config(shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def bench_model(config: BenchConfig, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, str]:
    """The model the variants run on, and its name; with --quantize every linear but the LM head and --layer's
    quantized as it is read or made (dlzo.model.quantized_load)."""
    if config.model and config.quantize != "none":
        model = load_quantized(config.model, config.quantize, dtype=dtype, device=device)
        layer_in_float(model, config.layer)
        return model, config.model
    if config.model:
        return load_model(config.model, dtype=dtype, device=device), config.model
    if config.quantize != "none":
        model = random_quantized(shape_config(config.shape), dtype, device, config.quantize, config.layer)
        return model, f"random-init {config.shape}"
    return random_model(config.shape, dtype, device), f"random-init {config.shape}"


def synthetic_batches(batch: int, seq: int, vocab: int, seed: int = 0) -> tuple[EncodedBatch, EncodedBatch]:
    """SST-2-like inputs: `seq` prompt tokens, two one-token candidates. Returns (packed, one row per candidate)."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab, (batch, seq), generator=generator)
    candidates = torch.tensor([vocab - 1, vocab - 2])
    labels = torch.randint(0, 2, (batch,), generator=generator)
    examples = torch.arange(batch).repeat_interleave(2)
    slots = torch.arange(2).repeat(batch)
    positions = torch.arange(seq).expand(batch, -1)
    packed = EncodedBatch(prompts, torch.ones_like(prompts), positions, torch.arange(batch).repeat_interleave(2),
                          torch.full((2 * batch,), seq - 1), candidates.repeat(batch), torch.arange(2 * batch),
                          examples, slots, labels, batch, 2)
    rows = torch.cat([prompts.repeat_interleave(2, 0), candidates.repeat(batch)[:, None]], 1)
    separate = EncodedBatch(rows, torch.ones_like(rows), torch.arange(seq + 1).expand(2 * batch, -1), torch.arange(2 * batch), torch.full((2 * batch,), seq - 1),
                            candidates.repeat(batch), torch.arange(2 * batch), examples, slots, labels, batch, 2)
    return packed, separate


class PeakMemory:
    """Peak memory during a block: CUDA allocator stats, or sampled RSS on CPU (after malloc_trim)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @contextlib.contextmanager
    def measure(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        import psutil

        trim_heap()  # hand freed blocks back so RSS reflects this block only
        process, running, peak = psutil.Process(), [True], [0]

        def sample():
            while running[0]:
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            running[0] = False
            thread.join()
            self.peak = max(peak[0], process.memory_info().rss)


class TimedOptimizer(ZOOptimizer):
    """ZOOptimizer that records how long the update takes (for the full scope: the restore and the update,
    which share one noise pass). `upstream=True` restores and updates with two passes, as MeZO's code does."""

    def __init__(self, *args, upstream: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.update_s = 0.0
        self.upstream = upstream

    def apply_update(self, seeds, grads, zs=None, curvatures=None):
        start = time.perf_counter()
        super().apply_update(seeds, grads, zs, curvatures)
        self.update_s += time.perf_counter() - start

    def restore_and_update(self, seed, grad):
        if self.upstream:
            self.add_noise(seed, self.eps)
            self.apply_update([seed], [grad])
            return
        start = time.perf_counter()
        super().restore_and_update(seed, grad)
        self.update_s += time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def causal_lm_inputs(batch: EncodedBatch) -> dict[str, torch.Tensor]:
    """The batch as an ordinary causal-LM fine-tuning batch: labels are the tokens, -100 on padding."""
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": labels}


def hf_step(name: str, model: nn.Module, batch: EncodedBatch, layer: int, device: torch.device) -> Callable[[], object]:
    """hf_trainer: one dlzo.ZOTrainer step (training_step and the optimizer step that applies the update) on
    layer `layer`; hf_inference: the model's own forward with labels on the same batch (its loss, as an
    evaluation step computes it). The memory of the first against the second is issue 15's figure."""
    inputs = causal_lm_inputs(batch)
    if name == "hf_inference":
        return lambda: model(**inputs).loss
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, per_device_train_batch_size=batch.input_ids.shape[0],
                                 max_steps=1, learning_rate=1e-7, report_to="none", save_strategy="no",
                                 use_cpu=device.type == "cpu", disable_tqdm=True)
        trainer = ZOTrainer(model=model, args=args, zo_args=ZOArguments(scope=f"layer:{layer}"))
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before its training_step calls
    return lambda: (trainer.training_step(model, inputs), optimizer.step())


def repeated_batch(batch: EncodedBatch, variant: str) -> EncodedBatch:
    """The batch of variant rows_xN: N copies of `batch` (N a power of two, so doubling builds it)."""
    count = variant.removeprefix("rows_x")
    copies = int(count) if count.isdigit() else 0
    if copies < 1 or copies & (copies - 1):
        raise DlzoError(f"--variants {variant}: N in rows_xN must be a power of two")
    repeated = batch
    for _ in range(copies.bit_length() - 1):
        repeated = repeated.doubled()
    return repeated


def rows_forward(model: nn.Module, packed: EncodedBatch, variant: str, layer: int) -> Callable[[], object]:
    """Variant rows_xN's step: layer_cached's ±ε forward over N copies of the batch, no noise, no update."""
    named = layer_parameters(model, layer)
    repeated = repeated_batch(packed, variant)
    frozen = FrozenPrefix(model, layer, limit_bytes=2**62)
    frozen.fill(packed)  # the copies are the same sequences: every one is a cache hit
    runner = BranchedForward(model, [n for n, _ in named], frozen)
    fixed = {n: p.detach().clone() for n, p in named}
    return lambda: runner.loss_pair(repeated, fixed, fixed)


ONE_LAYER_VARIANTS = ("layer_plain", "layer_fast", "layer_cached", "floor")


def run_variant(name: str, model: nn.Module, packed: EncodedBatch, separate: EncodedBatch, layer: int,
                repeats: int, device: torch.device, master_weights: str = "off") -> dict:
    """Time `repeats` steps (after one warm-up) and return the medians. A one-layer variant of a half-precision
    model holds the layer as float32 masters when `master_weights` asks (dlzo.engine.master, as dlzo train);
    they are cast back into the model afterwards, for the next variant."""
    masters = None
    if name in ONE_LAYER_VARIANTS:
        masters = install_masters(model, [n for n, _ in layer_parameters(model, layer)], master_weights, "layer")
    try:
        return _run_variant(name, model, packed, separate, layer, repeats, device, masters)
    finally:
        if masters is not None:
            masters.remove()


def _run_variant(name: str, model: nn.Module, packed: EncodedBatch, separate: EncodedBatch, layer: int,
                 repeats: int, device: torch.device, masters) -> dict:
    forward_s = [0.0]
    working = masters.working if masters else None

    def timed(fn):
        def wrapper(*args):
            _sync(device)
            start = time.perf_counter()
            value = fn(*args)
            _sync(device)
            forward_s[0] += time.perf_counter() - start
            return value
        return wrapper

    lora_model = None
    if name in ("upstream_full", "full"):
        named = [(n, p) for n, p in model.named_parameters()]
        optimizer = TimedOptimizer(named, lr=1e-7, eps=1e-3, exact_restore=False, upstream=name == "upstream_full")
        batch, full_logits = (separate, True) if name == "upstream_full" else (packed, False)
        step = lambda: optimizer.step(timed(lambda: batch_loss(model, batch, full_logits=full_logits)))  # noqa: E731
    elif name == "layer_plain":
        optimizer = TimedOptimizer(layer_parameters(model, layer), lr=1e-7, eps=1e-3, exact_restore=True,
                                   working_dtypes=working)
        step = lambda: optimizer.step(timed(lambda: batch_loss(model, separate, full_logits=True)))  # noqa: E731
    elif name in ("layer_fast", "layer_cached", "lora", "floor"):
        frozen = None
        if name == "lora":
            torch.manual_seed(0)
            lora_model = add_lora(model, None)
            named = [(n, p) for n, p in lora_model.named_parameters() if "lora_" in n]
            target = lora_model
        else:
            named, target = layer_parameters(model, layer), model
        if name == "layer_cached":  # the frozen prefix filled once, as dlzo train does before step 0
            frozen = FrozenPrefix(target, layer, limit_bytes=2**62)
            frozen.fill(packed)
        runner = BranchedForward(target, [n for n, _ in named], frozen)
        optimizer = TimedOptimizer(named, lr=1e-7, eps=1e-3, working_dtypes=working if name != "lora" else None)
        pair = timed(lambda plus, minus: runner.loss_pair(packed, plus, minus))
        if name == "floor":
            fixed = {n: p.detach().clone() for n, p in named}
            step = lambda: pair(fixed, fixed)  # noqa: E731
        else:
            step = lambda: optimizer.step_functional(pair)  # noqa: E731
    elif name.startswith("rows_x"):
        optimizer = None
        step = timed(rows_forward(model, packed, name, layer))
    elif name == "inference":
        optimizer = None
        step = timed(lambda: model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits)
    elif name in ("hf_trainer", "hf_inference"):
        optimizer = None
        step = timed(hf_step(name, model, separate, layer, device))
    else:
        raise DlzoError(f"unknown bench variant {name!r}")

    with torch.no_grad():
        step()  # warm-up
        memory = PeakMemory(device)
        totals, forwards, updates = [], [], []
        with memory.measure():
            for _ in range(repeats):
                forward_s[0] = 0.0
                if optimizer is not None:
                    optimizer.update_s = 0.0
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                totals.append(time.perf_counter() - start)
                forwards.append(forward_s[0])
                updates.append(optimizer.update_s if optimizer is not None else 0.0)
    if lora_model is not None:
        lora_model.unload()  # the base model goes back to its plain modules for the next variant
    step_s, forward, update = (statistics.median(v) for v in (totals, forwards, updates))
    return {"step_s": step_s, "forward_s": forward, "update_s": update,
            "perturb_s": max(step_s - forward - update, 0.0), "peak_mem_bytes": memory.peak, "repeats": repeats}


def bench(config: BenchConfig) -> dict:
    config.validate()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model, source = bench_model(config, dtype, device)
    if config.layer >= len(decoder_layers(model)):
        raise DlzoError(f"--layer {config.layer}: {source} has layers 0..{len(decoder_layers(model)) - 1}")
    if config.task:
        tokenizer = load_tokenizer(config.model, convert_gguf=config.quantize == "none") if config.model else None
        if tokenizer is None:
            raise DlzoError("--task needs --model (a tokenizer) for real inputs")
        examples = load_task(config.task, config.data_dir).splits(seed=0).train[: config.batch]
        packed = encode(tokenizer, examples, layout=fast_layout(model, tokenizer))
        separate = encode(tokenizer, examples, pack_single_token=False)  # MeZO: padded, one row per candidate
        inputs = f"{config.task} train examples 0..{config.batch - 1}"
    else:
        packed, separate = synthetic_batches(config.batch, config.seq, model.config.vocab_size)
        inputs = f"synthetic: {config.seq} prompt tokens, 2 one-token candidates"
    packed, separate = packed.to(device), separate.to(device)
    results = {}
    for name in comma_list(config.variants):
        results[name] = run_variant(name, model, packed, separate, config.layer, config.repeats, device,
                                    config.master_weights)
        print(f"{name:>14}: step {results[name]['step_s']:.3f}s  (forward {results[name]['forward_s']:.3f}s, "
              f"perturb {results[name]['perturb_s']:.3f}s, update {results[name]['update_s']:.3f}s)  "
              f"peak {results[name]['peak_mem_bytes'] / 2**20:.0f} MiB", flush=True)

    def ratio(a: str, b: str, key: str = "step_s") -> float | None:
        if a in results and b in results and results[a][key] > 0:
            return results[b][key] / results[a][key] if key == "step_s" else results[a][key] / results[b][key]
        return None

    ratios = {
        "dominant_vs_upstream_full": ratio("layer_fast", "upstream_full"),
        "dominant_vs_full": ratio("layer_fast", "full"),
        "cached_vs_fast": ratio("layer_cached", "layer_fast"),
        "dominant_vs_floor": ratio("floor", "layer_fast"),
        "peak_mem_vs_inference": ratio("layer_fast", "inference", "peak_mem_bytes"),
        "cached_peak_mem_vs_inference": ratio("layer_cached", "inference", "peak_mem_bytes"),
        "hf_trainer_mem_vs_inference": ratio("hf_trainer", "hf_inference", "peak_mem_bytes"),
        "hf_trainer_step_vs_inference": ratio("hf_inference", "hf_trainer"),
    }
    for name in results:  # per direction: rows_xN's forward / N against rows_x1's (below 1: batching saves)
        if name.startswith("rows_x") and name != "rows_x1" and "rows_x1" in results:
            copies = int(name.removeprefix("rows_x"))
            ratios[f"{name}_per_direction_vs_x1"] = results[name]["step_s"] / copies / results["rows_x1"]["step_s"]
    report = {
        "model": source, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "quantize": config.quantize,
        "master_weights": config.master_weights != "off" and dtype in (torch.bfloat16, torch.float16),
        "threads": torch.get_num_threads(), "batch": config.batch, "inputs": inputs,
        "fast_tokens": int(packed.input_ids.numel()), "upstream_tokens": int(separate.input_ids.numel()),
        "fast_shape": list(packed.input_ids.shape), "upstream_shape": list(separate.input_ids.shape), "layer": config.layer,
        "parameters": logical_parameters(model),
        "layer_parameters": sum(p.numel() for _, p in layer_parameters(model, config.layer)),
        "variants": results, "ratios": ratios,
        "notes": "dominant_* ratios: other variant's step_s / layer_fast step_s (higher is better); "
                 "dominant_vs_floor: layer_fast / floor (1.0 is ideal); peak_mem_vs_inference: layer_fast / inference.",
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench.json", report)
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items() if v is not None))
    print(f"wrote {out / 'bench.json'}")
    return report
