"""Completions under perturbed weights: both SPSA branches generated in one batch, greedy or sampled with the
same random numbers for both.

- `BranchedLeaves`: every module that owns a tuned tensor (a linear, norm or embedding module, wherever it
  sits) runs the first half of its rows with θ+εz and the second half with θ-εz, the tensors swapped in for
  one call each. dlzo.engine.fastpath splits a whole decoder layer's call instead; here the split is at the
  leaf, whose input is a plain (rows, ...) tensor, so the attention's key/value cache, which `generate` keeps
  for all 2B rows, never sees half a batch: the two branches are one batch of 2B rows, one decoding loop.
- `SharedNoise`: sampling by the Gumbel-max trick, argmax(logits/T + G), with G drawn from (seed, position)
  alone and repeated for each branch's block of rows: row i of both branches sees the same random numbers, so
  their completions differ where the weights make them differ, never by the sampling (common random numbers).

The frozen-prefix cache (dlzo.engine.prefix) does not apply to generation: it holds the layers below the tuned
one for fixed training sequences, and a completion is a new sequence at every step. What `generate` reuses is the
prompt's own key/value cache while it decodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from dlzo.engine.fastpath import swapped_tensors
from dlzo.engine.prefix import replaced_forwards


class SharedNoise(LogitsProcessor):
    """Turns greedy decoding into sampling at `temperature` with noise that depends only on (seed, position) and
    the row's place in its block of `rows // copies` rows: each of the `copies` blocks sees the same noise."""

    def __init__(self, seed: int, temperature: float, copies: int = 1):
        self.seed, self.temperature, self.copies = seed, temperature, copies

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, vocab = scores.shape
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + input_ids.shape[1]) % 2**63)
        uniform = torch.rand((rows // self.copies, vocab), generator=generator, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-300)))
        noise = gumbel.to(device=scores.device, dtype=torch.float32).repeat(self.copies, 1)
        return scores.float() / self.temperature + noise


class BranchedLeaves:
    """The modules that own the tuned tensors `names`, run as two branches over the halves of their rows."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model, self.names = model, list(names)
        self.owners: dict[str, list[tuple[str, str]]] = {}  # owner module name -> [(its leaf name, global name)]
        for name in self.names:
            owner, _, leaf = name.rpartition(".")
            self.owners.setdefault(owner, []).append((leaf, name))

    @contextlib.contextmanager
    def applied(self, plus: Mapping[str, torch.Tensor], minus: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Inside: the first half of every batch runs with `plus`, the second with `minus`. A lazy mapping (float32
        masters, dlzo.engine.master) is read once here, not at every decoding step."""
        plus, minus = {n: plus[n] for n in self.names}, {n: minus[n] for n in self.names}
        modules = [self.model.get_submodule(owner) for owner in self.owners]
        replacements = {}
        for index, (module, leaves) in enumerate(zip(modules, self.owners.values())):
            replacements[index] = _branched(module, module.forward, {leaf: plus[n] for leaf, n in leaves},
                                            {leaf: minus[n] for leaf, n in leaves})
        with replaced_forwards(modules, replacements):
            yield


def _branched(module: nn.Module, original, plus: dict[str, torch.Tensor], minus: dict[str, torch.Tensor]):
    def forward(*args, **kwargs):
        rows = next(v.shape[0] for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim())
        half = rows // 2

        def part(value, first: bool):
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
                return value[:half] if first else value[half:]
            return value

        outputs = []
        for first, tensors in ((True, plus), (False, minus)):
            with swapped_tensors(module, tensors):
                outputs.append(original(*(part(a, first) for a in args), **{k: part(v, first) for k, v in kwargs.items()}))
        return torch.cat(outputs)
    return forward


@contextlib.contextmanager
def tuned_in(model: nn.Module, tensors: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """`tensors` (global names) in place of the model's own for every row; None: the model as it is."""
    if tensors is None:
        yield
        return
    with swapped_tensors(model, {name: tensors[name] for name in tensors}):
        yield


@torch.no_grad()
def complete(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int, max_length: int,
             copies: int = 1, noise: SharedNoise | None = None) -> list[str]:
    """What the model writes after each prompt (special tokens dropped), greedy unless `noise` samples. The
    prompts are batched `copies` times over, block after block (2: one block a branch under BranchedLeaves), left
    padded, each cut from the left to leave room for `max_new_tokens` within `max_length`."""
    device = next(model.parameters()).device
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # a decoder continues where its prompt ends
    try:
        inputs = tokenizer(list(prompts) * copies, return_tensors="pt", padding=True, truncation=True,
                           max_length=max(max_length - max_new_tokens, 8)).to(device)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    model.eval()
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                            pad_token_id=tokenizer.pad_token_id,
                            logits_processor=LogitsProcessorList([noise]) if noise is not None else None)
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
