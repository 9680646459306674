"""The `dlzo` command line: a table from command name to (options dataclass, function), as litgpt's __main__.

Every flag is generated from the command's dataclass in dlzo.training.config; `--config recipe.toml` sets any of
them and explicit flags override the recipe.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from dlzo import __version__
from dlzo.cli.chat import ChatConfig, chat_command
from dlzo.cli.commands import export_command, generate_command, replay_command, report_command
from dlzo.cli.eval import eval_command
from dlzo.cli.flags import OneLineParser, add_arguments, from_namespace, load_recipe
from dlzo.cli.options import EvalConfig, ExportConfig, GenerateConfig, ProbeConfig, ReplayConfig, ReportConfig
from dlzo.cli.plan import PlanConfig, plan_command
from dlzo.cli.probe import probe_command
from dlzo.engine import distributed
from dlzo.errors import DlzoError
from dlzo.studies.bench import bench
from dlzo.studies.demo import run_demo
from dlzo.studies.options import BenchConfig, DemoConfig, RaceConfig, SensitivityConfig, SweepConfig
from dlzo.studies.race import race
from dlzo.studies.sensitivity import sensitivity
from dlzo.studies.sweep import sweep
from dlzo.training.config import TrainConfig
from dlzo.training.interrupt import Interrupted
from dlzo.training.loop import train
from dlzo.training.run_folder import RunFolder, recorded_test_options


def train_command(config: TrainConfig) -> None:
    distributed.init_if_launched(config.device)
    train(config)


@dataclass
class Command:
    options: type
    run: Callable
    help: str


COMMANDS: dict[str, Command] = {
    "probe": Command(ProbeConfig, probe_command, "find the dominant layer (first layer with massive activations)"),
    "train": Command(TrainConfig, train_command, "fine-tune a scope of the model with ZO (or AdamW) on a task or "
                                                 "your own data (--data)"),
    "eval": Command(EvalConfig, eval_command, "zero-shot, in-context, or trained-run evaluation on a task or your "
                                              "own data (--data)"),
    "generate": Command(GenerateConfig, generate_command, "what a trained run (or a base model) says to a prompt"),
    "replay": Command(ReplayConfig, replay_command, "rebuild a run's tuned weights from the base model and its trajectory"),
    "export": Command(ExportConfig, export_command, "write a merged Hugging Face folder from a run"),
    "sweep": Command(SweepConfig, sweep, "ZO-tune each layer alone plus full MeZO / ZO-LoRA; table, chart, verdict"),
    "sensitivity": Command(SensitivityConfig, sensitivity, "per-layer ZO signal and perturbation propagation"),
    "report": Command(ReportConfig, report_command, "Markdown report with tables and pictures from output folders"),
    "bench": Command(BenchConfig, bench, "step-time and memory of full MeZO vs dominant-layer ZO"),
    "plan": Command(PlanConfig, plan_command, "predicted peak memory of inference, a ZO step, full MeZO and "
                                              "AdamW from a model's config alone; does it fit here?"),
    "race": Command(RaceConfig, race, "time to accuracy: recipes raced to a target test metric in one process"),
    "chat": Command(ChatConfig, chat_command, "talk with a trained run (or a base model) through its chat template"),
    "demo": Command(DemoConfig, run_demo, "the main job on the sample assets (what `make demo` runs)"),
}


def build_parser(defaults: dict[str, dict] | None = None) -> argparse.ArgumentParser:
    """The parser; `defaults` (command -> {field: value}) come from a --config recipe."""
    parser = OneLineParser(prog="dlzo", description="Dominant-layer zeroth-order fine-tuning of LLMs.")
    parser.add_argument("--version", action="version", version=f"dlzo {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help)
        add_arguments(sub, command.options)
        sub.set_defaults(**(defaults or {}).get(name, {}))
    return parser


def parse(argv: list[str] | None) -> tuple[str, object]:
    """(command name, its options dataclass); a --config recipe, and for `train --resume` and `eval --run` the
    run's recorded options, supply defaults that flags override."""
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    defaults = _recorded_defaults(args)
    if getattr(args, "config", None):
        defaults.update(load_recipe(args.config, command.options))
    if defaults:
        args = build_parser({args.command: defaults}).parse_args(argv)
    if args.command == "train" and not args.resume:
        _check_task_or_data(argv if argv is not None else sys.argv[1:], defaults)
    return args.command, from_namespace(command.options, args)


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


def _recorded_defaults(args: argparse.Namespace) -> dict:
    if args.command == "train" and args.resume:
        return RunFolder(args.resume, "--resume").recorded_options()
    if args.command == "eval" and args.run:
        return recorded_test_options(args.run)
    return {}


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
        COMMANDS[name].run(options)
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

