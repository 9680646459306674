"""A training run's options (`TrainConfig`) and the groups other commands share with it (loading a model,
reading a task, your own data): declared once and inherited, so a flag has one name, one default and one help
text everywhere. The CLI generates one flag per field (dlzo.cli.flags).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from dlzo.data.benchmarks import DATA_DIR_HELP, HUB_PREFIX
from dlzo.data.formats import FORMATS
from dlzo.data.readers import parse_columns
from dlzo.engine.scope import SCOPE_HELP
from dlzo.errors import DlzoError
from dlzo.fields import at_least_one, option, positive

DEFAULT_MAX_DEV = 500  # --data with --num-dev -1: at most this many held-out dev rows


DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


SCHEDULERS = ("constant", "linear", "cosine", "constant_with_warmup")


# options naming a local file or folder: recorded absolute, so a run's record names them from any folder
PATH_OPTIONS = ("model", "data", "eval_data", "data_dir")


def absolute_paths(config: object) -> None:
    """Each PATH_OPTIONS value naming an existing local path, made absolute (hub ids, hf: sources and
    --data-dir hf stay), and --prefix-store, a folder that may not exist yet. Links are kept, not followed:
    a Hub cache file is a link to a blob without the name's extension, which says its format."""
    for name in PATH_OPTIONS:
        value = getattr(config, name, "")
        if value and not (name == "data_dir" and value == HUB_PREFIX) and Path(value).expanduser().exists():
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
    dtype: str = option("auto", "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    trust_remote_code: bool = option(False, "allow model code from the hub to run (off by default)")

    def validate_model_options(self) -> None:
        if self.dtype not in DTYPES:
            raise DlzoError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
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
    data_format: str = option("auto", "with --data: auto (from the fields), " + ", ".join(FORMATS))
    columns: str = option("", "with --data: map the source's columns onto the fields, e.g. "
                              "prompt=question,completion=answer")

    def validate_data_options(self) -> None:
        """Flag checks of the data group (no file is read): one line naming the flag."""
        if self.data_format not in ("auto", *FORMATS):
            raise DlzoError(f"--data-format {self.data_format!r} is not one of auto, {', '.join(FORMATS)}")
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
    rule: str = option("sun", "how --scope dominant picks its layer: sun (first layer with max|h| > 100 and >= 1000x "
                              "the median) or onset (the largest persistent jump of max|h|; docs/rules.md); when the "
                              "rule finds none, the most perturbation-sensitive layer")
    params: str = option("all", "tensors inside the tuned layers: all, mlp, attn, or a regex over names")
    optimizer: str = option("zo", "zo (SPSA, forward only) or adamw (first-order reference, backpropagation)")
    steps: int = option(1000, "optimisation steps")
    batch_size: int = option(16, "examples per step (MeZO: 16)")
    grad_accum: int = option(1, "micro-batches per step; ZO uses one z across them")
    lr: float = option(1e-6, "learning rate (peak rate with a schedule)")
    lr_scheduler: str = option("constant", "learning-rate schedule: " + ", ".join(SCHEDULERS)
                               + " (transformers.get_scheduler)")
    warmup_steps: int = option(0, "linear warm-up steps of the schedule")
    eps: float = option(1e-3, "ZO perturbation scale epsilon")
    q: int = option(1, "ZO directions per step (the projected gradients are averaged)")
    parallel: str = option("data", "with several ranks: data (shard the batch) or perturbation (split the q directions)")
    device_map: str = option("", "'auto' spreads one model over this machine's GPUs (forward only, all ZO needs)")
    weight_decay: float = option(0.0, "weight decay (never on biases and norms)")
    distribution: str = option("gaussian", "ZO direction distribution: gaussian or rademacher")
    estimator: str = option("two-sided", "ZO gradient estimate: two-sided ((L(θ+εz) - L(θ-εz))/2ε, MeZO) or one-sided "
                                         "((L(θ+εz) - L(θ))/ε, L(θ) shared by the --q directions: q+1 forwards a "
                                         "step instead of 2q)")
    zo_update: str = option("sgd", "ZO update rule on the SPSA estimate g·z: sgd (MeZO), momentum (m <- beta1·m + "
                                   "g·z), adam (ZO-AdaMM) or hizoo (HiZOO's diagonal Hessian estimate scales the "
                                   "perturbation and the step; three forwards a step); state only over the tuned "
                                   "tensors, rebuilt by replay")
    beta1: float = option(0.9, "--zo-update momentum / adam: the first-moment decay")
    beta2: float = option(0.999, "--zo-update adam: the second-moment decay")
    hessian_smooth: float = option(1e-6, "--zo-update hizoo: the weight of each step's curvature sample in the "
                                         "Hessian estimate (HiZOO's alpha)")
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
    max_nonfinite: int = option(5, "stop after this many non-finite losses in a row")
    lora_r: int = option(8, "LoRA rank for --scope lora / dominant-lora")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_targets: str = option("", "LoRA target modules, comma-separated (peft's target_modules; default q_proj,v_proj "
                                   "where the model has them, else peft's default for the architecture)")
    max_length: int = option(1024, "truncate prompts from the left to this many tokens")
    report_to: str = option("none", "also log scalars to: none, tensorboard, wandb (metrics.jsonl is always written)")
    quiet: bool = option(False, "no progress bar")

    def validate(self) -> None:
        """Checks that need no file: each names its flag (exit 2, before any work)."""
        if not self.model:
            raise DlzoError("--model is required")
        self.validate_model_options()
        self.validate_data_options()
        absolute_paths(self)
        at_least_one(self, "steps", "batch_size", "grad_accum", "q", "eval_batch_size", "lora_r", "max_length",
                      "max_nonfinite")
        positive(self, "lr")
        positive(self, "eps")
        for name in ("eval_every", "warmup_steps", "weight_decay", "num_train", "num_test", "prefix_cache_mb"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise DlzoError(f"--{name.replace('_', '-')} must not be negative, not {value}")
        if self.num_dev < -1:
            raise DlzoError(f"--num-dev must be -1 (the task's default) or at least 0, not {self.num_dev}")
        if self.data and self.num_dev == 0:
            raise DlzoError("--num-dev 0: with --data the dev set needs at least 1 row (-1: at most 500)")
        if self.optimizer not in ("zo", "adamw"):
            raise DlzoError(f"--optimizer {self.optimizer!r} is not zo or adamw")
        if self.batch_size % self.grad_accum:
            raise DlzoError("--batch-size must be a multiple of --grad-accum")
        if self.parallel not in ("data", "perturbation"):
            raise DlzoError(f"--parallel {self.parallel!r} is not data or perturbation")
        if self.distribution not in ("gaussian", "rademacher"):
            raise DlzoError(f"--distribution {self.distribution!r} is not gaussian or rademacher")
        if self.estimator not in ("two-sided", "one-sided"):
            raise DlzoError(f"--estimator {self.estimator!r} is not two-sided or one-sided")
        if self.estimator == "one-sided" and self.scope == "full" and self.exact_restore_fraction < 1:
            raise DlzoError("--estimator one-sided: --scope full perturbs the weights in place with MeZO's round "
                            "trip, which has no unperturbed evaluation to share; pass --exact-restore-fraction 1 "
                            "(a copy of the weights) or use the two-sided estimator")
        if self.zo_update not in ("sgd", "momentum", "adam", "hizoo"):
            raise DlzoError(f"--zo-update {self.zo_update!r} is not sgd, momentum, adam or hizoo")
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
        if not (math.isfinite(self.hessian_smooth) and 0 <= self.hessian_smooth < 1):
            raise DlzoError(f"--hessian-smooth must be in [0, 1), not {self.hessian_smooth}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise DlzoError(f"--{name} must be in [0, 1), not {getattr(self, name)}")
        if self.lr_scheduler not in SCHEDULERS:
            raise DlzoError(f"--lr-scheduler {self.lr_scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.rule not in ("sun", "onset"):
            raise DlzoError(f"--rule {self.rule!r} is not sun or onset")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise DlzoError(f"--report-to {self.report_to!r} is not none, tensorboard or wandb")

