"""Turn examples into padded token batches and score their candidates: the task interface of the engine.

An `EncodedBatch` lists, for every candidate, which (row, position) logits predict which answer tokens.
Two ways to fill it:
- packed (the fast path): when every candidate of an example is one token appended to the shared
  context, the example is one sequence and all candidates are read from its last position;
- per candidate (MeZO's way, and the fallback): one sequence per candidate.
Losses read logits only at the scored positions (answer-only logits) unless `full_logits` is asked for.

Generation examples may instead name several character spans to score (`SpanExample`: the assistant turns of a
chat, the whole of a plain text): their one sequence is the whole text, and the loss reads exactly the tokens
that overlap a span. Too long, such a sequence loses prompt tokens from the left first (a leading BOS stays).

Layouts: "padded" pads every sequence to the longest (on the left, MeZO's way, unless the tokenizer or
`padding_side` says right); "packed" concatenates sequences
into a few rows with position ids restarting per sequence and no attention mask, which transformers turns
into a block-diagonal causal mask. Padding tokens are pure waste: on SST-2 batches packing removes about
half of the tokens. `supports_packing` checks once per model that packing gives the padded numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlzo.data.examples import Example
from dlzo.model.loading import backbone_and_head, logits_from_hidden


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # (rows, T)
    attention_mask: torch.Tensor | None  # (rows, T) for the padded layout; None when packed
    position_ids: torch.Tensor  # (rows, T): explicit, so padding never shifts absolute positions (GPT-2, OPT)
    token_row: torch.Tensor  # (M,) row of each scored answer token
    token_position: torch.Tensor  # (M,) position whose logits predict it
    token_target: torch.Tensor  # (M,) the answer token id
    token_candidate: torch.Tensor  # (M,) global candidate index
    candidate_example: torch.Tensor  # (C,) example of each candidate
    candidate_slot: torch.Tensor  # (C,) index of the candidate within its example
    labels: torch.Tensor  # (E,) correct candidate of each example
    num_examples: int
    max_candidates: int
    generation: bool = False

    def to(self, device: torch.device) -> EncodedBatch:
        values = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return EncodedBatch(**values)

    def doubled(self) -> EncodedBatch:
        """The same batch twice (rows 0..R-1 and R..2R-1), for evaluating both ZO branches in one forward."""
        rows = self.input_ids.shape[0]
        candidates = self.candidate_example.shape[0]
        return EncodedBatch(
            input_ids=torch.cat([self.input_ids, self.input_ids]),
            attention_mask=None if self.attention_mask is None else torch.cat([self.attention_mask] * 2),
            position_ids=torch.cat([self.position_ids, self.position_ids]),
            token_row=torch.cat([self.token_row, self.token_row + rows]),
            token_position=torch.cat([self.token_position, self.token_position]),
            token_target=torch.cat([self.token_target, self.token_target]),
            token_candidate=torch.cat([self.token_candidate, self.token_candidate + candidates]),
            candidate_example=torch.cat([self.candidate_example, self.candidate_example + self.num_examples]),
            candidate_slot=torch.cat([self.candidate_slot, self.candidate_slot]),
            labels=torch.cat([self.labels, self.labels]),
            num_examples=2 * self.num_examples,
            max_candidates=self.max_candidates,
            generation=self.generation,
        )


def context_limit(model: nn.Module, requested: int) -> int:
    """The longest sequence the model can take: its position table bounds absolute-position models."""
    config = getattr(model, "config", None)
    table = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(requested, table) if table else requested


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]


def span_tokens(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """The tokens of `text` (with the tokenizer's special tokens) and which of them overlap a span.
    Fast tokenizers answer from their offsets; others by tokenizing the text up to each span boundary."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
        ids = list(encoded["input_ids"])
        scored = [end > start and any(start < e and end > s for s, e in spans)
                  for start, end in encoded["offset_mapping"]]
    else:
        ids = _tokens(tokenizer, text)
        scored = [False] * len(ids)
        for s, e in spans:
            low = _common_prefix(_tokens(tokenizer, text[:s]), ids)
            high = _common_prefix(_tokens(tokenizer, text[:e]), ids)
            scored[low:high] = [True] * max(high - low, 0)
    if scored:
        scored[0] = False  # nothing predicts the first token
    return ids, scored


def fit_span_tokens(ids: list[int], scored: list[bool], max_length: int,
                    bos_token_id: int | None = None) -> tuple[list[int], list[bool]]:
    """Cut a too-long sequence to max_length: unscored tokens before the first scored one go first, from
    the left (a leading BOS stays); if that is not enough, the end of the sequence goes."""
    excess = len(ids) - max_length
    if excess <= 0 or True not in scored:
        return ids[-max_length:], scored[-max_length:]
    first = scored.index(True)
    keep = int(bos_token_id is not None and ids[0] == bos_token_id and max_length > 2)
    cut = min(excess, max(first - 1 - keep, 0))
    ids, scored = ids[:keep] + ids[keep + cut :], scored[:keep] + scored[keep + cut :]
    return ids[:max_length], scored[:max_length]


def encode(
    tokenizer,
    examples: list[Example],
    pack_single_token: bool = True,
    max_length: int = 2048,
    demonstrations: str = "",
    generation: bool = False,
    layout: str = "padded",
    padding_side: str | None = None,
) -> EncodedBatch:
    """Tokenize examples into one batch (layout "padded" or "packed"). `demonstrations` is prepended.
    `padding_side` ("left" or "right") of the padded layout defaults to the tokenizer's, else left."""
    sequences: list[list[int]] = []
    scored: list[tuple[int, int, int, int]] = []  # row, position, target, candidate
    candidate_example, candidate_slot, labels = [], [], []
    for example_index, example in enumerate(examples):
        spans = getattr(example, "spans", None)
        if spans:
            shift = len(demonstrations)
            ids, mask = span_tokens(tokenizer, demonstrations + example.prompt + example.continuations[0],
                                    [(s + shift, e + shift) for s, e in spans])
            ids, mask = fit_span_tokens(ids, mask, max_length, getattr(tokenizer, "bos_token_id", None))
            if True not in mask:
                raise ValueError(f"example {example_index} has no token to score in its spans {spans}")
            candidate = len(candidate_example)
            candidate_example.append(example_index)
            candidate_slot.append(0)
            sequences.append(ids)
            scored.extend((len(sequences) - 1, i - 1, ids[i], candidate) for i, hit in enumerate(mask) if hit)
            labels.append(example.label)
            continue
        context = _tokens(tokenizer, demonstrations + example.prompt)
        fulls = [_tokens(tokenizer, demonstrations + example.prompt + c) for c in example.continuations]
        packable = pack_single_token and all(len(f) == len(context) + 1 and f[:-1] == context for f in fulls)
        if packable:
            sequences.append(context[-max_length:])
        for slot, full in enumerate(fulls):
            shared = _common_prefix(context, full)
            answer = full[shared:] if shared < len(full) else full[-1:]
            candidate = len(candidate_example)
            candidate_example.append(example_index)
            candidate_slot.append(slot)
            if not packable:
                sequences.append(full[-max_length:])
            row = len(sequences) - 1
            length = len(sequences[row])
            first_position = (length - 1) if packable else (length - len(answer) - 1)
            for offset, target in enumerate(answer):
                scored.append((row, max(first_position + offset, 0), target, candidate))
        labels.append(example.label)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, positions, targets, candidates = (torch.tensor(column) for column in zip(*scored))
    if layout == "packed":
        input_ids, attention_mask, position_ids, row_of, offset_of = _pack_rows(sequences, pad)
        rows, positions = row_of[rows], positions + offset_of[rows]
    elif layout == "padded":
        side = padding_side or getattr(tokenizer, "padding_side", "left")
        if padding_side is not None and padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be left or right, not {padding_side!r}")
        left = side != "right"
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            start = width - len(sequence) if left else 0
            input_ids[row, start : start + len(sequence)] = torch.tensor(sequence)
            attention_mask[row, start : start + len(sequence)] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        if left:
            # Positions were computed in each unpadded sequence; shift them by the row's left padding.
            positions = positions + (width - attention_mask.sum(-1))[rows]
    else:
        raise ValueError(f"layout must be padded or packed, not {layout!r}")
    return EncodedBatch(
        input_ids, attention_mask, position_ids, rows, positions, targets, candidates,
        torch.tensor(candidate_example), torch.tensor(candidate_slot), torch.tensor(labels),
        num_examples=len(examples), max_candidates=max(len(e.continuations) for e in examples),
        generation=generation,
    )


def _pack_rows(sequences: list[list[int]], pad: int):
    """First-fit-decreasing bin packing of sequences into rows no wider than the longest sequence.
    Rows are filled up to the longest row with filler tokens that attend only to themselves."""
    # Wider rows cost attention quadratically for no saving in the linear layers (measured on stories260K:
    # 512-token rows made a forward 2.7x slower than rows as wide as the longest sequence).
    capacity = max(len(s) for s in sequences)
    bins: list[list[int]] = []
    loads: list[int] = []
    for index in sorted(range(len(sequences)), key=lambda i: -len(sequences[i])):
        target = next((b for b, load in enumerate(loads) if load + len(sequences[index]) <= capacity), None)
        if target is None:
            bins.append([])
            loads.append(0)
            target = len(bins) - 1
        bins[target].append(index)
        loads[target] += len(sequences[index])
    width = max(loads)
    input_ids = torch.full((len(bins), width), pad, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    row_of = torch.zeros(len(sequences), dtype=torch.long)
    offset_of = torch.zeros(len(sequences), dtype=torch.long)
    for row, members in enumerate(bins):
        cursor = 0
        for index in members:
            length = len(sequences[index])
            input_ids[row, cursor : cursor + length] = torch.tensor(sequences[index])
            position_ids[row, cursor : cursor + length] = torch.arange(length)
            row_of[index], offset_of[index] = row, cursor
            cursor += length
        # filler: position 0 everywhere, so each filler token is its own one-token block (and never runs
        # past a model's position table)
    return input_ids, None, position_ids, row_of, offset_of


def supports_packing(model: nn.Module, tokenizer) -> bool:
    """Whether this model gives the same scores for packed and padded batches (checked once, cached)."""
    cached = getattr(model, "_dlzo_supports_packing", None)
    if cached is not None:
        return cached
    # The long example sets the row width; the short ones must then share a row, which is what can go wrong.
    probe = [Example("One two three four five six seven eight nine ten eleven twelve", [" thirteen", " ten"], 0),
             Example("Hello", [" a", " b"], 1), Example("Hi there", [" c", " d"], 0)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            padded = encode(tokenizer, probe, layout="padded").to(device)
            packed = encode(tokenizer, probe, layout="packed").to(device)
            same = torch.allclose(candidate_scores(padded, token_logprobs(model, padded)),
                                  candidate_scores(packed, token_logprobs(model, packed)), rtol=1e-3, atol=1e-3)
    except (RuntimeError, ValueError, TypeError):
        same = False
    model._dlzo_supports_packing = same
    return same


def fast_layout(model: nn.Module, tokenizer, fast: bool = True) -> str:
    return "packed" if fast and supports_packing(model, tokenizer) else "padded"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def hidden_states(model: nn.Module, batch: EncodedBatch) -> torch.Tensor:
    """Final-normed hidden states of the transformer body (no LM head)."""
    body, _ = backbone_and_head(model)
    out = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
               use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def token_logprobs(model: nn.Module, batch: EncodedBatch, full_logits: bool = False) -> torch.Tensor:
    """Log-probability of every scored answer token, shape (M,)."""
    if full_logits:
        # MeZO's way: logits over the whole vocabulary at every position of every row.
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False).logits
        logprobs = logits.float().log_softmax(-1)
        return logprobs[batch.token_row, batch.token_position, batch.token_target]
    hidden = hidden_states(model, batch)
    pairs = torch.stack([batch.token_row, batch.token_position], 1)
    unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
    logits = logits_from_hidden(model, hidden[unique[:, 0], unique[:, 1]])
    logprobs = logits.float().log_softmax(-1)
    return logprobs[inverse, batch.token_target]


def candidate_scores(batch: EncodedBatch, logprobs: torch.Tensor) -> torch.Tensor:
    """Length-normalised log-probability of each candidate, as an (examples, max_candidates) matrix
    with -inf where an example has fewer candidates."""
    num_candidates = batch.candidate_example.shape[0]
    sums = torch.zeros(num_candidates, dtype=logprobs.dtype, device=logprobs.device)
    sums.index_add_(0, batch.token_candidate, logprobs)
    counts = torch.zeros_like(sums).index_add_(0, batch.token_candidate, torch.ones_like(logprobs))
    scores = torch.full((batch.num_examples, batch.max_candidates), float("-inf"), dtype=logprobs.dtype,
                        device=logprobs.device)
    scores[batch.candidate_example, batch.candidate_slot] = sums / counts
    return scores


def loss_from_logprobs(batch: EncodedBatch, logprobs: torch.Tensor) -> torch.Tensor:
    """Classification: cross-entropy over the candidates' mean answer log-probs (MeZO's
    train-as-classification). Generation: mean negative log-likelihood of the gold answer tokens."""
    scores = candidate_scores(batch, logprobs)
    if batch.generation or batch.max_candidates == 1:
        return -scores[:, 0].mean()
    return F.cross_entropy(scores, batch.labels)


def per_example_losses(batch: EncodedBatch, logprobs: torch.Tensor) -> torch.Tensor:
    scores = candidate_scores(batch, logprobs)
    if batch.generation or batch.max_candidates == 1:
        return -scores[:, 0]
    return F.cross_entropy(scores, batch.labels, reduction="none")


@torch.no_grad()
def batch_loss(model: nn.Module, batch: EncodedBatch, full_logits: bool = False) -> torch.Tensor:
    return loss_from_logprobs(batch, token_logprobs(model, batch, full_logits))
