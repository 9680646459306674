"""The frozen prefix kept on disk, so that later runs over the same data and model skip the frozen layers too.

Why: a run's frozen-prefix cache (dlzo.prefix) lives in memory and dies with the run, but a sweep's runs share
it: every learning rate of a grid and every run seed reads the same examples (the data seed is fixed) through
the same frozen layers. For a late layer the prefix is most of the run: SmolLM2-135M on RTE, layer 29, spends
243 s filling the cache and 31 s on its 60 grid steps.

What is stored: one safetensors file per filled batch, named by the batch's digest (its input ids, attention
mask and position ids, bytes and shapes), holding the states of the sequences that batch added to the cache,
each under the SHA-1 of its token ids. The files sit in one folder per prefix fingerprint: the SHA-256 of
every parameter and buffer the prefix can depend on (all but those of the tuned layer and the layers above it,
which change while training), the first tuned layer, the dtype, the device type, the model config, the
attention implementation and torch's version. Other frozen weights (another model, a merged checkpoint) give
another folder; the tuned layer's own changes do not matter.

Exactness: a batch found in the store gives the tensors the run that stored it computed from the very same
batch, so a run reading the store holds the same cache as the one that filled it (the same floats, where both
run the same kernels: same torch, same thread count). A file that cannot be read is a miss, computed again and
written again; files are written atomically, so two runs may share one folder.

Cost: the fingerprint hashes the frozen weights once per run (about 1.4 GB/s here: under a second for
SmolLM2-135M, about 2 s for a 0.5B model); disk as the in-memory cache, per layer and data set (SmolLM2-135M,
RTE: 189 MB of training states at layer 29). Nothing evicts: delete the folder to reclaim it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dlzo.checkpoint import save_tensors
from dlzo.models import decoder_layers
from dlzo.scoring import EncodedBatch


def sequence_name(key: bytes) -> str:
    """A stored sequence's tensor name: the SHA-1 of its token ids' bytes."""
    return hashlib.sha1(key).hexdigest()


def batch_digest(batch: EncodedBatch) -> str:
    """The batch as the prefix sees it: token ids, attention mask and position ids (values and shapes)."""
    digest = hashlib.sha256()
    for tensor in (batch.input_ids, batch.attention_mask, batch.position_ids):
        if tensor is None:
            digest.update(b"none")
            continue
        cpu = tensor.detach().to("cpu", torch.long).contiguous()
        digest.update(repr(tuple(cpu.shape)).encode())
        digest.update(cpu.numpy().tobytes())
    return digest.hexdigest()


def prefix_fingerprint(model: nn.Module, first_tuned: int) -> str:
    """SHA-256 of what the output of layers [0, first_tuned) depends on (see the module docstring)."""
    above = {id(t) for layer in decoder_layers(model)[first_tuned:] for t in [*layer.parameters(), *layer.buffers()]}
    first = next(model.parameters())
    config = getattr(model, "config", None)
    settings = config.to_dict() if config is not None else {}
    settings.pop("_name_or_path", None)  # where the model was read from: the weights below say what it is
    digest = hashlib.sha256(json.dumps({
        "first_tuned": first_tuned, "dtype": str(first.dtype), "device": first.device.type, "torch": torch.__version__,
        "config": settings, "attention": getattr(config, "_attn_implementation", None),
    }, sort_keys=True, default=str).encode())
    named = [*model.named_parameters(remove_duplicate=True), *model.named_buffers(remove_duplicate=True)]
    for name, tensor in sorted(named, key=lambda item: item[0]):
        if id(tensor) in above:
            continue
        cpu = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name} {cpu.dtype} {tuple(cpu.shape)}".encode())
        digest.update(cpu.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class PrefixStore:
    """The stored batches of one prefix fingerprint: `load(batch)` and `save(batch, states)`."""

    def __init__(self, root: str | Path, model: nn.Module, first_tuned: int):
        self.folder = Path(root).expanduser() / prefix_fingerprint(model, first_tuned)
        self.hits = self.misses = 0

    def _file(self, batch: EncodedBatch) -> Path:
        return self.folder / f"{batch_digest(batch)}.safetensors"

    def load(self, batch: EncodedBatch, names: list[str]) -> dict[str, torch.Tensor] | None:
        """The stored states of `names` (sequence_name of each) for this batch, or None (a miss) when the batch
        was not stored, its file is unreadable, or it lacks one of them."""
        path = self._file(batch)
        try:
            stored = load_file(str(path)) if path.exists() else None
        except (SafetensorError, OSError, ValueError):
            stored = None  # a damaged file: computed again, and overwritten by save
        if stored is None or any(name not in stored for name in names):
            self.misses += 1
            return None
        self.hits += 1
        return {name: stored[name] for name in names}

    def save(self, batch: EncodedBatch, states: dict[str, torch.Tensor]) -> None:
        save_tensors(self._file(batch), states)

    def summary(self) -> str:
        return f"{self.hits} of {self.hits + self.misses} batches read from the store {self.folder}"
