"""The `dlzo` command line: one sub-command per job, flags generated from the dataclass configs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dlzo.errors import DlzoError


def _read_text_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DlzoError(f"--text {path}: cannot read ({err.__class__.__name__}: {err})") from None
    if not text.strip():
        raise DlzoError(f"--text {path}: the file is empty")
    return text


def _write_json(path: Path, data: dict) -> None:
    from dlzo.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


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
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "probe.json", result.to_json())
    probe.plot(result, out / "probe.png")
    print(f"wrote {out / 'probe.json'} and {out / 'probe.png'}")


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
    probe.add_argument("--data-dir", default="../shared/data", help="folder of official task files")
    probe.add_argument("--max-tokens", type=int, default=512, help="calibration tokens in total")
    probe.add_argument("--abs-threshold", type=float, default=100.0, help="max |h| must exceed this")
    probe.add_argument("--rel-threshold", type=float, default=1000.0, help="max |h| / median |h| must reach this")
    probe.set_defaults(handler=cmd_probe)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
