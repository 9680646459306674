"""Every command's options, in one place: one dataclass per sub-command, built from shared groups.

The CLI generates one flag per field (dlzo.config.add_arguments) and a `--config` TOML recipe may set any of
them. Groups shared by several commands (loading a model, reading a task) are declared once and inherited,
so a flag has one name, one default and one help text everywhere.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dlzo.config import option, same_as
from dlzo.data import FORMATS, parse_columns
from dlzo.errors import DlzoError
from dlzo.scope import SCOPE_HELP, parse_scope
from dlzo.tasks import DATA_DIR_HELP, HUB_PREFIX

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


# the names `dlzo sweep` gives its runs (runs/<name>), so that a misspelt --only is refused before anything is
# written (which runs a sweep has is known only after its probe); a test ties this to the names given
RUN_NAME = r"layer\d{2,}|full|lora|adamw|lezo\d+"


def only_names(only: str) -> list[str]:
    """The run names of a sweep's --only (empty: every run)."""
    return [name.strip() for name in only.split(",") if name.strip()]


def _at_least_one(config: object, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise DlzoError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(config, name)}")


def _known_checkpoint(name: str) -> None:
    if name not in ("best", "last", "final"):
        raise DlzoError(f"--checkpoint {name!r} is not best, last or final")


def _positive(config: object, name: str) -> None:
    value = getattr(config, name)
    if not (math.isfinite(value) and value > 0):
        raise DlzoError(f"--{name.replace('_', '-')} must be a positive finite number, not {value}")


def _is_lezo(scope: str) -> bool:
    try:
        return parse_scope(scope).kind == "lezo"
    except DlzoError:
        return False


def reference_names(references: str) -> list[str]:
    """--references as a list (full, lora, adamw, lezo:K); anything else is one line naming it."""
    names = [r.strip() for r in references.split(",") if r.strip()]
    unknown = [r for r in names if r not in ("full", "lora", "adamw") and not _is_lezo(r)]
    if unknown:
        raise DlzoError(f"--references: {unknown[0]!r} is not full, lora, adamw or lezo:K")
    return names


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
    """Your own rows instead of a benchmark task (dlzo.data; docs/your-data.md): --data wins over --task."""

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
                                        "every train/dev sequence (computed once; dlzo.prefix) up to this many MB; "
                                        "0: off")
    prefix_store: str = option("", "fast path: also keep that cache on disk in this folder and reuse it in later runs "
                                   "over the same data and frozen weights (a sweep's grid and seeds; "
                                   "dlzo.prefix_store), with the untrained model's dev loss, measured once "
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
        _at_least_one(self, "steps", "batch_size", "grad_accum", "q", "eval_batch_size", "lora_r", "max_length",
                      "max_nonfinite")
        _positive(self, "lr")
        _positive(self, "eps")
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


@dataclass
class ProbeConfig(ModelOptions, TaskOptions, DataSource):
    task: str = option("", "calibrate on a task's training prompts instead of the built-in prose (e.g. sst2)")
    data: str = option("", "calibrate on the rows of your own data (a .jsonl/.json/.csv/.parquet file or hf:NAME; "
                           "the first 64 rows, as dlzo train --scope dominant does)")
    text: str = option("", "calibration text file (default: built-in English prose)")
    out: str = option("out/probe", "output folder for probe.json and probe.png")
    max_tokens: int = option(512, "calibration tokens in total")
    abs_threshold: float = option(100.0, "max |h| must exceed this")
    rel_threshold: float = option(1000.0, "max |h| / median |h| must reach this")
    rule: str = option("sun", "sun (absolute thresholds above) or onset (largest persistent jump of max|h|)")
    min_jump: float = option(4.0, "onset: smallest jump of max|h| over the previous layer that counts")
    persistence: int = option(3, "onset: layers the jump must hold for (the final layer never counts)")


@dataclass
class EvalConfig(ModelOptions, TaskOptions, DataSource):
    model: str = option("", "model to evaluate (with --run: the base model, default the run's own)")
    task: str = option("", "task name (sst2 rte cb boolq wsc wic multirc copa record squad drop); default: with "
                           "--run, what the run trained on (its task, or its own --data rows), else sst2")
    data_dir: str = option("", "folder of the official task files (hf: the Hugging Face Hub); default: with --run, "
                               "the run's own, else ../shared/data")
    data: str = option("", "evaluate on your own rows instead of --task: every row of this file (with --run and "
                           "the run's own --data file: its held-out dev rows); dev loss and perplexity, accuracy "
                           "for classification rows")
    generate: bool = option(False, "with --data: also generate greedily from each prompt and score exact match / F1 "
                                   "against its completion (prompt-completion and chat rows)")
    max_new_tokens: int = option(50, "with --generate: tokens generated per prompt")
    run: str = option("", "evaluate the tuned tensors of this training run")
    checkpoint: str = option("best", "best, last or final (with --run)")
    icl: int = option(0, "in-context demonstrations drawn from train")
    # With --run these four default to the run's own (dlzo.run.recorded_test_options): its test figure again.
    num_test: int = same_as(TrainConfig, "num_test")
    data_seed: int = same_as(TrainConfig, "data_seed")
    max_length: int = option(2048, "truncate prompts from the left to this many tokens (with --run: the run's "
                                   "--max-length)")
    batch_size: int = option(16, "examples per forward (with --run: the run's --eval-batch-size)")
    out: str = option("out/eval", "folder for eval.json")
    harness: str = option("", "hand the model to lm-evaluation-harness for these tasks instead (comma-separated, "
                              "globs allowed; needs pip install 'dlzo[harness]'); writes OUT/harness.json")
    harness_include: str = option("", "with --harness: a folder of your own lm-eval task YAMLs")
    harness_limit: int = option(0, "with --harness: at most N documents per task (0: all)")

    def validate(self) -> None:
        self.validate_model_options()
        self.validate_data_options()
        if self.generate and not self.data:
            raise DlzoError("--generate needs --data (the task's own metric already generates for squad and drop)")
        _at_least_one(self, "num_test", "batch_size", "max_new_tokens", "max_length")
        _known_checkpoint(self.checkpoint)


@dataclass
class GenerateConfig(ModelOptions):
    prompt: str = option("", "the prompt to continue (with a chat run or --chat: the user's message)", required=True)
    run: str = option("", "generate with the tuned tensors of this training run")
    model: str = option("", "the base model without --run (with --run: another base, default the run's own)")
    checkpoint: str = same_as(EvalConfig, "checkpoint")
    chat: bool = option(False, "wrap the prompt in the tokenizer's chat template as a user turn (always on for a "
                               "run trained on chat rows)")
    max_new_tokens: int = option(64, "tokens to generate at most")
    sample: bool = option(False, "sample instead of greedy decoding")
    temperature: float = option(1.0, "with --sample: the sampling temperature")
    top_p: float = option(1.0, "with --sample: nucleus sampling's probability mass")
    seed: int = option(0, "with --sample: the sampling seed")

    def validate(self) -> None:
        self.validate_model_options()
        if not self.run and not self.model:
            raise DlzoError("--run (a training run) or --model (a base model) is required")
        _at_least_one(self, "max_new_tokens")
        _positive(self, "temperature")
        if not 0 < self.top_p <= 1:
            raise DlzoError(f"--top-p must be in (0, 1], not {self.top_p}")
        _known_checkpoint(self.checkpoint)


@dataclass
class ReplayConfig:
    run: str = option("", "run folder", required=True)
    base: str = option("", "base model (default: the run's)")
    to: str = option("", "also write the rebuilt tensors to this .safetensors file")


@dataclass
class ExportConfig:
    run: str = option("", "run folder", required=True)
    to: str = option("", "output folder", required=True)
    checkpoint: str = same_as(EvalConfig, "checkpoint")
    adapter: bool = option(False, "write only what was tuned: a peft adapter folder for LoRA scopes, or the tuned "
                                  "tensors under the model's own names plus tuned.json for layer scopes "
                                  "(dlzo.load_tuned applies them) instead of a merged copy of the model")

    def validate(self) -> None:
        _known_checkpoint(self.checkpoint)


@dataclass
class ReportConfig:
    folders: list = option([], "probe / sensitivity / sweep / run folders", positional=True)
    out: str = option("report.md", "the Markdown file to write")


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
    lr: float = option(1e-5, "learning rate of the one-layer runs")
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
    dtype: str = same_as(TrainConfig, "dtype")
    prefix_store: str = same_as(TrainConfig, "prefix_store")
    only: str = option("", "train only these runs (comma-separated names, e.g. layer03 or layer23,full): two "
                           "processes with different --only share one sweep folder, each on its own cores; the other "
                           "runs are reported once finished, and the verdict waits until every run is")
    quiet: bool = option(True, "no per-step progress bars")

    def validate(self) -> None:
        """Checks that need no file, before the sweep folder or any run is made (exit 2)."""
        if not self.model:
            raise DlzoError("--model is required")
        _at_least_one(self, "steps", "batch_size", "grid_steps")
        if self.only.strip() and not only_names(self.only):
            raise DlzoError(f"--only {self.only!r} names no run (give e.g. layer03 or layer23,full)")
        bad = next((name for name in only_names(self.only) if not re.fullmatch(RUN_NAME, name)), None)
        if bad is not None:
            raise DlzoError(f"--only {bad!r} is not a run name (layer<KK> such as layer03, full, lora, adamw, lezo<K>)")
        for name in ("lr", "eps", "adamw_lr"):
            _positive(self, name)
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
    dtype: str = same_as(TrainConfig, "dtype")
    stability: bool = option(False, "measure a second time on other directions and other batches, and report the "
                                    "rank correlation of the two per-layer rankings (is the ranking stable?) and the cost")

    def validate(self) -> None:
        if not self.model:
            raise DlzoError("--model is required")
        _at_least_one(self, "seeds", "batches", "batch_size")
        _positive(self, "eps")


@dataclass
class DemoConfig:
    shared: str = option("../shared", "folder of the sample assets (models/, data/)")
    out: str = option("demo_out", "output folder; the report is OUT/report.md")
    model: str = option("smollm2-135m", "model; falls back to stories260k when SmolLM2 is not in --shared")
    steps: int = option(40, "training steps of each run (the same for both)")
    lr: float = option(1e-3, "ZO learning rate of the dominant layer (SmolLM2-135M grid: docs/results/smollm2-135m)")
    full_lr: float = option(1e-4, "ZO learning rate of full MeZO (its own grid: a full-model step moves far more)")
    eps: float = same_as(TrainConfig, "eps")
    num_dev: int = same_as(TrainConfig, "num_dev", default=100)
    num_test: int = same_as(TrainConfig, "num_test", default=200)


@dataclass
class BenchConfig(TaskOptions):
    model: str = option("", "local model / .gguf / short name; empty: a random-init model of --shape")
    shape: str = option("125m", "random-init shape: 125m, 350m, llama2-7b, qwen3-8b")
    task: str = option("", "use this task's real (padded) training inputs instead of synthetic ones")
    batch: int = option(16, "examples per step")
    seq: int = option(64, "prompt tokens of the synthetic inputs")
    layer: int = option(1, "the tuned layer of the one-layer variants")
    repeats: int = option(3, "timed steps per variant after one warm-up (the median is reported)")
    dtype: str = same_as(TrainConfig, "dtype")
    device: str = same_as(TrainConfig, "device")
    out: str = option("out/bench", "folder for bench.json")
    variants: str = option("upstream_full,full,layer_plain,layer_fast,layer_cached,lora,floor,inference",
                           "variants to run")

    def validate(self) -> None:
        """The flags alone; --layer is checked against the model once it is loaded (dlzo.bench)."""
        _at_least_one(self, "batch", "seq", "repeats")
        if self.layer < 0:
            raise DlzoError(f"--layer must not be negative, not {self.layer}")


@dataclass
class RaceConfig(TaskOptions):
    """`dlzo race`: time to accuracy of several recipes in one process (dlzo.race)."""

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
    dtype: str = same_as(TrainConfig, "dtype")
    device: str = same_as(TrainConfig, "device")
    out: str = option("out/race", "folder for race.json, race.png and one run folder per seed and recipe")

    def validate(self) -> None:
        if not self.model:
            raise DlzoError("--model is required")
        _at_least_one(self, "eval_every", "num_test", "max_steps")
        if not (math.isfinite(self.budget_s) and self.budget_s > 0):
            raise DlzoError(f"--budget-s must be a positive number of seconds, not {self.budget_s}")
        try:
            seeds = [int(s) for s in self.seeds.split(",") if s.strip()]
        except ValueError:
            raise DlzoError(f"--seeds {self.seeds!r} is not comma-separated integers") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise DlzoError(f"--seeds {self.seeds!r}: needs at least one seed, each once")
