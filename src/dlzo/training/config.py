"""A training run's options (`TrainConfig`) and the groups other commands share with it (loading a model,
reading a task, your own data): declared once and inherited, so a flag has one name, one default and one help
text everywhere. The command line generates one flag per field (cli/flags.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from dlzo.choices import (
    DISTRIBUTIONS,
    GENERATED,
    QUANTIZE_HELP,
    SCOPE_HELP,
    Distribution,
    Dtype,
    Estimator,
    LayerRule,
    MasterPolicy,
    Objective,
    Quantize,
    UpdateRule,
    parse_scope,
    report_targets,
)
from dlzo.data.formats import FORMATS, DataFormat
from dlzo.data.hub import DATA_DIR_HELP, is_hub_source
from dlzo.data.readers import parse_columns
from dlzo.errors import DlzoError
from dlzo.evaluation.rewards import absolute_spec, split_spec
from dlzo.fields import at_least_one, bad_choice, check_choices, option, positive, same_as

DEFAULT_MAX_DEV = 500  # --data with --num-dev -1: at most this many held-out dev rows


Scheduler = Literal["constant", "linear", "cosine", "constant_with_warmup"]  # transformers.get_scheduler's names
SCHEDULERS = get_args(Scheduler)
Optimizer = Literal["zo", "adamw"]  # SPSA, forward only; or the first-order reference
Parallel = Literal["data", "perturbation"]  # what several ranks split: the batch, or the q directions


# options naming a local file or folder: recorded absolute, so a run's record names them from any folder
PATH_OPTIONS = ("model", "data", "eval_data", "data_dir")


def absolute_paths(config: object) -> None:
    """Each PATH_OPTIONS value naming an existing local path, made absolute (hub ids, hf: sources and
    --data-dir hf stay), and --prefix-store, a folder that may not exist yet. Links are kept, not followed:
    a Hub cache file is a link to a blob without the name's extension, which says its format."""
    for name in PATH_OPTIONS:
        value = getattr(config, name, "")
        if value and not is_hub_source(value) and Path(value).expanduser().exists():
            setattr(config, name, os.path.abspath(os.path.expanduser(value)))
    if getattr(config, "prefix_store", ""):
        config.prefix_store = os.path.abspath(os.path.expanduser(config.prefix_store))


def same_path_option(name: str, was: object, now: object) -> bool:
    """Two values of an option that name the same thing: equal, or for PATH_OPTIONS the same resolved path
    (a run recorded before paths were made absolute: its relative path read from the current folder)."""
    if was == now:
        return True
    if name not in PATH_OPTIONS or not (isinstance(was, str) and isinstance(now, str) and was and now):
        return False
    return Path(was).expanduser().resolve() == Path(now).expanduser().resolve()


@dataclass
class ModelOptions:
    model: str = option("", "hub id, local folder, .gguf file, or short name (smollm2-135m, stories260k)")
    dtype: Dtype = option("auto", "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    trust_remote_code: bool = option(False, "allow model code from the hub to run (off by default)")

    def validate_model_options(self) -> None:
        """The model group's flags, and every option of the config with a fixed set of values (its `Literal`
        fields: a config built in Python or from a run's record has not been through argparse's choices)."""
        check_choices(self)
        device = self.device.split(":")[0]
        if device not in ("auto", "cpu", "cuda", "mps", "xpu"):
            raise DlzoError(f"--device {self.device!r} is not auto, cpu, cuda[:N], mps or xpu")


@dataclass
class TaskOptions:
    task: str = option("sst2", "task name: sst2 rte cb boolq wsc wic multirc copa record squad drop")
    data_dir: str = option("../shared/data", DATA_DIR_HELP)


@dataclass
class DataSource:
    """Your own rows instead of a benchmark task (dlzo.data.user_data; docs/your-data.md): --data wins over --task."""

    data: str = option("", "your own data instead of --task: a .jsonl, .json, .csv or .parquet file, or "
                           "hf:NAME[:CONFIG][:SPLIT] (docs/your-data.md)")
    data_format: DataFormat = option("auto", "with --data: auto (from the fields), " + ", ".join(FORMATS))
    columns: str = option("", "with --data: map the source's columns onto the fields, e.g. "
                              "prompt=question,completion=answer")

    def validate_data_options(self) -> None:
        """Flag checks of the data group (no file is read): one line naming the flag."""
        parse_columns(self.columns)
        fraction = getattr(self, "eval_fraction", 0.5)
        if not (math.isfinite(fraction) and 0 < fraction < 1):
            raise DlzoError(f"--eval-fraction must be between 0 and 1, not {fraction}")
        if not self.data:
            for name in ("eval_data", "columns"):
                if getattr(self, name, ""):
                    raise DlzoError(f"--{name.replace('_', '-')} needs --data (the file of your own rows)")


@dataclass
class DataOptions(DataSource):
    eval_data: str = option("", "with --data: the dev rows (default: a seeded --eval-fraction of --data is held out)")
    eval_fraction: float = option(0.1, "with --data and no --eval-data: the fraction of rows held out as the dev set")


@dataclass
class TrainConfig(ModelOptions, TaskOptions, DataOptions):
    out: str = option("runs/train", "run folder for checkpoints, logs and results")
    resume: str = option("", "continue the interrupted run in this folder: its recorded arguments are the defaults, "
                             "and flags given must agree with them (--steps may grow with a constant rate)")
    scope: str = option("dominant", SCOPE_HELP)
    rule: LayerRule = option("guarded", "how --scope dominant picks its layer: guarded (the sun rule's layer where the "
                              "paper's premise holds there: at least nine in ten calibration sequences carry the outlier and it has "
                              "stopped growing; else the last layer; docs/rules.md), sun (first layer with max|h| > "
                              "100 and >= 1000x the median), onset (the largest persistent jump of max|h|), with sun "
                              "and onset the most perturbation-sensitive layer when the rule finds none; or screen (a "
                              "few ZO steps of the rules' layers and the last layer at rates around --lr, compared on "
                              "dev loss)")
    params: str = option("all", "tensors inside the tuned layers: all, mlp, attn, or a regex over names")
    optimizer: Optimizer = option("zo", "zo (SPSA, forward only) or adamw (first-order reference, backpropagation)")
    gradient_checkpointing: bool = option(False, "with --optimizer adamw: the decoder layers from the lowest tuned "
                                                 "one up keep only their input, their activations recomputed in "
                                                 "the backward (transformers' non-reentrant checkpointing): less "
                                                 "memory (dlzo plan), one more forward of those layers")
    steps: int = option(1000, "optimisation steps")
    num_train_epochs: float = option(0.0, "train for this many passes over the training examples instead of --steps "
                                          "(transformers' num_train_epochs): steps = ceil(epochs × floor(training "
                                          "examples / --batch-size)), counted once the data is read; 0: --steps")
    batch_size: int = option(16, "examples per step (MeZO: 16)")
    grad_accum: int = option(1, "micro-batches per step; ZO uses one z across them")
    lr: float = option(1e-6, "learning rate (peak rate with a schedule)")
    lr_scheduler: Scheduler = option("constant", "learning-rate schedule: " + ", ".join(SCHEDULERS)
                               + " (transformers.get_scheduler)")
    warmup_steps: int = option(0, "linear warm-up steps of the schedule")
    warmup_ratio: float = option(0.0, "with --warmup-steps 0: linear warm-up over this fraction of the steps, "
                                      "rounded up (transformers' warmup_ratio)")
    eps: float = option(1e-3, "ZO perturbation scale epsilon")
    q: int = option(1, "ZO directions per step (the projected gradients are averaged)")
    parallel: Parallel = option("data", "with several ranks: data (shard the batch) or perturbation (split the q directions)")
    device_map: str = option("", "'auto' spreads one model over this machine's GPUs (forward only, all ZO needs)")
    weight_decay: float = option(0.0, "weight decay (never on biases and norms)")
    distribution: Distribution = option("gaussian", "ZO direction distribution: " + " or ".join(DISTRIBUTIONS))
    estimator: Estimator = option("two-sided", "ZO gradient estimate: two-sided ((L(θ+εz) - L(θ-εz))/2ε, MeZO) or one-sided "
                                         "((L(θ+εz) - L(θ))/ε, L(θ) shared by the --q directions: q+1 forwards a "
                                         "step instead of 2q)")
    zo_update: UpdateRule = option("sgd", "ZO update rule on the SPSA estimate g·z: sgd (MeZO), momentum (m <- beta1·m + "
                                   "g·z), adam (ZO-AdaMM), hizoo (HiZOO's diagonal Hessian estimate scales the "
                                   "perturbation and the step; three forwards a step), normalized (FZOO: the "
                                   "step divided by the spread of the --q estimates, q >= 2) or orthogonal "
                                   "(ZO-Muon: each matrix's step is its polar factor, every step of RMS --lr; "
                                   "with --distribution lowrank); state only over the tuned tensors, rebuilt by "
                                   "replay")
    beta1: float = option(0.9, "--zo-update momentum / adam: the first-moment decay")
    beta2: float = option(0.999, "--zo-update adam: the second-moment decay")
    hessian_smooth: float = option(1e-6, "--zo-update hizoo: the weight of each step's curvature sample in the "
                                         "Hessian estimate (HiZOO's alpha)")
    lowrank_rank: int = option(4, "--distribution lowrank: the rank r of each matrix's z = U·Vᵀ/sqrt(r) (LOZO)")
    lowrank_lazy: int = option(50, "--distribution lowrank: steps that share one V, i.e. one subspace of each "
                                   "matrix (LOZO's lazy sampling)")
    lr_per_rms: float = option(0.0, "with --zo-update normalized or orthogonal: the rate is this many times the "
                                    "RMS of the tuned matrices at step 0, in place of --lr (0.05 measured to carry "
                                    "from SmolLM2 to Qwen2.5 with normalized; docs/benchmarks.md); 0: --lr")
    zo_mask: float = option(0.0, "perturb and update only this fraction of each tuned matrix, its smallest-"
                                 "magnitude weights at step 0 (Sparse-MeZO); 0: every weight")
    seed: int = option(0, "run seed: ZO directions and data order")
    data_seed: int = option(0, "seed of the train/dev/test sampling (MeZO's train_set_seed; --data: of the "
                               "held-out rows)")
    num_train: int = option(1000, "training examples sampled from the official train split (--data: every "
                                  "training row is used)")
    num_dev: int = option(-1, "dev examples (-1: the task's MeZO default, 500 or 100; --data: at most this many "
                              "held-out rows, -1: 500)")
    num_test: int = option(1000, "test examples sampled from the official validation split")
    eval_every: int = option(100, "evaluate dev loss (and save) every N steps; 0: only at the end")
    eval_batch_size: int = option(32, "batch size for dev loss and test evaluation")
    fast_path: bool = option(True, "shared prefix, batched ±ε branches, answer-only logits, packed candidates")
    prefix_cache_mb: int = option(2048, "fast path: cache the frozen layers' output below the tuned layer for "
                                        "every train/dev sequence (computed once; dlzo.engine.prefix) up to this many MB; "
                                        "0: off")
    prefix_store: str = option("", "fast path: also keep that cache on disk in this folder and reuse it in later runs "
                                   "over the same data and frozen weights (a sweep's grid and seeds; "
                                   "dlzo.engine.prefix_store), with the untrained model's dev loss, measured once "
                                   "per layer and dev set; empty: per run only")
    exact_restore_fraction: float = option(0.1, "restore by copy when the scope is at most this fraction of the model")
    master_weights: MasterPolicy = option("auto", "bfloat16/float16 models: keep a float32 master of each tuned tensor, which "
                                         "the perturbation, update, optimizer state and checkpoints act on and the "
                                         "forward casts (at lr 1e-6 bfloat16 rounds 999 in 1000 elements of an "
                                         "update away). auto: every scope but full and lezo:K (+2 bytes a tuned parameter: one "
                                         "layer of L adds 1/L to the model's memory); on: the full scope too (+2 "
                                         "bytes for every parameter: the model's memory doubles); off: update the "
                                         "tensors in their own dtype (as before). No effect in float32")
    quantize: Quantize = option("none", QUANTIZE_HELP)
    max_nonfinite: int = option(5, "stop after this many non-finite losses in a row")
    lora_r: int = option(8, "LoRA rank for --scope lora / dominant-lora")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_targets: str = option("", "LoRA target modules, comma-separated (peft's target_modules; default q_proj,v_proj "
                                   "where the model has them, else peft's default for the architecture)")
    max_length: int = option(1024, "truncate prompts from the left to this many tokens")
    objective: Objective = option("loss", "what the ZO step maximizes (docs/objectives.md): loss (minimized, the "
                                          "default); accuracy (classification: the options ranked in both branches' "
                                          "forward); f1 or exact-match (generation: greedy completions of both "
                                          "branches against the answers). The dev set's metric chooses the best "
                                          "checkpoint")
    reward: str = option("", "train on a reward of your own instead: PATH.py:FUNCTION, called as FUNCTION(prompts, "
                             "completions, rows) -> list[float] on completions of --data's prompt rows "
                             "{\"prompt\": ...} under both perturbations; the dev rows' mean reward chooses the "
                             "checkpoint (docs/objectives.md)")
    max_new_tokens: int = option(50, "--reward and --objective f1/exact-match: tokens generated per prompt")
    temperature: float = option(0.0, "--reward and --objective f1/exact-match: 0 greedy completions at each step; "
                                     "above 0 sampled at this temperature with the same random numbers for both "
                                     "branches (the dev set's are always greedy)")
    log_every: int = option(10, "write a line of training loss and lr to metrics.jsonl every N steps")
    save_every: int = option(0, "also write last.safetensors (the resume point) every N steps; 0: at each "
                                "evaluation (--eval-every) only")
    report_to: str = option("none", "also log scalars to one or more of: tensorboard, wandb (e.g. --report-to "
                                    "tensorboard wandb); none: only metrics.jsonl, which is always written",
                            several=True)
    run_name: str = option("", "the run's name in TensorBoard and W&B (default: the --out folder's name)")
    quiet: bool = option(False, "no progress bar")

    def validate(self) -> None:
        """Checks that need no file: each names its flag (exit 2, before any work)."""
        if not self.model:
            raise DlzoError("--model is required")
        self.validate_model_options()
        self.validate_data_options()
        absolute_paths(self)
        self.reward = absolute_spec(self.reward)  # a resumed run (or dlzo eval --run) finds the file from any folder
        check_objective_options(self)
        if self.gradient_checkpointing and self.optimizer != "adamw":
            raise DlzoError("--gradient-checkpointing needs --optimizer adamw: a ZO step runs forwards only, with no "
                            "backward whose activations could be recomputed")
        at_least_one(self, "steps", "batch_size", "grad_accum", "q", "eval_batch_size", "lora_r", "max_length",
                      "max_nonfinite")
        positive(self, "lr")
        positive(self, "eps")
        at_least_one(self, "log_every", "lowrank_rank", "lowrank_lazy")
        report_targets(self.report_to)
        if not (math.isfinite(self.num_train_epochs) and self.num_train_epochs >= 0):
            raise DlzoError(f"--num-train-epochs must not be negative, not {self.num_train_epochs}")
        if not (math.isfinite(self.warmup_ratio) and 0 <= self.warmup_ratio <= 1):
            raise DlzoError(f"--warmup-ratio must be between 0 and 1, not {self.warmup_ratio}")
        for name in ("eval_every", "save_every", "warmup_steps", "weight_decay", "num_train", "num_test",
                     "prefix_cache_mb", "lr_per_rms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise DlzoError(f"--{name.replace('_', '-')} must not be negative, not {value}")
        if self.num_dev < -1:
            raise DlzoError(f"--num-dev must be -1 (the task's default) or at least 0, not {self.num_dev}")
        if self.data and self.num_dev == 0:
            raise DlzoError("--num-dev 0: with --data the dev set needs at least 1 row (-1: at most 500)")
        if self.batch_size % self.grad_accum:
            raise DlzoError("--batch-size must be a multiple of --grad-accum")
        if self.estimator == "one-sided" and self.scope == "full" and self.exact_restore_fraction < 1:
            raise DlzoError("--estimator one-sided: --scope full perturbs the weights in place with MeZO's round "
                            "trip, which has no unperturbed evaluation to share; pass --exact-restore-fraction 1 "
                            "(a copy of the weights) or use the two-sided estimator")
        if self.quantize != "none":
            self.validate_quantize()
        if self.zo_update == "hizoo" and self.scope == "full" and self.exact_restore_fraction < 1:
            raise DlzoError("--zo-update hizoo: --scope full perturbs the weights in place with MeZO's round trip, "
                            "which cannot scale z by the Hessian estimate; pass --exact-restore-fraction 1 (a "
                            "copy of the weights)")
        if self.zo_update == "hizoo" and self.scope.startswith("lezo"):
            raise DlzoError("--zo-update hizoo: --scope lezo:K leaves layers out of each direction, whose Hessian "
                            "estimate would then shrink unmeasured; use a fixed scope")
        if self.zo_update == "hizoo" and self.estimator != "two-sided":
            raise DlzoError("--zo-update hizoo needs --estimator two-sided (its curvature uses L+, L- and L(θ))")
        if self.zo_update == "hizoo" and self.parallel == "perturbation":
            raise DlzoError("--zo-update hizoo: --parallel perturbation does not gather the curvatures; use data")
        if self.zo_update == "normalized" and self.q < 2:
            raise DlzoError("--zo-update normalized divides by the spread of the --q directions' estimates: "
                            f"pass --q 2 or more, not {self.q} (FZOO uses 8 with --estimator one-sided)")
        if self.zo_update == "orthogonal" and (self.distribution != "lowrank" or self.zo_mask):
            raise DlzoError("--zo-update orthogonal (ZO-Muon) orthogonalizes each matrix's step inside the "
                            "subspace of its low-rank directions: pass --distribution lowrank, without --zo-mask")
        if self.lr_per_rms and self.zo_update not in ("normalized", "orthogonal"):
            raise DlzoError("--lr-per-rms sets the rate of the normalized or orthogonal step, whose size is the "
                            "rate's alone; pass --zo-update normalized (with --q 2 or more) or orthogonal")
        if not (math.isfinite(self.zo_mask) and 0 <= self.zo_mask < 1):
            raise DlzoError(f"--zo-mask must be in [0, 1), not {self.zo_mask}")
        if not (math.isfinite(self.hessian_smooth) and 0 <= self.hessian_smooth < 1):
            raise DlzoError(f"--hessian-smooth must be in [0, 1), not {self.hessian_smooth}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise DlzoError(f"--{name} must be in [0, 1), not {getattr(self, name)}")

    def inert_options(self) -> tuple[str, ...]:
        """Options this run never reads, so a kept run may differ in them: the layer rule outside --scope
        dominant (a race's layer:11 recipe trained before the guarded default is the same run)."""
        return () if parse_scope(self.scope).needs_dominant_layer else ("rule",)

    def epoch_steps(self, num_examples: int) -> int:
        """--num-train-epochs as steps over `num_examples` training examples: an epoch is a pass over them in
        batches of --batch-size (dlzo.training.step.batch_indices' epochs, the last short batch left out)."""
        return max(math.ceil(self.num_train_epochs * max(num_examples // self.batch_size, 1)), 1)

    def validate_quantize(self) -> None:
        """--quantize: a scope that leaves linear layers frozen, one model on one device. Whether this machine's
        device and torchao run the mode needs torch: dlzo.training.loop.train asks right after validate()."""
        check_quantize_scope(self.quantize, self.scope, self.params, self.optimizer)
        if self.device_map:
            raise DlzoError(f"--quantize {self.quantize} with --device-map: a quantized model is loaded on one "
                            f"device (--device)")


def check_quantize_scope(quantize: str, scope: str, params: str, optimizer: str = "zo") -> None:
    """--quantize needs frozen linear layers: a scope tuning all of them leaves none (one line, before any work)."""
    kind = parse_scope(scope).kind
    if quantize != "none" and kind in ("full", "lezo") and params == "all":
        what = "--optimizer adamw --scope full" if optimizer == "adamw" and kind == "full" else f"--scope {scope}"
        raise DlzoError(f"--quantize {quantize}: {what} tunes every weight, none is frozen to quantize (quantize "
                        f"the frozen layers of a layer scope, e.g. --scope dominant or layer:K)")


def check_objective_options(config) -> None:
    """The objective's flags against each other and the optimizer (no file is read)."""
    name = "--reward" if config.reward else f"--objective {config.objective}"
    if config.reward:
        split_spec(config.reward)
        if config.objective != "loss":
            raise DlzoError(f"--reward is the objective itself; leave --objective at loss, not {config.objective}")
        if not config.data:
            raise DlzoError("--reward needs --data: a file of prompt rows {\"prompt\": ...}")
        if config.rule == "screen":
            raise DlzoError("--reward: --rule screen compares layers on the loss of completions, which prompt rows "
                            "have none of; use --rule sun or onset, or --scope layer:K")
    if config.reward or config.objective != "loss":
        if config.optimizer != "zo":
            raise DlzoError(f"{name} has no gradient: train it with --optimizer zo")
        if config.zo_update == "hizoo":
            raise DlzoError(f"{name}: --zo-update hizoo's curvature needs a smooth loss; use sgd, momentum or adam")
    if not (math.isfinite(config.temperature) and config.temperature >= 0):
        raise DlzoError(f"--temperature must be 0 (greedy) or positive, not {config.temperature}")
    if config.temperature > 0 and not (config.reward or config.objective in GENERATED):
        raise DlzoError("--temperature samples the completions of --reward or --objective f1/exact-match; this run "
                        "generates none")


@dataclass
class ZOArguments:
    """`dlzo.ZOTrainer`'s options beyond `TrainingArguments` (which keeps lr, schedule, steps, batches, evaluation,
    saving, logging, seed and precision); parses with `HfArgumentParser` beside it. The options it shares with
    `dlzo train` are TrainConfig's own fields: one help text, default and set of allowed values for both."""

    scope: str = option("dominant", (
        "Which tensors to tune: dominant (the layer `rule` picks: by default the first decoder layer with "
        "massive activations where the paper's premise holds there, else the last layer) "
        "| layer:K | layers:K1,K2 | full (every tensor, MeZO) | lora (LoRA adapters on q/v projections) "
        "| dominant-lora (LoRA adapters on the dominant layer only)"))
    layer: int | None = option(None, "With scope=dominant or dominant-lora: tune this decoder layer (0-based) instead "
                                     "of probing for it")
    rule: LayerRule = same_as(TrainConfig, "rule")
    eps: float = same_as(TrainConfig, "eps")
    q: int = same_as(TrainConfig, "q")
    distribution: Distribution = same_as(TrainConfig, "distribution")
    params: str = same_as(TrainConfig, "params")
    lora_r: int = same_as(TrainConfig, "lora_r")
    lora_alpha: int = same_as(TrainConfig, "lora_alpha")
    fast_path: bool = option(True, "Evaluate both branches in one forward of 2B rows when the scope lies inside "
                                   "decoder layers and the loss is the model's own; False perturbs the weights in "
                                   "place and runs two forwards (the one-sided estimator and hizoo swap each "
                                   "perturbed point's tensors in for one forward of B rows either way)")
    master_weights: MasterPolicy = option("auto", (
        "bfloat16/float16 models: the tuned tensors become float32 masters in the model (same names; the "
        "perturbation, update and saved checkpoints act on them, the forward casts them), else bfloat16 rounds "
        "nearly every update away at lr 1e-6. auto: every scope but full and lezo (+2 bytes a tuned parameter: one layer "
        "of L adds 1/L to the model's memory) | on: full too (the model's memory doubles) | off: as before"))
    estimator: Estimator = same_as(TrainConfig, "estimator")
    zo_update: UpdateRule = same_as(TrainConfig, "zo_update")
    beta1: float = same_as(TrainConfig, "beta1")
    beta2: float = same_as(TrainConfig, "beta2")
    hessian_smooth: float = same_as(TrainConfig, "hessian_smooth")
    lowrank_rank: int = same_as(TrainConfig, "lowrank_rank")
    lowrank_lazy: int = same_as(TrainConfig, "lowrank_lazy")
    zo_mask: float = same_as(TrainConfig, "zo_mask")
    quantize: Quantize = same_as(TrainConfig, "quantize")
    reward: str = option("", "Train on a reward instead of the model's loss: a function (prompts, completions, rows) "
                             "-> list[float], or PATH.py:FUNCTION; the train_dataset's rows are {\"prompt\": ...} "
                             "(other fields go to the function), each step scores completions of both branches")
    max_new_tokens: int = same_as(TrainConfig, "max_new_tokens")
    temperature: float = same_as(TrainConfig, "temperature")

    def __post_init__(self):
        spec = parse_scope(self.scope)  # raises on an unknown scope
        if self.layer is not None and spec.kind not in ("dominant", "dominant-lora"):
            raise ValueError(f"ZOArguments.layer is only meaningful with scope=dominant or dominant-lora, "
                             f"not {self.scope!r}")
        bad = bad_choice(self)
        if bad is not None:
            name, value, allowed = bad
            raise ValueError(f"ZOArguments.{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.rule == "screen" and spec.kind != "dominant" and self.layer is None:
            raise ValueError("ZOArguments.rule=screen trains the candidate layers themselves: use scope=dominant")
        if self.q < 1 or not self.eps > 0:
            raise ValueError("ZOArguments needs q >= 1 and eps > 0")
        if self.lowrank_rank < 1 or self.lowrank_lazy < 1:
            raise ValueError("ZOArguments needs lowrank_rank >= 1 and lowrank_lazy >= 1")
        if not (math.isfinite(self.zo_mask) and 0 <= self.zo_mask < 1):
            raise ValueError(f"ZOArguments.zo_mask must be in [0, 1), not {self.zo_mask}")
        if self.zo_update == "hizoo" and self.estimator != "two-sided":
            raise ValueError("ZOArguments.zo_update=hizoo needs estimator=two-sided (its curvature uses L+, L- and L(θ))")
        for name in ("beta1", "beta2", "hessian_smooth"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ValueError(f"ZOArguments.{name} must be in [0, 1), not {value}")
        if isinstance(self.reward, str) and self.reward:
            split_spec(self.reward)
        if self.reward and self.zo_update == "hizoo":
            raise ValueError("ZOArguments.reward: zo_update hizoo's curvature needs a smooth loss; use sgd, momentum "
                             "or adam")
        if self.max_new_tokens < 1 or not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError("ZOArguments needs max_new_tokens >= 1 and temperature >= 0 (0: greedy)")
        try:
            check_quantize_scope(self.quantize, self.scope, self.params)
        except DlzoError as err:
            raise ValueError(f"ZOArguments: {err}") from None
