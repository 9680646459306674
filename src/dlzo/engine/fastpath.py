"""The fast path for scopes inside decoder layers: both SPSA branches in one forward of 2B rows.

- Layers below the first tuned layer see identical halves, so they run once on B rows and their output
  is duplicated (the prefix is shared between the +ε and -ε branches).
- Each tuned layer runs its first B rows with θ+εz and its last B rows with θ-εz, by swapping tensors
  into the layer for one call; the model's own parameters are never modified.
- With a `FrozenPrefix` (dlzo.engine.prefix) the layers below are not run at all: their output comes from a cache
  filled once per run.
- Layers above run on all 2B rows; logits are computed only where the loss reads them (dlzo.engine.scoring).
- Over float32 masters (dlzo.engine.master) θ±εz comes as a lazy mapping: each tensor is made, in the working
  dtype, when the submodule that owns it starts its forward, and dropped when it ends (`deferred_tensors`).

Two losses: `loss_pair` (dlzo's task batches, dlzo.engine.scoring) and `pair_model_loss` (any causal-LM batch of
model keyword arguments with `labels`: the model's own mean token cross-entropy, used by dlzo.training.hf_trainer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dlzo.engine.prefix import FrozenPrefix, replaced_forwards
from dlzo.engine.scoring import EncodedBatch, loss_from_logprobs, token_logprobs
from dlzo.model.loading import backbone_and_head, decoder_layers, logits_from_hidden

Scorer = Callable[[EncodedBatch, torch.Tensor], torch.Tensor]  # (batch, scored log-probabilities) -> the step's L


def _split(value, rows: int, half: int):
    """(first half, second half) of every batch-leading tensor inside value; other values go to both."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == rows:
        return value[:half], value[half:]
    if isinstance(value, (tuple, list)):
        pairs = [_split(v, rows, half) for v in value]
        return type(value)(p[0] for p in pairs), type(value)(p[1] for p in pairs)
    if isinstance(value, dict):
        pairs = {k: _split(v, rows, half) for k, v in value.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    return value, value


def _join(first, second):
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if isinstance(first, (tuple, list)):
        return type(first)(_join(a, b) for a, b in zip(first, second))
    return first


@contextlib.contextmanager
def swapped_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily use `tensors` (names relative to module) in place of the module's parameters."""
    saved = []
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        saved.append((owner, leaf, owner._parameters[leaf]))
        owner._parameters[leaf] = tensor
    try:
        yield
    finally:
        for owner, leaf, original in saved:
            owner._parameters[leaf] = original


@contextlib.contextmanager
def deferred_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """swapped_tensors for a lazy mapping (dlzo.engine.master.PerturbedMasters): each tensor is read when the
    submodule that owns it starts its forward and dropped when that ends, so one is held at a time, not the layer.
    The hooks go first, ahead of the masters' cast, which then finds the tensor already in the working dtype."""
    owners: dict[nn.Module, list[tuple[str, str]]] = {}
    for name in tensors:
        owner_name, _, leaf = name.rpartition(".")
        owners.setdefault(module.get_submodule(owner_name) if owner_name else module, []).append((leaf, name))
    if module in owners:  # the module's own tensors: its forward is the whole call, so they go in for all of it
        with swapped_tensors(module, {name: tensors[name] for _, name in owners.pop(module)}):
            with deferred_tensors_of(owners, tensors):
                yield
        return
    with deferred_tensors_of(owners, tensors):
        yield


@contextlib.contextmanager
def deferred_tensors_of(owners: dict[nn.Module, list[tuple[str, str]]],
                        tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    saved: dict[nn.Module, list[tuple[str, torch.Tensor]]] = {}

    def put_in(owner: nn.Module, args) -> None:
        saved[owner] = [(leaf, owner._parameters[leaf]) for leaf, _ in owners[owner]]
        for leaf, name in owners[owner]:
            owner._parameters[leaf] = tensors[name]

    def take_out(owner: nn.Module, args, output) -> None:
        for leaf, original in saved.pop(owner, []):
            owner._parameters[leaf] = original

    handles = [h for owner in owners for h in (owner.register_forward_pre_hook(put_in, prepend=True),
                                               owner.register_forward_hook(take_out))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner in list(saved):  # a forward that raised
            take_out(owner, None, None)


def tensors_in(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> contextlib.AbstractContextManager:
    """`tensors` (names relative to module) in place of the module's parameters: a dict all at once, as
    always; a lazy mapping one submodule at a time (deferred_tensors)."""
    return swapped_tensors(module, tensors) if isinstance(tensors, dict) else deferred_tensors(module, tensors)


class LocalView(Mapping):
    """`tensors` (by global name) under the local names of one layer, read only when asked."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], names: dict[str, str]):
        self.tensors, self.local = tensors, {local: name for name, local in names.items()}

    def __getitem__(self, local: str) -> torch.Tensor:
        return self.tensors[self.local[local]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.local)

    def __len__(self) -> int:
        return len(self.local)


def local_tensors(tensors: Mapping[str, torch.Tensor], names: dict[str, str]) -> Mapping[str, torch.Tensor]:
    """A layer's share of `tensors` under its local names: a dict of a dict, a lazy view of a lazy mapping."""
    if isinstance(tensors, dict):
        return {local: tensors[name] for name, local in names.items()}
    return LocalView(tensors, names)


class BranchedForward:
    """Computes (L(θ+εz), L(θ-εz)) for tensors that all live inside decoder layers, in one forward."""

    def __init__(self, model: nn.Module, tuned_names: list[str], frozen: FrozenPrefix | None = None):
        self.model, self.frozen = model, frozen
        self.layers = decoder_layers(model)
        full_names = {id(p): n for n, p in model.named_parameters()}
        self.local_names: dict[int, dict[str, str]] = {}  # layer index -> {global name: local name}
        for index, layer in enumerate(self.layers):
            for local, param in layer.named_parameters():
                name = full_names.get(id(param))
                if name in tuned_names:
                    self.local_names.setdefault(index, {})[name] = local
        covered = {n for names in self.local_names.values() for n in names}
        outside = [n for n in tuned_names if n not in covered]
        if outside:
            raise ValueError(f"the fast path needs tuned tensors inside decoder layers; outside: {outside[:3]}")
        self.first_tuned = min(self.local_names)

    @contextlib.contextmanager
    def _patched(self, rows: int, plus: Mapping[str, torch.Tensor], minus: Mapping[str, torch.Tensor],
                 prefix_cache: dict | None):
        half = rows // 2
        originals = {index: layer.forward for index, layer in enumerate(self.layers)}

        def shared_prefix(index):
            def forward(*args, **kwargs):
                out = prefix_cache.get(index) if prefix_cache is not None else None
                if out is None:
                    args1, _ = _split(args, rows, half)
                    kwargs1, _ = _split(kwargs, rows, half)
                    out = originals[index](*args1, **kwargs1)
                    if prefix_cache is not None:
                        prefix_cache[index] = out
                return _join(out, out)
            return forward

        def branched(index, names):
            layer = self.layers[index]
            plus_local, minus_local = local_tensors(plus, names), local_tensors(minus, names)

            def forward(*args, **kwargs):
                (args1, args2), (kwargs1, kwargs2) = _split(args, rows, half), _split(kwargs, rows, half)
                with tensors_in(layer, plus_local):
                    out1 = originals[index](*args1, **kwargs1)
                with tensors_in(layer, minus_local):
                    out2 = originals[index](*args2, **kwargs2)
                return _join(out1, out2)
            return forward

        replacements = {index: branched(index, names) for index, names in self.local_names.items()}
        if self.frozen is None:  # with a frozen prefix, dlzo.engine.prefix replaces the layers below
            replacements.update({index: shared_prefix(index) for index in range(self.first_tuned)})
        with replaced_forwards(self.layers, replacements):
            yield

    @torch.no_grad()
    def loss_pair(self, batch: EncodedBatch, plus: Mapping[str, torch.Tensor], minus: Mapping[str, torch.Tensor],
                  prefix_cache: dict | None = None, score: Scorer = loss_from_logprobs) -> tuple[torch.Tensor, torch.Tensor]:
        """`prefix_cache`: a dict kept by the caller for one batch and unchanged weights below the tuned
        layers; a prefix layer's output is computed once and reused by later calls on that batch. `score`: what
        each branch's scored log-probabilities give (the loss; -accuracy for dlzo.evaluation.objectives)."""
        doubled = batch.doubled()
        frozen = self.frozen.applied(doubled) if self.frozen is not None else contextlib.nullcontext()
        with frozen, self._patched(doubled.input_ids.shape[0], plus, minus, prefix_cache):
            logprobs = token_logprobs(self.model, doubled)
        tokens = batch.token_row.shape[0]
        return (score(batch, logprobs[:tokens]), score(batch, logprobs[tokens:]))

    @torch.no_grad()
    def loss_at(self, batch: EncodedBatch, tensors: Mapping[str, torch.Tensor] | None,
                frozen: FrozenPrefix | None = None, score: Scorer = loss_from_logprobs) -> torch.Tensor:
        """L on the batch's B rows with the tuned tensors `tensors` swapped in (None: the model's own): one
        branch, for the one-sided estimator. The layers below come from `frozen` (else the run's cache, else
        they run)."""
        frozen = frozen if frozen is not None else self.frozen
        with contextlib.ExitStack() as stack:
            if frozen is not None:
                stack.enter_context(frozen.applied(batch))
            for index, names in self.local_names.items() if tensors is not None else ():
                stack.enter_context(tensors_in(self.layers[index], local_tensors(tensors, names)))
            return score(batch, token_logprobs(self.model, batch))

    @torch.no_grad()
    def pair_model_loss(self, model_kwargs: dict, plus: Mapping[str, torch.Tensor], minus: Mapping[str, torch.Tensor],
                        prefix_cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L(θ+εz), L(θ-εz)) of the model's own causal-LM loss on one batch of model keyword arguments
        (input_ids, attention_mask, position_ids ..., and `labels` with -100 where no loss is taken), from
        one forward of 2B rows. Each half's loss is what `model(**model_kwargs).loss` gives: the mean
        cross-entropy over the tokens whose shifted label is not -100, with float32 logits, read only at
        those positions."""
        labels = model_kwargs["labels"]
        rows = labels.shape[0]
        doubled = {}
        for key, value in model_kwargs.items():
            if key in ("labels", "num_items_in_batch", "use_cache", "return_dict"):
                continue
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
                value = torch.cat([value, value])
            doubled[key] = value
        body, _ = backbone_and_head(self.model)
        with self._patched(2 * rows, plus, minus, prefix_cache):
            out = body(**doubled, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return causal_lm_loss(self.model, hidden[:rows], labels), causal_lm_loss(self.model, hidden[rows:], labels)


def causal_lm_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = -100) -> torch.Tensor:
    """transformers' causal-LM loss from final hidden states: position t predicts labels[t + 1], positions
    whose target is `ignore_index` are skipped, the mean is over the rest (NaN when there are none, as
    transformers gives). Logits are computed only where a target exists."""
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != ignore_index
    logits = logits_from_hidden(model, hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="mean")
