"""The frozen prefix kept on disk, so that later runs over the same data and model skip the frozen layers too.

Why: a run's frozen-prefix cache (dlzo.engine.prefix) lives in memory and dies with the run, but a sweep's runs share
it: every learning rate of a grid and every run seed reads the same examples (the data seed is fixed) through
the same frozen layers. For a late layer the prefix is most of the run: SmolLM2-135M on RTE, layer 29, spends
243 s filling the cache and 31 s on its 60 grid steps.

What is stored: one safetensors file per filled batch, named by the batch's digest (its input ids, attention
mask and position ids, bytes and shapes), holding the states of every sequence of that batch, each under the
SHA-1 of its token ids, with a SHA-256 of them all and whether the last frozen layer returns a tuple (Falcon's
do) in its metadata. The files sit in one folder per prefix fingerprint: the SHA-256 of every parameter and
buffer the prefix can depend on (all but those of the tuned layer and the layers above it, which change while
training), the first tuned layer, the dtype, the device (and GPU, CUDA version, TF32 flags), torch's thread
count and version, the model config, the attention implementation and the store's format version. Other
frozen weights (another model, a merged checkpoint) give another folder; the tuned layer's changes do not.

Exactness: a batch found in the store gives the tensors the run that stored it computed from the very same
batch with the same kernels, so a run reading the store holds the same cache as the one that filled it. A file
that cannot be read or fails its checksum is a miss, computed again and written again; files are written
atomically, so several runs may share one folder. A write that fails (a full disk) stops the storing, not the
run. Weights offloaded to the meta device cannot be hashed: no store then.

The untrained model's dev loss (a run's step 0) is kept there too, in a small JSON file named by
`start_loss_key`: the SHA-256 of what it adds to the folder's fingerprint (the weights of the tuned layer and
those above, every dev batch whole, how the losses are averaged). Every run of a sweep over one layer starts
from the same weights and dev set, so only the first measures it: on Qwen2.5-0.5B, RTE, layer 3, that is about
ten minutes a run (500 dev examples through 21 layers on one thread). It is the float the first run computed,
with the same kernels from the same inputs, so the runs that read it log and compare against the same number.

Cost: the fingerprint hashes the frozen weights once per run (about 1.4 GB/s here: 0.6 s for SmolLM2-135M at
layer 29), the checksum the states of each batch read or written; disk as the in-memory cache, per layer and
data set (SmolLM2-135M, RTE: 189 MB of training states at layer 29). Nothing evicts: delete the folder to
reclaim it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from dlzo.engine.scoring import EncodedBatch
from dlzo.model.checkpoint import atomic_write_json, save_tensors
from dlzo.model.loading import decoder_layers

STORE_VERSION = 1  # raised whenever what a file holds, or how it is computed, changes


def sequence_name(key: bytes) -> str:
    """A stored sequence's tensor name: the SHA-1 of its token ids' bytes."""
    return hashlib.sha1(key).hexdigest()


def _feed_ids(digest, tensor: torch.Tensor) -> None:
    """Feed an integer tensor of a batch (ids, masks, positions, indices) to `digest`: its shape and values."""
    cpu = tensor.detach().to("cpu", torch.long).contiguous()
    digest.update(repr(tuple(cpu.shape)).encode())
    digest.update(cpu.numpy().tobytes())


def batch_digest(batch: EncodedBatch) -> str:
    """The batch as the prefix sees it: token ids, attention mask and position ids (values and shapes)."""
    digest = hashlib.sha256()
    for tensor in (batch.input_ids, batch.attention_mask, batch.position_ids):
        if tensor is None:
            digest.update(b"none")
        else:
            _feed_ids(digest, tensor)
    return digest.hexdigest()


def _hash_batch(digest, batch: EncodedBatch) -> None:
    """Feed every field of the batch to `digest` (tensor values and shapes, counts and flags)."""
    for name, value in sorted(vars(batch).items()):
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            _feed_ids(digest, value)
        else:
            digest.update(repr(value).encode())


def start_loss_key(model: nn.Module, first_tuned: int, batches: Iterable[EncodedBatch], settings: dict) -> str:
    """SHA-256 of what a dev loss of the model depends on beyond the store's fingerprint (which covers the
    frozen weights, the kernels and the model config): the parameters and buffers of layer `first_tuned` and
    those above it, every dev batch whole (ids, scored positions, answers, labels) and `settings` (how the
    per-example losses are reduced: their count, per token or per example)."""
    digest = hashlib.sha256(json.dumps({"first_tuned": first_tuned, **settings}, sort_keys=True).encode())
    for batch in batches:
        _hash_batch(digest, batch)
    layers = decoder_layers(model)[first_tuned:]
    tuned = {f"{first_tuned + i}.{name}": t for i, layer in enumerate(layers)
             for name, t in [*layer.named_parameters(), *layer.named_buffers()]}
    return _hash_tensors(digest, tuned)


def prefix_fingerprint(model: nn.Module, first_tuned: int) -> str | None:
    """SHA-256 of what the output of layers [0, first_tuned) depends on (see the module docstring); None when a
    weight is not in memory (offloaded to the meta device by a device map: nothing to hash)."""
    above = {id(t) for layer in decoder_layers(model)[first_tuned:] for t in [*layer.parameters(), *layer.buffers()]}
    named = [(name, t) for name, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in above]
    if any(t.device.type == "meta" for _, t in named):
        return None
    first = next(model.parameters())
    config = getattr(model, "config", None)
    settings = config.to_dict() if config is not None else {}
    settings.pop("_name_or_path", None)  # where the model was read from: the weights below say what it is
    kernels = {"threads": torch.get_num_threads()}  # the kernels' split of the work can change the last bits
    if first.device.type == "cuda":
        kernels.update(gpu=torch.cuda.get_device_name(first.device), cuda=torch.version.cuda,
                       tf32=[torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32])
    digest = hashlib.sha256(json.dumps({
        "store": STORE_VERSION, "first_tuned": first_tuned, "dtype": str(first.dtype), "device": first.device.type,
        "torch": torch.__version__, "kernels": kernels, "config": settings,
        "attention": getattr(config, "_attn_implementation", None),
    }, sort_keys=True, default=str).encode())
    return _hash_tensors(digest, dict(named))


def _hash_tensors(digest, tensors: dict[str, torch.Tensor]) -> str:
    """Feed each tensor's name, dtype, shape and bytes, in name order, to `digest`; its hex digest. A quantized
    weight (--quantize: a torchao tensor) is fed as the plain tensors it is made of, each under its own name."""
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        if is_traceable_wrapper_subclass(tensor):
            parts, _ = tensor.__tensor_flatten__()
            _hash_tensors(digest, {f"{name}.{part}": getattr(tensor, part) for part in parts})
            continue
        cpu = tensor.to("cpu").contiguous()
        digest.update(f"{name} {cpu.dtype} {tuple(cpu.shape)}".encode())
        digest.update(cpu.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _checksum(states: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the stored states (names, shapes, dtypes and bytes): safetensors keeps none of its own."""
    return _hash_tensors(hashlib.sha256(), states)


class PrefixStore:
    """The stored batches of one prefix fingerprint: `load(batch, names)` and `save(batch, states, returns_tuple)`.
    `PrefixStore.open` gives None (and says why) where no store can be kept."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.hits = self.misses = 0
        self.writable = True

    @classmethod
    def open(cls, root: str | Path, model: nn.Module, first_tuned: int) -> PrefixStore | None:
        fingerprint = prefix_fingerprint(model, first_tuned)
        if fingerprint is None:
            print("--prefix-store: not used, some frozen weights are offloaded (meta device) and cannot be hashed")
            return None
        return cls(Path(root).expanduser() / fingerprint)

    def _file(self, batch: EncodedBatch) -> Path:
        return self.folder / f"{batch_digest(batch)}.safetensors"

    def load(self, batch: EncodedBatch, names: list[str]) -> tuple[dict[str, torch.Tensor], bool] | None:
        """The stored states of `names` (sequence_name of each) for this batch and whether the last frozen layer
        returns a tuple, or None (a miss) when the batch was not stored, its file is unreadable or fails its
        checksum, or it lacks one of them."""
        path = self._file(batch)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                stored = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError):
            stored, metadata = None, {}  # absent or damaged: computed again, and overwritten by save
        if stored is None or metadata.get("sha256") != _checksum(stored) or any(n not in stored for n in names):
            self.misses += 1
            return None
        self.hits += 1
        return {name: stored[name] for name in names}, metadata.get("returns_tuple") == "1"

    def save(self, batch: EncodedBatch, states: dict[str, torch.Tensor], returns_tuple: bool) -> None:
        """Keep every sequence of the batch (the file then does not depend on what the run had cached before).
        A write that fails (a full disk, no permission) costs the store, not the run: one line, no more writes."""
        if not self.writable:
            return
        metadata = {"sha256": _checksum(states), "returns_tuple": "1" if returns_tuple else "0"}
        try:
            save_tensors(self._file(batch), states, metadata)
        except OSError as err:
            self.writable = False
            print(f"--prefix-store: cannot write to {self.folder} ({err.strerror or err}); the run goes on, "
                  f"storing nothing more")

    def _start_file(self, key: str) -> Path:
        return self.folder / f"start-loss-{key}.json"

    def read_start_loss(self, key: str) -> float | None:
        """The dev loss at step 0 kept under `key` (start_loss_key), or None (never kept, or unreadable)."""
        try:
            value = json.loads(self._start_file(key).read_text())["dev_loss"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return float(value) if isinstance(value, (int, float)) else None

    def write_start_loss(self, key: str, loss: float) -> None:
        """Keep a measured dev loss at step 0 (json keeps a float's every digit); a failed write costs nothing."""
        if not self.writable:
            return
        try:
            atomic_write_json(self._start_file(key), {"dev_loss": loss})
        except OSError:
            self.writable = False

    def summary(self) -> str:
        return f"{self.hits} of {self.hits + self.misses} batches read from the store {self.folder}"
