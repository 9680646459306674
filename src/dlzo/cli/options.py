"""The options of the commands whose library functions take plain arguments: probe, eval, generate, replay,
export and report. Shared groups come from dlzo.training.config.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlzo.choices import EXPORT_DTYPES, GgufType, ProbeRule
from dlzo.errors import DlzoError
from dlzo.fields import Checkpoint, at_least_one, check_choices, option, positive, same_as
from dlzo.training.config import DataSource, ModelOptions, TaskOptions, TrainConfig


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
    rule: ProbeRule = option("sun", "sun (absolute thresholds above) or onset (largest persistent jump of max|h|)")
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
    max_new_tokens: int = same_as(TrainConfig, "max_new_tokens", help="with --generate or --reward: tokens "
                                  "generated per prompt (with --run: the run's --max-new-tokens)")
    reward: str = option("", "with --data: the mean reward of greedy completions of its prompt rows {\"prompt\": ...} "
                             "by PATH.py:FUNCTION (as dlzo train --reward calls it); with --run of a reward run: its "
                             "reward on its held-out dev prompts, by default")
    run: str = option("", "evaluate the tuned tensors of this training run")
    checkpoint: Checkpoint = option("best", "best, last or final (with --run)")
    icl: int = option(0, "in-context demonstrations drawn from train")
    # With --run these four default to the run's own (dlzo.training.run_folder.recorded_test_options): its test figure again.
    num_test: int = same_as(TrainConfig, "num_test")
    data_seed: int = same_as(TrainConfig, "data_seed")
    max_length: int = same_as(TrainConfig, "max_length", help="truncate prompts from the left to this many tokens "
                              "(with --run: the run's --max-length)")
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
        if self.reward and (self.harness or self.generate or self.task):
            raise DlzoError("--reward scores prompt rows of --data; it does not go with --task, --generate or --harness")
        at_least_one(self, "num_test", "batch_size", "max_new_tokens", "max_length")


@dataclass
class GenerateConfig(ModelOptions):
    prompt: str = option("", "the prompt to continue (with a chat run or --chat: the user's message)", required=True)
    run: str = option("", "generate with the tuned tensors of this training run")
    model: str = option("", "the base model without --run (with --run: another base, default the run's own)")
    checkpoint: Checkpoint = same_as(EvalConfig, "checkpoint")
    chat: bool = option(False, "wrap the prompt in the tokenizer's chat template as a user turn (always on for a "
                               "run trained on chat rows)")
    max_new_tokens: int = same_as(TrainConfig, "max_new_tokens", help="tokens to generate at most")
    sample: bool = option(False, "sample instead of greedy decoding")
    temperature: float = option(1.0, "with --sample: the sampling temperature")
    top_p: float = option(1.0, "with --sample: nucleus sampling's probability mass")
    seed: int = option(0, "with --sample: the sampling seed")

    def validate(self) -> None:
        self.validate_model_options()
        if not self.run and not self.model:
            raise DlzoError("--run (a training run) or --model (a base model) is required")
        at_least_one(self, "max_new_tokens")
        positive(self, "temperature")
        if not 0 < self.top_p <= 1:
            raise DlzoError(f"--top-p must be in (0, 1], not {self.top_p}")


@dataclass
class ReplayConfig:
    run: str = option("", "run folder", required=True)
    base: str = option("", "base model (default: the run's)")
    to: str = option("", "also write the rebuilt tensors to this .safetensors file")


@dataclass
class ExportConfig:
    run: str = option("", "run folder", required=True)
    to: str = option("", "output folder of a merged Hugging Face model (or, with --adapter, of the tuned tensors)")
    checkpoint: Checkpoint = same_as(EvalConfig, "checkpoint")
    adapter: bool = option(False, "write only what was tuned: a peft adapter folder for LoRA scopes, or the tuned "
                                  "tensors under the model's own names plus tuned.json for layer scopes "
                                  "(dlzo.load_tuned applies them) instead of a merged copy of the model")
    dtype: str = option("", "dtype of the merged folder: float32, bfloat16 or float16 (default: the run's own)")
    gguf: str = option("", "write the merged model as this GGUF file instead, for llama.cpp / Ollama (the run's "
                           "base model must be a GGUF file: its metadata and tokenizer are carried over)")
    gguf_type: GgufType = option("f16", "with --gguf: f16, q8_0 (llama.cpp's 8-bit blocks) or f32")

    def validate(self) -> None:
        check_choices(self)
        if bool(self.to) == bool(self.gguf):
            raise DlzoError("give one of --to (a folder) or --gguf (a .gguf file)")
        if self.gguf and (self.adapter or self.dtype):
            raise DlzoError("--gguf writes the whole merged model in --gguf-type; --adapter and --dtype are for --to")
        if self.gguf and not self.gguf.endswith(".gguf"):
            raise DlzoError(f"--gguf {self.gguf!r}: the file name must end in .gguf")
        if self.dtype and self.dtype not in EXPORT_DTYPES:
            raise DlzoError(f"--dtype {self.dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
        if self.adapter and self.dtype:
            raise DlzoError("--adapter writes the tuned tensors as trained (float32); --dtype is for a merged folder")


@dataclass
class ReportConfig:
    folders: list = option([], "probe / sensitivity / sweep / run folders", positional=True)
    out: str = option("report.md", "the Markdown file to write")

