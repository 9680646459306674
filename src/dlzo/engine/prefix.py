"""The frozen prefix, cached across steps: the layers below the first tuned layer never change during a run,
so their output for every sequence the run sees is computed once and each later forward runs only the tuned
layer and what is above it.

What is cached: for each distinct sequence (its token ids; a sequence always sits at positions 0..n-1, as
dlzo.engine.scoring encodes it, packed or padded), the hidden states the first tuned layer receives, shape (n, hidden).
A forward through the cache embeds the tokens as usual (cheap), lets the layers below the last frozen one pass
their input through untouched, and has the last frozen layer return the cached states put back into the
batch's layout; pad positions get zeros (no real token attends to them).

Exactness: entries are computed by `fill`, from whole encoded batches, and kept; a run fills them in the same
order from the same data every time (dlzo.training.loop: the training examples in fixed chunks before step 0, the dev
batches at the first evaluation), so a resumed run holds the very same tensors as an uninterrupted one and
replay and resume stay bit-exact. Against the uncached fast path the losses agree to float rounding (the
prefix ran on a different batch shape), which tests/test_prefix.py bounds.

Across runs: with a `PrefixStore` (dlzo.engine.prefix_store, `--prefix-store DIR`) each filled batch is also kept on
disk and a later run over the same batches and frozen weights reads it instead of running the layers.

Cost and memory: one inference pass of the prefix over the cached sequences; tokens x hidden x bytes of the
dtype (SmolLM2-135M, SST-2: 1,500 sequences of about 30 tokens x 576 x 4 bytes = about 100 MB). A cache that
would pass its limit is dropped whole, with one line saying so, and the run goes on uncached.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from dlzo.engine.prefix_store import PrefixStore, sequence_name
from dlzo.engine.scoring import EncodedBatch
from dlzo.model.loading import backbone_and_head, decoder_layers


@contextlib.contextmanager
def replaced_forwards(layers: list[nn.Module], replacements: dict[int, Callable]) -> Iterator[None]:
    """Temporarily give `layers[i]` the forward `replacements[i]`; the class's forward (or an instance forward
    that accelerate's device-map hooks installed) comes back afterwards."""
    saved = {}
    for index, forward in replacements.items():
        layer = layers[index]
        saved[index] = layer.__dict__.get("forward")
        layer.forward = forward
    try:
        yield
    finally:
        for index, own in saved.items():
            if own is not None:
                layers[index].forward = own
            else:
                del layers[index].forward


class _Captured(Exception):
    """Raised by the capture hook: nothing above the last frozen layer needs to run."""


def sequence_spans(batch: EncodedBatch) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sequence in the batch: the real tokens of a padded row, or each block of a
    packed row (its position ids restart at 0)."""
    spans = []
    positions = batch.position_ids.tolist()
    mask = batch.attention_mask.tolist() if batch.attention_mask is not None else None
    for row, row_positions in enumerate(positions):
        real = [t for t in range(len(row_positions)) if mask is None or mask[row][t]]
        start = None
        for i, t in enumerate(real):
            if start is None or row_positions[t] == 0:
                if start is not None:
                    spans.append((row, start, real[i - 1] + 1))
                start = t
        if start is not None:
            spans.append((row, start, real[-1] + 1))
    return spans


class FrozenPrefix:
    """The output of layers [0, first_tuned) for every sequence a run sees, computed once (see module doc)."""

    def __init__(self, model: nn.Module, first_tuned: int, limit_bytes: int, store: PrefixStore | None = None):
        if first_tuned < 1:
            raise ValueError("a frozen prefix needs at least one layer below the first tuned layer")
        self.model, self.first_tuned, self.limit, self.store = model, first_tuned, limit_bytes, store
        self.layers = decoder_layers(model)
        self.entries: dict[bytes, torch.Tensor] = {}
        self.bytes, self.seconds, self.dropped = 0, 0.0, False
        self._returns_tuple = False

    @staticmethod
    def _keyed_spans(batch: EncodedBatch) -> list[tuple[int, int, int, bytes]]:
        """(row, start, end, key) of every sequence; the ids come to the host once per batch."""
        ids = batch.input_ids.cpu().numpy()
        return [(row, start, end, ids[row, start:end].tobytes()) for row, start, end in sequence_spans(batch)]

    def fill(self, batch: EncodedBatch) -> None:
        """Run the frozen layers once on the batch and keep every sequence not cached yet. Beyond the limit the
        whole cache is dropped (a run then goes on uncached: `dropped`)."""
        self._fill(batch, self._keyed_spans(batch))

    @torch.no_grad()
    def _fill(self, batch: EncodedBatch, spans: list[tuple[int, int, int, bytes]]) -> None:
        if self.dropped:
            return
        missing = [s for s in spans if s[3] not in self.entries]
        if not missing:
            return
        started = time.perf_counter()
        new: dict[bytes, tuple[int, int, int]] = {}
        for row, start, end, key in missing:  # a sequence twice in a batch: its first place, as before
            new.setdefault(key, (row, start, end))
        states = self._from_store(batch, new)
        if states is None:
            captured = self._prefix_output(batch)
            states = {key: captured[row, start:end].clone() for key, (row, start, end) in new.items()}
            if self.store is not None:
                self._to_store(batch, captured, spans)
        for key, state in states.items():
            self.entries[key] = state
            self.bytes += state.numel() * state.element_size()
        self.seconds += time.perf_counter() - started
        if self.bytes > self.limit:
            self.entries.clear()
            self.bytes, self.dropped = 0, True

    def _from_store(self, batch: EncodedBatch, new: dict[bytes, tuple[int, int, int]]) -> dict | None:
        """The states of the `new` sequences from the store, on the last frozen layer's device, or None."""
        found = self.store.load(batch, [sequence_name(k) for k in new]) if self.store is not None else None
        if found is None:
            return None
        stored, self._returns_tuple = found
        device = next(self.layers[self.first_tuned - 1].parameters()).device
        return {key: stored[sequence_name(key)].to(device) for key in new}

    def _to_store(self, batch: EncodedBatch, captured: torch.Tensor, spans: list[tuple[int, int, int, bytes]]) -> None:
        states: dict[str, torch.Tensor] = {}
        for row, start, end, key in spans:  # every sequence of the batch, at its first place
            states.setdefault(sequence_name(key), captured[row, start:end])
        self.store.save(batch, states, self._returns_tuple)

    def _prefix_output(self, batch: EncodedBatch) -> torch.Tensor:
        """The last frozen layer's output on the batch (the model stops there)."""
        out = {}

        def capture(module, args, output):
            self._returns_tuple = isinstance(output, tuple)
            out["hidden"] = output[0] if isinstance(output, tuple) else output
            raise _Captured

        body, _ = backbone_and_head(self.model)
        handle = self.layers[self.first_tuned - 1].register_forward_hook(capture)
        try:
            body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        return out["hidden"]

    def _states(self, batch: EncodedBatch, spans: list[tuple[int, int, int, bytes]]) -> torch.Tensor:
        """The first tuned layer's input for the batch, assembled from the cache (after `_fill`)."""
        hidden = next(iter(self.entries.values()))
        rows, width = batch.input_ids.shape
        states = torch.zeros(rows, width, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        for row, start, end, key in spans:
            states[row, start:end] = self.entries[key]
        return states

    @contextlib.contextmanager
    def applied(self, batch: EncodedBatch) -> Iterator[None]:
        """Within the block, a forward of `batch` (the same input ids) skips the frozen layers (runs them, when
        the cache was dropped)."""
        spans = self._keyed_spans(batch)  # once per forward: this runs at every step
        self._fill(batch, spans)
        if self.dropped:
            yield
            return
        states = self._states(batch, spans)
        result = (states,) if self._returns_tuple else states

        def passthrough(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) if self._returns_tuple else hidden

        replacements = {i: passthrough for i in range(self.first_tuned - 1)}
        replacements[self.first_tuned - 1] = lambda *args, **kwargs: result
        with replaced_forwards(self.layers, replacements):
            yield

    def summary(self) -> str:
        if self.dropped:
            return (f"frozen prefix: not cached (it would pass --prefix-cache-mb {self.limit / 2**20:.0f}); "
                    f"every step runs layers 0-{self.first_tuned - 1}")
        stored = f"; {self.store.summary()}" if self.store is not None else ""
        return (f"frozen prefix: layers 0-{self.first_tuned - 1} cached for {len(self.entries):,} sequences "
                f"({self.bytes / 2**20:.1f} MB) in {self.seconds:.1f} s{stored}")
