"""The `dlzo` command line: one sub-command per job, flags generated from the dataclass configs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dlzo.errors import DlzoError
from dlzo.tasks import DATA_DIR_HELP


def _read_text_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DlzoError(f"--text {path}: cannot read ({err.__class__.__name__}: {err})") from None
    if not text.strip():
        raise DlzoError(f"--text {path}: the file is empty")
    return text


def cmd_probe(args: argparse.Namespace) -> None:
    from dlzo import probe
    from dlzo.models import load_model, load_tokenizer

    texts = None
    if args.text:
        texts = [_read_text_file(args.text)]
    model = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    if args.task:
        from dlzo.tasks import load_task

        task = load_task(args.task, args.data_dir)
        texts = [task.prompt_text(example) for example in task.splits(seed=0).train[:64]]
    result = probe.find_dominant_layer(
        model, tokenizer, texts, max_tokens=args.max_tokens,
        abs_threshold=args.abs_threshold, rel_threshold=args.rel_threshold,
    )
    print(probe.format_table(result))
    out = Path(args.out)
    probe.save_outputs(result, out)
    print(f"wrote {out / 'probe.json'} and {out / 'probe.png'}")


def cmd_train(args: argparse.Namespace) -> None:
    from dlzo import distributed
    from dlzo.config import from_namespace
    from dlzo.train import TrainConfig, train

    distributed.init_if_launched(args.device)
    train(from_namespace(TrainConfig, args))


def cmd_eval(args: argparse.Namespace) -> None:
    from dlzo.eval import demonstrations, evaluate
    from dlzo.models import load_model, load_tokenizer
    from dlzo.tasks import load_task, task_splits

    task = load_task(args.task, args.data_dir)
    splits = task_splits(task, args.data_seed, num_test=args.num_test)
    if args.run:
        from dlzo.checkpoint import load_tensors
        from dlzo.train import _rebuild, load_into

        checkpoint = Path(args.run) / f"{args.checkpoint}.safetensors"
        if not checkpoint.exists():
            raise DlzoError(f"--run {args.run}: {checkpoint.name} not found")
        prepared, _ = _rebuild(Path(args.run), args.model)
        model, tokenizer = prepared.model, prepared.tokenizer
        load_into(model, load_tensors(checkpoint))
    else:
        if not args.model:
            raise DlzoError("--model is required (or --run to evaluate a trained run)")
        model = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
        tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    demos = demonstrations(splits.train, args.icl, args.data_seed)
    result = evaluate(model, tokenizer, task, splits.test, args.batch_size, demos=demos)
    data = {**result.to_json(), "icl": args.icl, "model": args.model, "run": args.run}
    from dlzo.checkpoint import atomic_write_json

    out = Path(args.out)
    atomic_write_json(out / "eval.json", data)
    print(f"{task.name} {result.metric}: {result.value:.4f} on {result.num_examples} examples "
          f"({args.icl}-shot); wrote {out / 'eval.json'}")


def cmd_replay(args: argparse.Namespace) -> None:
    import torch

    from dlzo.checkpoint import load_tensors, save_tensors
    from dlzo.train import replay

    run = Path(args.run)
    if not (run / "trajectory.jsonl").exists():
        raise DlzoError(f"--run {run}: no trajectory.jsonl there")
    rebuilt = replay(run, args.base)
    if args.to:
        save_tensors(args.to, rebuilt)
    final = run / "final.safetensors"
    if final.exists():
        trained = load_tensors(final)
        same = all(torch.equal(rebuilt[n].cpu(), trained[n]) for n in trained)
        worst = max(float((rebuilt[n].float() - trained[n].float()).abs().max()) for n in trained)
        print(f"replayed {len(rebuilt)} tensors; bit-identical to final.safetensors: {same} (max |diff| {worst:.3g})")
        if not same:
            raise DlzoError("replay differs from the trained weights (different device type or library versions?)")
    else:
        print(f"replayed {len(rebuilt)} tensors (no final.safetensors to compare with)")


def cmd_export(args: argparse.Namespace) -> None:
    from dlzo.train import export

    print(f"wrote a merged Hugging Face folder to {export(args.run, args.to, args.checkpoint)}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from dlzo.analysis import SweepConfig, sweep
    from dlzo.config import from_namespace

    sweep(from_namespace(SweepConfig, args))


def cmd_sensitivity(args: argparse.Namespace) -> None:
    from dlzo.analysis import SensitivityConfig, sensitivity
    from dlzo.config import from_namespace

    sensitivity(from_namespace(SensitivityConfig, args))


def cmd_report(args: argparse.Namespace) -> None:
    from dlzo.analysis import report

    report(args.folders, args.out)
    print(f"wrote {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from dlzo.config import from_namespace
    from dlzo.demo import DemoConfig, run_demo

    run_demo(from_namespace(DemoConfig, args))


def cmd_bench(args: argparse.Namespace) -> None:
    from dlzo.bench import BenchConfig, bench
    from dlzo.config import from_namespace

    bench(from_namespace(BenchConfig, args))


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="hub id, local Hugging Face folder, .gguf file (or folder holding one), or a short "
                             "name: smollm2-135m, stories260k")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model code from the hub to run (off by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlzo", description="Dominant-layer zeroth-order fine-tuning of LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    probe = commands.add_parser("probe", help="find the dominant layer (first layer with massive activations)")
    _add_model_flags(probe)
    probe.add_argument("--out", default="out/probe", help="output folder for probe.json and probe.png")
    probe.add_argument("--text", help="calibration text file (default: built-in English prose)")
    probe.add_argument("--task", help="calibrate on a task's training prompts instead (e.g. sst2)")
    probe.add_argument("--data-dir", default="../shared/data", help=DATA_DIR_HELP)
    probe.add_argument("--max-tokens", type=int, default=512, help="calibration tokens in total")
    probe.add_argument("--abs-threshold", type=float, default=100.0, help="max |h| must exceed this")
    probe.add_argument("--rel-threshold", type=float, default=1000.0, help="max |h| / median |h| must reach this")
    probe.set_defaults(handler=cmd_probe)

    from dlzo.config import add_arguments
    from dlzo.train import TrainConfig

    train = commands.add_parser("train", help="fine-tune a scope of the model with ZO (or AdamW) on a task")
    add_arguments(train, TrainConfig)
    train.set_defaults(handler=cmd_train, config_class=TrainConfig)

    evaluation = commands.add_parser("eval", help="zero-shot, in-context, or trained-run evaluation on a task")
    evaluation.add_argument("--model", default="", help="model to evaluate (with --run: the base model, "
                                                        "default the run's own)")
    evaluation.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    evaluation.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    evaluation.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")
    evaluation.add_argument("--task", required=True, help="task name, e.g. sst2")
    evaluation.add_argument("--data-dir", default="../shared/data", help=DATA_DIR_HELP)
    evaluation.add_argument("--run", default="", help="evaluate the tuned tensors of this training run")
    evaluation.add_argument("--checkpoint", default="best", help="best, last or final (with --run)")
    evaluation.add_argument("--icl", type=int, default=0, help="in-context demonstrations drawn from train")
    evaluation.add_argument("--num-test", type=int, default=1000, help="test examples (MeZO: 1000)")
    evaluation.add_argument("--data-seed", type=int, default=0, help="sampling seed (MeZO's train_set_seed)")
    evaluation.add_argument("--batch-size", type=int, default=16, help="examples per forward")
    evaluation.add_argument("--out", default="out/eval", help="folder for eval.json")
    evaluation.set_defaults(handler=cmd_eval)

    replay = commands.add_parser("replay", help="rebuild a run's tuned weights from the base model and its trajectory")
    replay.add_argument("--run", required=True, help="run folder")
    replay.add_argument("--base", default=None, help="base model (default: the run's)")
    replay.add_argument("--to", default=None, help="also write the rebuilt tensors to this .safetensors file")
    replay.set_defaults(handler=cmd_replay)

    from dlzo.analysis import SensitivityConfig, SweepConfig
    from dlzo.bench import BenchConfig
    from dlzo.demo import DemoConfig

    for name, config_class, handler, text in (
        ("sweep", SweepConfig, cmd_sweep, "ZO-tune each layer alone plus full MeZO / ZO-LoRA; table, chart, verdict"),
        ("sensitivity", SensitivityConfig, cmd_sensitivity, "per-layer ZO signal and perturbation propagation"),
        ("demo", DemoConfig, cmd_demo, "the main job on the sample assets (what `make demo` runs)"),
    ):
        sub = commands.add_parser(name, help=text)
        add_arguments(sub, config_class)
        sub.set_defaults(handler=handler, config_class=config_class)
    reporter = commands.add_parser("report", help="Markdown report with tables and pictures from output folders")
    reporter.add_argument("folders", nargs="+", help="probe / sensitivity / sweep / run folders")
    reporter.add_argument("--out", default="report.md", help="the Markdown file to write")
    reporter.set_defaults(handler=cmd_report)

    benchmark = commands.add_parser("bench", help="step-time and memory of full MeZO vs dominant-layer ZO")
    add_arguments(benchmark, BenchConfig)
    benchmark.set_defaults(handler=cmd_bench, config_class=BenchConfig)

    exporter = commands.add_parser("export", help="write a merged Hugging Face folder from a run")
    exporter.add_argument("--run", required=True, help="run folder")
    exporter.add_argument("--to", required=True, help="output folder")
    exporter.add_argument("--checkpoint", default="best", help="best, last or final")
    exporter.set_defaults(handler=cmd_export)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse flags; a --config recipe supplies defaults that explicit flags override."""
    from dlzo.config import load_recipe

    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        recipe = load_recipe(args.config, args.config_class)
        subparser = parser._subparsers._group_actions[0].choices[args.command]
        subparser.set_defaults(**recipe)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except DlzoError as err:
        print(f"dlzo: error: {err}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep the terminal for our tables; real errors still raise
    hf_logging.disable_progress_bar()
    try:
        args.handler(args)
    except DlzoError as err:
        print(f"dlzo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dlzo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
