"""Shared fixtures: tiny random-init models of several architectures, the real assets in ../shared, the small
run most training tests share and its command-line flags.

Markers (registered in pyproject.toml): `slow` (make test-fast leaves these out), `requires_shared` (skipped when
the sample assets are absent), `cuda` (skipped without a CUDA GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from dlzo.training.config import TrainConfig
from dlzo.training.loop import Session, train
from dlzo.training.replay import replay
from dlzo.training.run_folder import RunFolder

# The sample assets: $DLZO_SHARED (as dlzo itself reads it), else ../shared beside the checkout.
SHARED = Path(os.environ.get("DLZO_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")
STORIES = SHARED / "models" / "stories260K"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = SHARED / "data"
HAVE_SHARED = STORIES.is_dir() and DATA.is_dir()
NO_SHARED = f"needs the sample assets (stories260K, SST-2/SuperGLUE) in {SHARED}: put ../shared beside the " \
            "checkout or set DLZO_SHARED"

# The small stories260K SST-2 run the training tests share: a second or two a run on a CPU.
SMALL_RUN = dict(model=str(STORIES), task="sst2", data_dir=str(DATA), num_train=64, num_dev=16, num_test=16,
                 batch_size=4, lr=1e-3, quiet=True, eval_batch_size=16)


def small_run(*left_out: str, **changes) -> dict:
    """SMALL_RUN with `changes`, without the `left_out` keys (an options class that lacks them, or a test that
    runs at that option's default)."""
    unknown = set(left_out) - set(SMALL_RUN)
    assert not unknown, f"not options of SMALL_RUN: {sorted(unknown)}"
    return {**{k: v for k, v in SMALL_RUN.items() if k not in left_out}, **changes}


def flags(values: dict) -> list[str]:
    """The command-line flags giving these option values: --name value, a bool as --name or --no-name."""
    args = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


@pytest.fixture(autouse=True, scope="session")
def shared_task_files_parsed_once():
    """The official task files in ../shared are read-only: each split is parsed once a session and handed out
    as a new list of the same Examples (SST-2's 67,349 training rows took about 1 s of every small run's 1.5 s).
    Files anywhere else (the tests' own, malformed ones) and the hub are read each time, as dlzo reads them."""
    from dlzo.data.benchmarks import Task

    parsed, read_split = {}, Task.read_split
    shared_data = DATA.resolve()

    def read_split_once(self, split):
        folder = (Path(self.data_dir) / self.folder).resolve()
        if self.hub_source is not None or not folder.is_relative_to(shared_data):
            return read_split(self, split)
        key = (type(self), folder, split)
        if key not in parsed:
            parsed[key] = read_split(self, split)
        return list(parsed[key])

    patch = pytest.MonkeyPatch()
    patch.setattr(Task, "read_split", read_split_once)
    yield
    patch.undo()


def pytest_collection_modifyitems(config, items):
    """requires_shared tests skip when the sample assets are absent, cuda tests without a CUDA GPU."""
    no_gpu = not torch.cuda.is_available()
    for item in items:
        if not HAVE_SHARED and item.get_closest_marker("requires_shared"):
            item.add_marker(pytest.mark.skip(reason=NO_SHARED))
        if no_gpu and item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def tiny_config(arch: str, layers: int = 4, vocab: int = 512):
    """A few-thousand-parameter config of the named architecture (random weights, built in the test)."""
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, head_dim=8,
                              num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
                            word_embed_proj_dim=32, max_position_embeddings=256, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=256, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, head_dim=8,
                               num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "phi3":
        return tf.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, **common)
    if arch == "falcon":
        return tf.FalconConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, **common)
    if arch == "phi":
        return tf.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "gemma":
        return tf.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, head_dim=8,
                              num_attention_heads=4, num_key_value_heads=2, **common)
    raise ValueError(arch)


def tiny_model(arch: str, layers: int = 4, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers))
    model.config.use_cache = False
    return model.eval()


@pytest.fixture(scope="session")
def stories_path() -> str:
    if not STORIES.is_dir():
        pytest.skip(NO_SHARED)
    return str(STORIES)


@pytest.fixture(scope="session")
def stories_tokenizer(stories_path):
    from dlzo.model.loading import load_tokenizer

    return load_tokenizer(stories_path)


def assert_replay_and_resume_exact(tmp_path: Path, options: dict, stops: list[int]) -> tuple[dict, Path]:
    """Train `options` uninterrupted into tmp_path/whole and check that `dlzo replay` rebuilds its tensors bit
    for bit; train it again into tmp_path/stopped, stopped after each step count in `stops` and resumed each
    time (the last stop's final.safetensors and results.json removed, so the resumed run must write them), and
    check that it ends with the same tensors. Returns (the uninterrupted run's tensors, the stopped folder)."""
    train(TrainConfig(**options, out=str(tmp_path / "whole")))
    whole = load_file(tmp_path / "whole" / "final.safetensors")
    rebuilt = replay(tmp_path / "whole")
    assert all(torch.equal(rebuilt[n], whole[n]) for n in whole)
    stopped = tmp_path / "stopped"
    trained: list[int] = []  # the steps each call trains: a resume that started again from 0 ends the same
    original = Session.train_step

    def counting(self, step, lr):
        trained.append(step)
        return original(self, step, lr)
    with mock.patch.object(Session, "train_step", counting):
        for i, (start, steps) in enumerate(zip([0, *stops], [*stops, options["steps"]])):
            if i == len(stops):  # the last stop's final files go, so the resumed run must write them
                for name in ("final.safetensors", "results.json"):
                    (stopped / name).unlink()
            resume = {"resume": str(stopped)} if i else {}
            trained.clear()
            train(TrainConfig(**{**options, "steps": steps}, out=str(stopped), **resume))
            assert trained == list(range(start, steps)), f"call {i} trained steps {trained}, not {start}..{steps - 1}"
    resumed = load_file(stopped / "final.safetensors")
    assert all(torch.equal(resumed[n], whole[n]) for n in whole)
    return whole, stopped


@contextmanager
def another_process_holding(folder: Path) -> Iterator[int]:
    """A live process holding the run folder `folder` as a run does (RunFolder.lock: its lock file locked
    through filelock, its pid written beside it) until the block ends, then killed (its pid file left behind,
    as a kill leaves it). Yields its pid."""
    run = RunFolder(folder)
    run.path.mkdir(parents=True, exist_ok=True)
    code = ("import os, sys, time, filelock\n"
            "lock = filelock.FileLock(sys.argv[1])\n"
            "lock.acquire(timeout=0)\n"
            "open(sys.argv[2], 'w').write(f'{os.getpid()}\\n')\n"
            "print('held', flush=True)\n"
            "time.sleep(300)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(run.lock_file), str(run.holder_file)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        yield child.pid
    finally:
        child.kill()
        child.wait()
