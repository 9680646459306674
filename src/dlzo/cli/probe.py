"""`dlzo probe`: the massive-activation probe (dlzo.model.probe) on the built-in prose, a text file, a task's
training prompts or your own rows; writes probe.json and probe.png.
"""

from __future__ import annotations

from pathlib import Path

from dlzo.cli.options import ProbeConfig
from dlzo.data.benchmarks import load_task
from dlzo.data.user_data import UserTask, load_user_data
from dlzo.errors import DlzoError
from dlzo.model.loading import load_model, load_tokenizer, resolve_model_source
from dlzo.model.probe import ProbeResult, find_dominant_layer, format_table
from dlzo.studies.plots import save_outputs


def probe_command(config: ProbeConfig) -> ProbeResult:
    """`dlzo probe`: the per-layer table and the pick, written to OUT/probe.json and OUT/probe.png."""
    if not config.model:
        raise DlzoError("--model is required")
    config.validate_model_options()
    config.validate_data_options()
    texts = [_read_text_file(config.text)] if config.text else None
    if config.data:  # the rows are read (with the model's tokenizer, for chat templates) before the model loads
        resolve_model_source(config.model)
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        user = load_user_data(config.data, tokenizer, config.data_format, config.columns)
        texts = [UserTask(user).prompt_text(example) for example in user.train[:64]]
    model = load_model(config.model, dtype=config.dtype, device=config.device,
                       trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    if config.task and not config.data:
        task = load_task(config.task, config.data_dir)
        texts = [task.prompt_text(example) for example in task.splits(seed=0).train[:64]]
    result = find_dominant_layer(model, tokenizer, texts, max_tokens=config.max_tokens,
                                 abs_threshold=config.abs_threshold, rel_threshold=config.rel_threshold,
                                 rule=config.rule, min_jump=config.min_jump, persistence=config.persistence)
    print(format_table(result))
    save_outputs(result, config.out)
    print(f"wrote {Path(config.out) / 'probe.json'} and {Path(config.out) / 'probe.png'}")
    return result


def _read_text_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DlzoError(f"--text {path}: cannot read ({err.__class__.__name__}: {err})") from None
    if not text.strip():
        raise DlzoError(f"--text {path}: the file is empty")
    return text

