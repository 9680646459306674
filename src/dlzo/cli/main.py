"""The `dlzo` command line: a table from command name to (options dataclass, function), as litgpt's __main__.

Every flag is generated from the command's dataclass in dlzo.training.config; `--config recipe.toml` sets any of
them and explicit flags override the recipe. The table names each command's dataclass and function as
"module:attribute" strings, imported only for the command given: `dlzo --help` lists the commands from their help
text alone, and `dlzo train --help` loads the option dataclasses, which need no torch (dlzo.choices).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from dataclasses import dataclass

from dlzo import __version__
from dlzo.cli.flags import OneLineParser, add_arguments, from_namespace, load_recipe
from dlzo.errors import DlzoError
from dlzo.training.interrupt import Interrupted


@dataclass
class Command:
    options: str  # "module:class" of the options dataclass
    run: str  # "module:function" called with it
    help: str
    recorded: tuple[str, str] | None = None  # (flag, "module:function"): with the flag given, its folder's defaults

    def options_class(self) -> type:
        return resolve(self.options)


def resolve(target: str):
    """The object a "module:attribute" string names (importing the module now)."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


COMMANDS: dict[str, Command] = {
    "probe": Command("dlzo.cli.options:ProbeConfig", "dlzo.cli.probe:probe_command",
                     "find the dominant layer (first layer with massive activations)"),
    "train": Command("dlzo.training.config:TrainConfig", "dlzo.cli.commands:train_command",
                     "fine-tune a scope of the model with ZO (or AdamW) on a task or your own data (--data)",
                     ("resume", "dlzo.cli.commands:resume_defaults")),
    "eval": Command("dlzo.cli.options:EvalConfig", "dlzo.cli.eval:eval_command",
                    "zero-shot, in-context, or trained-run evaluation on a task or your own data (--data)",
                    ("run", "dlzo.training.run_folder:recorded_test_options")),
    "generate": Command("dlzo.cli.options:GenerateConfig", "dlzo.cli.commands:generate_command",
                        "what a trained run (or a base model) says to a prompt"),
    "replay": Command("dlzo.cli.options:ReplayConfig", "dlzo.cli.commands:replay_command",
                      "rebuild a run's tuned weights from the base model and its trajectory"),
    "export": Command("dlzo.cli.options:ExportConfig", "dlzo.cli.commands:export_command",
                      "write a merged Hugging Face folder from a run"),
    "sweep": Command("dlzo.studies.options:SweepConfig", "dlzo.studies.sweep:sweep",
                     "ZO-tune each layer alone plus full MeZO / ZO-LoRA; table, chart, verdict"),
    "sensitivity": Command("dlzo.studies.options:SensitivityConfig", "dlzo.studies.sensitivity:sensitivity",
                           "per-layer ZO signal and perturbation propagation"),
    "report": Command("dlzo.cli.options:ReportConfig", "dlzo.cli.commands:report_command",
                      "Markdown report with tables and pictures from output folders"),
    "bench": Command("dlzo.studies.options:BenchConfig", "dlzo.studies.bench:bench",
                     "step-time and memory of full MeZO vs dominant-layer ZO"),
    "plan": Command("dlzo.cli.plan:PlanConfig", "dlzo.cli.plan:plan_command",
                    "predicted peak memory of inference, a ZO step, full MeZO and AdamW from a model's config alone; "
                    "does it fit here?"),
    "race": Command("dlzo.studies.options:RaceConfig", "dlzo.studies.race:race",
                    "time to accuracy: recipes raced to a target test metric in one process"),
    "chat": Command("dlzo.cli.chat:ChatConfig", "dlzo.cli.chat:chat_command",
                    "talk with a trained run (or a base model) through its chat template"),
    "demo": Command("dlzo.studies.options:DemoConfig", "dlzo.studies.demo:run_demo",
                    "the main job on the sample assets (what `make demo` runs)"),
}


def chosen_command(argv: list[str]) -> str | None:
    """The command argv names: the first word that is not a flag (dlzo's own flags, --help and --version, take
    no value); None when there is none or it is no command (argparse then says so)."""
    word = next((token for token in argv if not token.startswith("-")), None)
    return word if word in COMMANDS else None


def build_parser(chosen: str | None = None, defaults: dict | None = None) -> argparse.ArgumentParser:
    """The parser, with the flags of the `chosen` command only (every command is listed with its help text);
    `defaults` ({field: value}) come from a --config recipe or a run's record."""
    parser = OneLineParser(prog="dlzo", description="Dominant-layer zeroth-order fine-tuning of LLMs.")
    parser.add_argument("--version", action="version", version=f"dlzo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            add_arguments(sub, command.options_class())
            sub.set_defaults(**(defaults or {}))
    return parser


def parse(argv: list[str] | None) -> tuple[str, object]:
    """(command name, its options dataclass); a --config recipe, and for `train --resume` and `eval --run` the
    run's recorded options, supply defaults that flags override."""
    argv = list(argv if argv is not None else sys.argv[1:])
    chosen = chosen_command(argv)
    args = build_parser(chosen).parse_args(argv)
    command = COMMANDS[args.command]
    options = command.options_class()
    flag, function = command.recorded or ("", "")
    defaults = resolve(function)(getattr(args, flag)) if flag and getattr(args, flag) else {}
    recipe = load_recipe(args.config, options) if getattr(args, "config", None) else {}
    defaults.update(recipe)
    if defaults:
        args = build_parser(chosen, defaults).parse_args(argv)
    if args.command == "train" and not args.resume:
        _check_task_or_data(argv, defaults)
    if args.command == "train":
        _check_steps_or_epochs(argv, recipe)
        _per_device_batch(argv, args)
    return args.command, from_namespace(options, args)


def _per_device_batch(argv: list[str], args: argparse.Namespace) -> None:
    """transformers' --per_device_train_batch_size is one micro-batch: a step takes it times
    --gradient_accumulation_steps examples. dlzo's --batch-size is the step's examples, split into --grad-accum
    micro-batches, so the HF spelling is converted (one process: the device count is 1)."""
    if _given(argv, {}, "per_device_train_batch_size") and not args.resume:
        args.batch_size *= args.grad_accum


def _given(argv: list[str], recipe: dict, name: str, *aliases: str) -> bool:
    """Whether the flag of option `name` (or one of its aliases, either spelling) is on the command line or
    the option is in the recipe."""
    flags = {f"--{spelled}" for alias in (name, *aliases) for spelled in (alias, alias.replace("_", "-"))}
    return name in recipe or any(token.split("=", 1)[0] in flags for token in argv)


def _check_steps_or_epochs(argv: list[str], recipe: dict) -> None:
    """--num-train-epochs becomes the steps once the data is counted: with --steps (--max-steps) as well, one of
    them would be silently dropped (transformers lets max_steps win; dlzo asks for one)."""
    if _given(argv, recipe, "num_train_epochs") and _given(argv, recipe, "steps", "max_steps"):
        raise DlzoError("--num-train-epochs and --steps (--max-steps) both given: name one (epochs over the "
                        "training examples, or a number of steps)")


def _check_task_or_data(argv: list[str], recipe: dict) -> None:
    """`dlzo train` names what it trains on: a benchmark (--task) or your rows (--data), one of them; the library's
    TrainConfig keeps sst2 as its default task, but a command line that names neither would train on SST-2
    without saying so, and one that names both would silently drop the task."""
    given = {name for name in ("task", "data") if name in recipe
             or any(token == f"--{name}" or token.startswith(f"--{name}=") for token in argv)}
    if not given:
        raise DlzoError("dlzo train needs what to train on: --task NAME (a benchmark: sst2, rte, cb, boolq, ...) or "
                        "--data FILE (your own rows)")
    if given == {"task", "data"}:
        raise DlzoError("--task and --data both given: name one (a benchmark, or your own rows)")


def main(argv: list[str] | None = None) -> int:
    try:
        name, options = parse(argv)
    except DlzoError as err:
        print(f"dlzo: error: {err}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep the terminal for our tables; real errors still raise
    hf_logging.disable_progress_bar()
    # hf: data sources: no "Generating train split" bars around the one line a bad source gets
    if os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1") == "1" and "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    try:
        resolve(COMMANDS[name].run)(options)
    except Interrupted as err:
        print(f"dlzo: {err}", file=sys.stderr)
        return 130
    except DlzoError as err:
        print(f"dlzo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlzo: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            raise
        print(f"dlzo: error: cannot write {err.filename or 'a file'}: {err.strerror} (nothing half-written is "
              f"left: every dlzo file is written atomically)", file=sys.stderr)
        return 2
    return 0

