"""The studies' options: one dataclass per command (sweep, sensitivity, demo, bench, race), built from the
shared groups of dlzo.training.config so that a flag has one name, one default and one help text everywhere.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dlzo.choices import Dtype, MasterPolicy, Quantize, parse_scope
from dlzo.errors import DlzoError
from dlzo.fields import at_least_one, check_choices, comma_list, option, positive, same_as
from dlzo.model.loading import resolve_device
from dlzo.model.quantize import check_quantize
from dlzo.training.config import DataOptions, DataSource, TaskOptions, TrainConfig

# the names `dlzo sweep` gives its runs (runs/<name>), so that a misspelt --only is refused before anything is
# written (which runs a sweep has is known only after its probe); a test ties this to the names given
RUN_NAME = r"layer\d{2,}|full|lora|adamw|lezo\d+"


def only_names(only: str) -> list[str]:
    """The run names of a sweep's --only (empty: every run)."""
    return comma_list(only)


def is_lezo(scope: str) -> bool:
    try:
        return parse_scope(scope).kind == "lezo"
    except DlzoError:
        return False


def reference_names(references: str) -> list[str]:
    """--references as a list (full, lora, adamw, lezo:K); anything else is one line naming it."""
    names = comma_list(references)
    unknown = [r for r in names if r not in ("full", "lora", "adamw") and not is_lezo(r)]
    if unknown:
        raise DlzoError(f"--references: {unknown[0]!r} is not full, lora, adamw or lezo:K")
    return names


@dataclass
class SweepConfig(TaskOptions, DataOptions):
    model: str = option("", "model to sweep (hub id, folder, .gguf, short name)")
    out: str = option("out/sweep", "sweep folder: sweep.json, sweep.png and one run folder per scope")
    layers: str = option("all", "layers to tune alone: all, none (references only), or K1,K2,... (every probe rule's "
                                "layer is added)")
    references: str = option("full,lora", "reference runs: any of full, lora, adamw (first-order, full model), "
                                          "lezo:K (LeZO, K random layers per step, at --full-lr)")
    steps: int = option(200, "steps of every run")
    batch_size: int = same_as(TrainConfig, "batch_size")
    lr: float = same_as(TrainConfig, "lr", help="learning rate of the one-layer runs")
    full_lr: float = option(-1.0, "learning rate of full MeZO (-1: same as --lr)")
    lora_lr: float = option(-1.0, "learning rate of ZO-LoRA (-1: same as --lr)")
    adamw_lr: float = option(1e-5, "learning rate of the first-order reference")
    lr_grid: str = option("", "choose each ZO scope's learning rate on dev loss first: comma-separated rates (e.g. "
                               "1e-4,1e-3), each trained --grid-steps steps with --grid-seed and no test examples; "
                               "the rate with the lowest dev loss at the last grid step is used for every seed "
                               "(grid.json); empty: --lr, --full-lr, --lora-lr as given")
    grid_steps: int = option(60, "--lr-grid: steps of each grid run")
    grid_seed: int = option(0, "--lr-grid: run seed of the grid runs")
    grid_out: str = option("", "--lr-grid: folder of the grid runs and grid.json (empty: OUT/grid)")
    grid_from: str = option("", "--lr-grid: take each scope's rate from this grid.json, kept from an earlier sweep of "
                                "the same recipe (e.g. committed with a study continued on another machine), "
                                "instead of training the grid again; it must have the same rates, --grid-steps and "
                                "--grid-seed and a rate for every ZO scope of this sweep")
    eps: float = same_as(TrainConfig, "eps")
    seed: int = option(0, "run seed, the same for every run")
    seeds: str = option("", "repeat the whole sweep for each of these run seeds (e.g. 0,1,2) in OUT/seed<S>/ and "
                            "summarise mean ± std across them in OUT/seeds.json; empty: one sweep with --seed in OUT")
    num_train: int = same_as(TrainConfig, "num_train")
    num_dev: int = same_as(TrainConfig, "num_dev")
    num_test: int = same_as(TrainConfig, "num_test")
    eval_every: int = same_as(TrainConfig, "eval_every", default=50)
    dtype: Dtype = same_as(TrainConfig, "dtype")
    prefix_store: str = same_as(TrainConfig, "prefix_store")
    only: str = option("", "train only these runs (comma-separated names, e.g. layer03 or layer23,full): two "
                           "processes with different --only share one sweep folder, each on its own cores; the other "
                           "runs are reported once finished, and the verdict waits until every run is")
    quiet: bool = option(True, "no per-step progress bars")

    def validate(self) -> None:
        """Checks that need no file, before the sweep folder or any run is made (exit 2)."""
        if not self.model:
            raise DlzoError("--model is required")
        check_choices(self)
        at_least_one(self, "steps", "batch_size", "grid_steps")
        if self.only.strip() and not only_names(self.only):
            raise DlzoError(f"--only {self.only!r} names no run (give e.g. layer03 or layer23,full)")
        bad = next((name for name in only_names(self.only) if not re.fullmatch(RUN_NAME, name)), None)
        if bad is not None:
            raise DlzoError(f"--only {bad!r} is not a run name (layer<KK> such as layer03, full, lora, adamw, lezo<K>)")
        for name in ("lr", "eps", "adamw_lr"):
            positive(self, name)
        if self.grid_from and not self.lr_grid:
            raise DlzoError("--grid-from needs --lr-grid (the rates the kept grid was trained with)")
        references = reference_names(self.references)  # an unknown one is reported whatever --layers says
        if self.layers == "none" and not references:
            raise DlzoError("--layers none and no --references: nothing to sweep")


@dataclass
class SensitivityConfig(TaskOptions, DataSource):
    model: str = option("", "model (hub id, folder, .gguf, short name)")
    out: str = option("out/sensitivity", "folder for sensitivity.json, sensitivity.png, propagation.png")
    seeds: int = option(3, "directions per layer")
    batches: int = option(2, "training batches per direction")
    batch_size: int = same_as(TrainConfig, "batch_size")
    eps: float = same_as(TrainConfig, "eps")
    dtype: Dtype = same_as(TrainConfig, "dtype")
    stability: bool = option(False, "measure a second time on other directions and other batches, and report the "
                                    "rank correlation of the two per-layer rankings (is the ranking stable?) and the cost")

    def validate(self) -> None:
        if not self.model:
            raise DlzoError("--model is required")
        check_choices(self)
        at_least_one(self, "seeds", "batches", "batch_size")
        positive(self, "eps")


@dataclass
class DemoConfig:
    shared: str = option("../shared", "folder of the sample assets (models/, data/); when it has none, the demo "
                                      "fetches --hub-model and SST-2 from the Hugging Face hub")
    out: str = option("demo_out", "output folder; the report is OUT/report.md")
    model: str = option("smollm2-135m", "model; falls back to stories260k when SmolLM2 is not in --shared")
    hub_model: str = option("HuggingFaceTB/SmolLM2-135M-Instruct", "without sample assets: the model fetched from "
                                                                   "the hub (the same SmolLM2-135M, in safetensors)")
    hub_data: str = option("hf", "without sample assets: where SST-2 comes from (hf: the hub's GLUE SST-2, or "
                                 "hf:FOLDER, a local dataset folder in the same layout)")
    steps: int = option(40, "training steps of each run (the same for both)")
    # the demo's recipe, not other defaults of train's --lr and sweep's --full-lr: the rates its SmolLM2-135M
    # grids chose for each run (a full-model step moves far more than one layer's)
    dominant_lr: float = option(1e-3, "the recipe's ZO learning rate of the dominant layer (SmolLM2-135M grid: "
                                      "docs/results/smollm2-135m)")
    full_mezo_lr: float = option(1e-4, "the recipe's ZO learning rate of full MeZO (its own grid)")
    eps: float = same_as(TrainConfig, "eps")
    num_dev: int = same_as(TrainConfig, "num_dev", default=100)
    num_test: int = same_as(TrainConfig, "num_test", default=200)


@dataclass
class BenchConfig(TaskOptions):
    model: str = option("", "local model / .gguf / short name; empty: a random-init model of --shape")
    shape: str = option("125m", "random-init shape: 125m, 350m, llama2-7b, qwen3-8b, smollm2-135m, qwen2.5-0.5b")
    task: str = option("", "use this task's real (padded) training inputs instead of synthetic ones")
    batch: int = option(16, "examples per step")
    seq: int = option(64, "prompt tokens of the synthetic inputs")
    layer: int = option(1, "the tuned layer of the one-layer variants")
    repeats: int = option(3, "timed steps per variant after one warm-up (the median is reported)")
    dtype: Dtype = same_as(TrainConfig, "dtype")
    device: str = same_as(TrainConfig, "device")
    out: str = option("out/bench", "folder for bench.json")
    variants: str = option("upstream_full,full,layer_plain,layer_fast,layer_cached,lora,floor,inference",
                           "variants to run")
    quantize: Quantize = option("none", "hold every linear but the LM head and --layer's in 8 or 4 bits "
                                        "(dlzo.model.quantize; a random --shape is made layer by layer, never in "
                                        "full precision): none, int8, int4. Only the one-layer variants and "
                                        "inference then run")
    master_weights: MasterPolicy = option("auto", "the one-layer variants in bfloat16/float16: the layer's "
                                                  "tensors as float32 masters cast per forward, as dlzo train "
                                                  "holds them (auto and on: masters; off: the working dtype)")

    def validate(self) -> None:
        """The flags alone; --layer is checked against the model once it is loaded (dlzo.studies.bench)."""
        check_choices(self)
        at_least_one(self, "batch", "seq", "repeats")
        if self.layer < 0:
            raise DlzoError(f"--layer must not be negative, not {self.layer}")
        if self.quantize != "none":
            tuning_all = [v for v in comma_list(self.variants) if v in ("upstream_full", "full", "lora")]
            if tuning_all:
                raise DlzoError(f"--quantize {self.quantize}: variant {tuning_all[0]} tunes weights outside --layer, "
                                f"which are quantized; run the one-layer variants and inference "
                                f"(layer_plain, layer_fast, layer_cached, floor, rows_xN, inference)")
            check_quantize(self.quantize, resolve_device(self.device))


@dataclass
class RaceConfig(TaskOptions):
    """`dlzo race`: time to accuracy of several recipes in one process (dlzo.studies.race)."""

    model: str = option("", "model (hub id, folder, .gguf, short name)")
    recipes: str = option("adamw: optimizer=adamw scope=full lr=1e-5; full: scope=full lr=1e-4; "
                          "dominant: scope=layer:11 lr=1e-3",
                          "recipes 'NAME: key=value ...; NAME: ...', keys any train option (scope, optimizer, lr, "
                          "zo_update, beta1, q, ...)")
    seeds: str = option("0", "run seeds, comma-separated (several: mean and spread)")
    target: float = option(0.7, "test metric each recipe races to")
    budget_s: float = option(240.0, "training seconds per recipe at most (evaluation not counted)")
    max_steps: int = option(100000, "steps per recipe at most")
    eval_every: int = option(10, "score the fixed test subset every N steps")
    num_test: int = option(200, "the fixed test subset: this many examples of the validation split")
    dev_loss: bool = option(False, "also record the dev loss at every evaluation (with full MeZO among the recipes "
                                   "and --no-stop-at-target: each recipe's time to full MeZO's own best dev loss)")
    stop_at_target: bool = option(True, "stop a recipe when it reaches --target (false: every recipe trains for the "
                                        "whole budget, for the dev-loss comparison)")
    full_recipe: str = option("full", "the recipe that is full MeZO (the upstream estimate uses its steps)")
    adamw_recipe: str = option("adamw", "the recipe that is the first-order reference")
    upstream_repeats: int = option(2, "timed upstream-style full MeZO steps after a warm-up (0: skip the estimate)")
    batch_size: int = same_as(TrainConfig, "batch_size")
    eps: float = same_as(TrainConfig, "eps")
    num_train: int = same_as(TrainConfig, "num_train")
    num_dev: int = same_as(TrainConfig, "num_dev", default=100)
    data_seed: int = same_as(TrainConfig, "data_seed")
    eval_batch_size: int = same_as(TrainConfig, "eval_batch_size")
    max_length: int = same_as(TrainConfig, "max_length")
    dtype: Dtype = same_as(TrainConfig, "dtype")
    device: str = same_as(TrainConfig, "device")
    out: str = option("out/race", "folder for race.json, race.png and one run folder per seed and recipe")

    def validate(self) -> None:
        if not self.model:
            raise DlzoError("--model is required")
        check_choices(self)
        at_least_one(self, "eval_every", "num_test", "max_steps")
        if not (math.isfinite(self.budget_s) and self.budget_s > 0):
            raise DlzoError(f"--budget-s must be a positive number of seconds, not {self.budget_s}")
        seeds = comma_list(self.seeds, int, f"--seeds {self.seeds!r} is not comma-separated integers")
        if not seeds or len(set(seeds)) != len(seeds):
            raise DlzoError(f"--seeds {self.seeds!r}: needs at least one seed, each once")

