"""`dlzo train` (the training loop, under torch.distributed when launched so) and the small commands: `dlzo
generate` (what a run or base model says), `dlzo replay` (rebuild a run's tensors), `dlzo export` (a merged folder
or an adapter) and `dlzo report` (a Markdown report of output folders).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dlzo.cli.options import ExportConfig, GenerateConfig, ReplayConfig, ReportConfig
from dlzo.engine import distributed
from dlzo.errors import DlzoError
from dlzo.evaluation.generation import chat_prompt, generate_text
from dlzo.model.checkpoint import (
    atomic_write_json,
    check_output,
    load_tensors,
    save_tensors,
)
from dlzo.model.loading import load_model, load_tokenizer, resolve_model_source
from dlzo.studies.report import report
from dlzo.training.config import TrainConfig
from dlzo.training.export import export, export_adapter, export_gguf
from dlzo.training.loop import train
from dlzo.training.replay import hessian_summary, replay_with_optimizer
from dlzo.training.run_folder import RunFolder, read_jsonl
from dlzo.training.run_model import load_checkpoint_of_run


def train_command(config: TrainConfig) -> None:
    distributed.init_if_launched(config.device)
    train(config)


def resume_defaults(folder: str) -> dict:
    """`dlzo train --resume FOLDER`: the options that run was started with, as defaults flags override."""
    return RunFolder(folder, "--resume").recorded_options()


def report_command(config: ReportConfig) -> None:
    report(config.folders, config.out)
    print(f"wrote {config.out}")


def run_data_format(run: str | Path) -> str | None:
    """The format of the rows a run was trained on (None for a task run)."""
    return (RunFolder(run, "--run").record().get("data") or {}).get("format")


def generate_command(config: GenerateConfig) -> str:
    """`dlzo generate`: print the continuation of --prompt by the run's tuned model or the base --model."""
    config.validate()
    if config.run:
        chat = config.chat or run_data_format(config.run) == "chat"
        prepared = load_checkpoint_of_run(config.run, config.checkpoint, config.model or None,
                                          config.device, config.dtype)
        model, tokenizer = prepared.model, prepared.tokenizer
    else:
        resolve_model_source(config.model)
        chat = config.chat
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        if chat:
            chat_prompt(tokenizer, config.prompt)  # no chat template: say so before loading the model
        model = load_model(config.model, dtype=config.dtype, device=config.device,
                           trust_remote_code=config.trust_remote_code)
    text = generate_text(model, tokenizer, config.prompt, chat=chat, max_new_tokens=config.max_new_tokens,
                         sample=config.sample, temperature=config.temperature, top_p=config.top_p, seed=config.seed)
    print(text)
    return text


def export_command(config: ExportConfig) -> None:
    config.validate()
    if config.gguf:
        check_output(config.gguf, "--gguf", folder=False)
        print(f"wrote {export_gguf(config.run, config.gguf, config.checkpoint, config.gguf_type)} ({config.gguf_type})")
        return
    check_output(config.to, "--to", folder=True)
    if config.adapter:
        print(f"wrote the tuned tensors only to {export_adapter(config.run, config.to, config.checkpoint)}")
    else:
        print(f"wrote a merged Hugging Face folder to {export(config.run, config.to, config.checkpoint, config.dtype)}")


def replay_command(config: ReplayConfig) -> None:
    run = Path(config.run)
    if not (run / "trajectory.jsonl").exists():
        raise DlzoError(f"--run {run}: no trajectory.jsonl there")
    if config.to:
        check_output(config.to, "--to", folder=False)
    rebuilt, zo = replay_with_optimizer(run, config.base or None)
    if config.to:
        save_tensors(config.to, rebuilt)
    if zo.update_rule == "hizoo" and not zo.hessian:
        print("hizoo: no step was applied (every one skipped, or none logged): no Hessian estimate to describe")
    elif zo.update_rule == "hizoo":
        applied = [e for e in read_jsonl(run / "trajectory.jsonl") if not e["skipped"]]
        summary = hessian_summary(zo, [c for e in applied for c in e["curvatures"]])
        atomic_write_json(run / "hessian.json", summary)
        print(f"hizoo: D mean {summary['D_mean']:.3g} (step scale {summary['step_scale_mean']:.3f}); spread of "
              f"log D {summary['log_D_std']:.4f} against {summary['log_D_std_if_noise_only']:.4f} from z² noise "
              f"alone; wrote {run / 'hessian.json'}")
    final = run / "final.safetensors"
    if not final.exists():
        print(f"replayed {len(rebuilt)} tensors (no final.safetensors to compare with)")
        return
    trained = load_tensors(final)
    same = all(torch.equal(rebuilt[n].cpu(), trained[n]) for n in trained)
    worst = max(float((rebuilt[n].float() - trained[n].float()).abs().max()) for n in trained)
    print(f"replayed {len(rebuilt)} tensors; bit-identical to final.safetensors: {same} (max |diff| {worst:.3g})")
    if not same:
        raise DlzoError("replay differs from the trained weights (different device type or library versions?)")

