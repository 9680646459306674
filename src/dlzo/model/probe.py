"""Find the dominant layer by inference only, from the per-layer max |h| of the residual stream.

Two rules (docs/rules.md):

* ``sun`` (default; Sun et al. 2024): the first decoder layer whose output has max|h| > 100 and
  max|h| / median|h| >= 1000. Absolute thresholds.
* ``onset``: scale-free; the layer where the massive-activation regime begins, judged from the shape
  of the max|h| curve (the largest persistent jump that lands in the top regime). See `onset_decision`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import get_args

import torch
from torch import nn

from dlzo.choices import ProbeRule  # noqa: F401 (re-exported)
from dlzo.errors import DlzoError
from dlzo.model.loading import backbone_and_head, decoder_layers
from dlzo.model.premise import premise_decision

# Ordinary English prose written for this project, used when the user gives no calibration text.
DEFAULT_CALIBRATION_TEXT = """\
The river ran low that summer, and the old bridge at the edge of town showed stones that nobody had seen \
in years. Children walked along the dry bank after school, turning over rocks to look for crayfish, while \
their parents talked about the weather and the price of bread. At the library, the librarian kept a \
notebook of every book that came back late, not to punish anyone, she said, but because she liked to know \
which stories people could not put down. In the evening the baker closed his shop, counted the coins in \
the drawer, and walked home by the long road, past the school, the church, and the field where the \
horses stood quietly in the last of the light. The town council met on Tuesday to discuss a new roof for \
the market hall. Some members wanted to repair the old one; others argued that a modern roof would last \
longer and cost less over twenty years. After two hours of debate they agreed to ask an engineer for a \
report and to decide in the autumn. Meanwhile, the farmers brought their vegetables to the square every \
Saturday morning, and the square was loud with people buying tomatoes, beans, apples, honey and cheese. \
A scientist who studies rivers once explained that a dry summer is not unusual: the water returns with \
the autumn rain, the fish swim back upstream, and the stones disappear again under the moving surface."""


TOP_K = 5



RULES = get_args(ProbeRule)


SUN_DEFINITION = ("first decoder layer (0-based) whose output has max|h| > abs_threshold "
                  "and max|h| / median|h| >= rel_threshold")


ONSET_DEFINITION = (
    "m_l = max|h| of decoder layer l's output, m_-1 = the embedding output's; the final layer is excluded "
    "(its output is often renormalised). Candidates: layers l <= L-2 with a predecessor (l >= 1, or l = 0 "
    "when the embedding is measured). jump(l) = m_l / m_(l-1). l persists when the window "
    "l..min(l+persistence-1, L-2) has at least min(persistence, 2) layers and min(m over the window) >= "
    "hold * m_l. l lands in the top regime unless a later persistent candidate k makes a jump >= min_jump "
    "of its own and reaches m_k >= min_jump * m_l (a gradual climb after l does not supersede it). "
    "The onset is the persistent, landing candidate with the largest jump (ties: the earliest), "
    "provided that jump >= min_jump; else none."
)


_LOG2_LOW, _LOG2_HIGH, _BINS = -40.0, 40.0, 16384  # bin width 0.0049 in log2: medians within 0.35%


@dataclass
class TopActivation:
    value: float
    sequence: int
    position: int
    channel: int
    token: str = ""


@dataclass
class LayerStats:
    index: int  # -1 for the embedding output, else the 0-based decoder layer
    max_abs: float
    median_abs: float
    ratio: float
    top: list[TopActivation] = field(default_factory=list)
    passes: bool = False
    near: bool = False
    # how many calibration sequences carry the massive activation here: their own max|h| passes the sun thresholds
    # (against this layer's median over all tokens); Sun et al.'s outliers sit on the first token of every sequence
    carriers: int = 0


@dataclass
class ProbeResult:
    dominant_layer: int | None
    rule: dict  # "name" ("sun" or "onset"), its parameters, "definition"; always the sun thresholds too
    model: str
    dtype: str
    num_tokens: int
    layers: list[LayerStats]
    embedding: LayerStats | None = None
    reason: str = ""  # why the chosen rule picked dominant_layer (or nothing)
    picks: dict = field(default_factory=dict)  # what every rule picks on this curve, e.g. {"sun": 11, "onset": 11}
    num_sequences: int = 0  # the calibration sequences (each LayerStats.carriers counts among them)
    premise: dict = field(default_factory=dict)  # dlzo.model.premise at the sun rule's layer: does its premise hold

    @property
    def closest_layer(self) -> LayerStats:
        return max(self.layers, key=lambda s: min(s.max_abs / self.rule["abs_threshold"], s.ratio / self.rule["rel_threshold"]))

    def to_json(self) -> dict:
        data = asdict(self)
        data["closest_layer"] = self.closest_layer.index
        return data


class _StreamingStats:
    """max |h|, a log-histogram for the median, and the top-k entries of one layer, updated per forward."""

    def __init__(self, device: torch.device):
        self.max_abs = 0.0
        self.histogram = torch.zeros(_BINS, dtype=torch.float64, device=device)
        self.top: list[tuple[float, int, int, int]] = []
        self.sequence_max: list[float] = []  # max |h| of each forward (one calibration sequence each)

    def update(self, hidden: torch.Tensor, sequence: int) -> None:
        flat = hidden.detach().float().abs().reshape(-1, hidden.shape[-1])  # (tokens, channels)
        self.sequence_max.append(float(flat.max()))
        self.max_abs = max(self.max_abs, self.sequence_max[-1])
        logs = torch.log2(flat.clamp_min(2.0**_LOG2_LOW)).flatten()
        self.histogram += torch.histc(logs, bins=_BINS, min=_LOG2_LOW, max=_LOG2_HIGH).double()
        values, indices = flat.flatten().topk(min(TOP_K, flat.numel()))
        channels = hidden.shape[-1]
        for value, index in zip(values.tolist(), indices.tolist()):
            self.top.append((value, sequence, index // channels, index % channels))
        self.top = sorted(self.top, reverse=True)[:TOP_K]

    def median(self) -> float:
        cumulative = torch.cumsum(self.histogram, 0)
        half = float(cumulative[-1]) / 2.0
        index = int(torch.searchsorted(cumulative, torch.tensor(half, dtype=torch.float64, device=cumulative.device)))
        below = float(cumulative[index - 1]) if index > 0 else 0.0
        inside = float(self.histogram[index])
        fraction = (half - below) / inside if inside > 0 else 0.5
        width = (_LOG2_HIGH - _LOG2_LOW) / _BINS
        return 2.0 ** (_LOG2_LOW + (index + fraction) * width)


def _first_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def calibration_sequences(
    tokenizer, texts: list[str], max_tokens: int, max_length: int = 2048
) -> list[torch.Tensor]:
    """Tokenize each text into sequences of at most max_length tokens, BOS first (outliers sit on the
    first token), stopping at max_tokens in total."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sequences, total = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        step = max_length - len(bos)
        for start in range(0, len(ids), step):
            chunk = (bos + ids[start : start + step])[: max_tokens - total]
            if len(chunk) > 1:
                sequences.append(torch.tensor(chunk))
                total += len(chunk)
            if total >= max_tokens:
                return sequences
    return sequences


@torch.no_grad()
def measure_layers(
    model: nn.Module, sequences: list[torch.Tensor]
) -> tuple[list[_StreamingStats], _StreamingStats]:
    """Run the sequences one at a time and collect streaming statistics of every block's output."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    stats = [_StreamingStats(device) for _ in layers]
    embedding_stats = _StreamingStats(device)
    current = {"sequence": 0}
    handles = [
        layer.register_forward_hook(
            lambda _m, _i, out, s=s: s.update(_first_tensor(out), current["sequence"])
        )
        for layer, s in zip(layers, stats)
    ]
    handles.append(
        model.get_input_embeddings().register_forward_hook(
            lambda _m, _i, out: embedding_stats.update(_first_tensor(out), current["sequence"])
        )
    )
    try:
        body, _ = backbone_and_head(model)  # the hidden states are all the probe reads: no logits over the vocabulary
    except DlzoError:
        body = model
    try:
        for number, ids in enumerate(sequences):
            current["sequence"] = number
            body(input_ids=ids[None].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats, embedding_stats


def _layer_stats(index: int, raw: _StreamingStats, tokenizer, sequences, abs_threshold, rel_threshold) -> LayerStats:
    median = raw.median()
    ratio = raw.max_abs / median if median > 0 else math.inf
    top = [
        TopActivation(value, seq, pos, channel, tokenizer.decode([int(sequences[seq][pos])]) if tokenizer else "")
        for value, seq, pos, channel in raw.top
    ]
    passes = raw.max_abs > abs_threshold and ratio >= rel_threshold
    carriers = sum(m > abs_threshold and m >= rel_threshold * median for m in raw.sequence_max)
    # "near": within 10x of both thresholds, e.g. a plateau of 800x the median where the rule asks 1000x.
    near = not passes and raw.max_abs > abs_threshold / 10 and ratio >= rel_threshold / 10
    return LayerStats(index, raw.max_abs, median, ratio, top, passes, near, carriers)


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _times(ratio: float) -> str:
    return f"{_num(ratio)}x"


def sun_decision(
    layers: list[LayerStats], abs_threshold: float = 100.0, rel_threshold: float = 1000.0
) -> tuple[int | None, str]:
    """The sun rule on measured statistics: (first layer with max|h| > abs_threshold and
    max|h| / median|h| >= rel_threshold, or None; the reason in words)."""
    for s in layers:
        if s.max_abs > abs_threshold and s.ratio >= rel_threshold:
            return s.index, (f"first layer with max|h| {_num(s.max_abs)} > {abs_threshold:g} and "
                             f"max/median {_num(s.ratio)} >= {rel_threshold:g}")
    if not layers:
        return None, "no layers"
    closest = max(layers, key=lambda s: min(s.max_abs / abs_threshold, s.ratio / rel_threshold))
    return None, (f"no layer has max|h| > {abs_threshold:g} and max/median >= {rel_threshold:g}; closest is "
                  f"layer {closest.index} (max|h| {_num(closest.max_abs)}, max/median {_num(closest.ratio)})")


def onset_decision(
    layers: list[LayerStats],
    embedding: LayerStats | None = None,
    min_jump: float = 4.0,
    persistence: int = 3,
    hold: float = 0.5,
) -> tuple[int | None, str]:
    """The onset rule: the layer where the massive-activation regime begins, from the shape of the
    max|h| curve only (scale-free: multiplying every max|h| by a constant changes nothing).

    With m_l = layers[l].max_abs, L = len(layers) and m_-1 = embedding.max_abs:

    * the final layer L-1 is never a candidate and never counts in a window (its output is often
      renormalised: SmolLM2-135M falls from 24,538 to 4,427 over its last two layers);
    * candidates are l = 1..L-2, plus l = 0 when `embedding` is given; jump(l) = m_l / m_(l-1)
      (a predecessor of 0 or a non-finite value disqualifies);
    * persistent: the window l..min(l+persistence-1, L-2) has at least min(persistence, 2) layers (so a
      one-layer spike can never pass when persistence >= 2) and min(m over the window) >= hold * m_l;
    * lands in the top regime: no later persistent candidate k > l makes a jump >= min_jump of its own
      and reaches m_k >= min_jump * m_l (then the regime begins at k: layer 0 of SmolLM2 or Qwen2.5). A
      gradual climb after l does not supersede it (127x at layer 0, then 35x more over 14 layers: 0);
    * the onset is the persistent, landing candidate with the largest jump, the earliest on ties; if
      that jump is below min_jump, there is none.

    Returns (layer index or None, the reason in words)."""
    if min_jump < 1 or persistence < 1 or not 0 < hold <= 1:
        raise DlzoError(f"onset rule: need min_jump >= 1, persistence >= 1, 0 < hold <= 1 "
                        f"(got {min_jump:g}, {persistence}, {hold:g})")
    values = [s.max_abs for s in layers]
    body = len(values) - 1  # positions 0..body-1 exclude the final layer
    need = min(persistence, 2)
    # (position, jump, window, held) of every candidate with a finite, positive predecessor
    candidates: list[tuple[int, float, list[float], bool]] = []
    for position in range(0 if embedding is not None else 1, body):
        before = embedding.max_abs if position == 0 else values[position - 1]
        current = values[position]
        if not (math.isfinite(before) and math.isfinite(current)) or before <= 0:
            continue
        window = values[position : min(position + persistence, body)]
        held = len(window) >= need and min(window) >= hold * current
        candidates.append((position, current / before, window, held))
    # the onsets that can supersede an earlier candidate: persistent jumps of at least min_jump
    risers = [(position, jump) for position, jump, _, held in candidates if held and jump >= min_jump]
    best: tuple[float, int, float, int] | None = None  # (jump, position, held minimum, window length)
    biggest: tuple[float, int, str] | None = None  # the largest raw jump among the candidates, and its fate
    for position, jump, window, held in candidates:
        above = [(k, j) for k, j in risers if k > position and values[k] >= min_jump * values[position]]
        if len(window) < need:
            fate = f"fewer than {need} non-final layers from it on"
        elif not held:
            fate = f"not held (falls to {_num(min(window))} within {len(window)} layers)"
        elif above:
            fate = (f"the regime begins later, at a further persistent {_times(above[0][1])} jump at layer "
                    f"{layers[above[0][0]].index} (to {_num(values[above[0][0]])})")
        else:
            fate = ""
            if best is None or jump > best[0] * (1 + 1e-12):
                best = (jump, position, min(window), len(window))
        if biggest is None or jump > biggest[0] * (1 + 1e-12):
            biggest = (jump, position, fate)

    def name(position: int) -> str:
        return f"{_num(embedding.max_abs)} (embedding)" if position == 0 else _num(values[position - 1])

    rejected = ""
    if biggest is not None and biggest[2] and (best is None or biggest[0] > best[0]):
        rejected = (f"; the largest raw jump, {_times(biggest[0])} at layer {layers[biggest[1]].index}, "
                    f"is rejected: {biggest[2]}")
    if len(values) >= 2 and values[-2] > 0 and values[-1] / values[-2] >= min_jump and \
            (best is None or values[-1] / values[-2] > best[0]):
        rejected += f"; the final layer's {_times(values[-1] / values[-2])} jump is never a candidate"
    if best is None:
        return None, f"no candidate layer persists and lands in the top regime{rejected}"
    jump, position, held, length = best
    if jump < min_jump:
        return None, (f"the largest persistent jump is {_times(jump)} at layer {layers[position].index}, "
                      f"below min_jump {min_jump:g}x{rejected}")
    return layers[position].index, (
        f"largest persistent jump: max|h| {name(position)} -> {_num(values[position])} ({_times(jump)}) at layer "
        f"{layers[position].index}, held for {length} layers (min {_num(held)} >= {hold:g}x){rejected}")


def find_dominant_layer(
    model: nn.Module,
    tokenizer,
    texts: list[str] | None = None,
    max_tokens: int = 512,
    abs_threshold: float = 100.0,
    rel_threshold: float = 1000.0,
    rule: ProbeRule = "sun",
    min_jump: float = 4.0,
    persistence: int = 3,
    hold: float = 0.5,
) -> ProbeResult:
    """Probe the model and return the layer the chosen rule picks (or None): "sun", the first layer
    whose output has massive activations by absolute thresholds, or "onset", where the max|h| curve
    makes its largest persistent jump (see `onset_decision`)."""
    if rule not in RULES:
        raise DlzoError(f"unknown probe rule {rule!r}; choose one of {', '.join(RULES)}")
    max_length = getattr(model.config, "max_position_embeddings", None) or 2048
    sequences = calibration_sequences(tokenizer, texts or [DEFAULT_CALIBRATION_TEXT], max_tokens, max_length)
    if not sequences:
        raise DlzoError("the calibration text is empty after tokenization")
    raw_layers, raw_embedding = measure_layers(model, sequences)
    args = (tokenizer, sequences, abs_threshold, rel_threshold)
    layers = [_layer_stats(i, raw, *args) for i, raw in enumerate(raw_layers)]
    embedding = _layer_stats(-1, raw_embedding, *args)
    decisions = {
        "sun": sun_decision(layers, abs_threshold, rel_threshold),
        "onset": onset_decision(layers, embedding, min_jump, persistence, hold),
    }
    spec = {"name": rule, "abs_threshold": abs_threshold, "rel_threshold": rel_threshold}
    if rule == "onset":
        spec.update(min_jump=min_jump, persistence=persistence, hold=hold, definition=ONSET_DEFINITION)
    else:
        spec["definition"] = SUN_DEFINITION
    dominant, reason = decisions[rule]
    dtype = next(model.parameters()).dtype
    return ProbeResult(
        dominant_layer=dominant,
        rule=spec,
        model=getattr(model, "dlzo_source", type(model).__name__),
        dtype=str(dtype).replace("torch.", ""),
        num_tokens=sum(len(s) for s in sequences),
        layers=layers,
        embedding=embedding,
        reason=reason,
        picks={name: layer for name, (layer, _) in decisions.items()},
        num_sequences=len(sequences),
        premise=premise_decision(layers, decisions["sun"][0], len(sequences)),
    )


def format_table(result: ProbeResult) -> str:
    """A terminal table of the per-layer statistics (with each row's max|h| jump over the previous
    row, which the onset rule reads) and the verdict."""
    lines = [f"{'layer':>5}  {'max|h|':>10}  {'median|h|':>10}  {'ratio':>9}  {'jump':>8}  "
             "top activation (token @pos, channel)"]
    rows = ([result.embedding] if result.embedding else []) + result.layers
    onset = result.picks.get("onset")
    previous = None
    for s in rows:
        if s.index == result.dominant_layer:
            mark = "  <= dominant"
        elif s.index == onset:
            mark = "  <= onset"
        else:
            mark = "  (near)" if s.near else ""
        top = s.top[0] if s.top else None
        where = f"{top.token!r} @{top.position}, ch {top.channel}" if top else ""
        name = "emb" if s.index < 0 else str(s.index)
        jump = f"{s.max_abs / previous:7.3g}x" if previous else ""
        previous = s.max_abs
        lines.append(f"{name:>5}  {s.max_abs:10.3g}  {s.median_abs:10.3g}  {s.ratio:9.3g}  {jump:>8}  {where}{mark}")
    rule = result.rule
    if rule.get("name") == "onset":
        verdict = "no massive-activation onset found" if result.dominant_layer is None else \
            f"dominant layer: {result.dominant_layer}"
        lines.append(f"{verdict} (onset rule, min_jump {rule['min_jump']:g}x, persistence {rule['persistence']}, "
                     f"hold {rule['hold']:g}): {result.reason}")
        sun = result.picks.get("sun")
        lines.append(f"the sun rule (max|h| > {rule['abs_threshold']:g} and ratio >= {rule['rel_threshold']:g}) "
                     f"would pick {'no layer' if sun is None else f'layer {sun}'}")
    elif result.dominant_layer is None:
        closest = result.closest_layer
        lines.append(
            f"no massive activations found (rule: max|h| > {rule['abs_threshold']:g} and ratio >= "
            f"{rule['rel_threshold']:g}); closest is layer {closest.index} with max|h| {closest.max_abs:.3g}, "
            f"ratio {closest.ratio:.3g}"
        )
    else:
        s = result.layers[result.dominant_layer]
        lines.append(
            f"dominant layer: {result.dominant_layer} (first layer with max|h| {s.max_abs:.3g} > "
            f"{rule['abs_threshold']:g} and ratio {s.ratio:.3g} >= {rule['rel_threshold']:g})"
        )
    if rule.get("name", "sun") == "sun" and "onset" in result.picks:
        lines.append(f"the onset rule (largest persistent jump of max|h|) would pick "
                     f"{'no layer' if onset is None else f'layer {onset}'}")
    premise = result.premise
    if premise.get("layer") is not None:
        lines.append(f"the paper's premise at layer {premise['layer']} {'holds' if premise['holds'] else 'FAILS'}: "
                     f"{premise['reason']}" + ("" if premise["holds"] else
                                               "; --rule guarded (the default of dlzo train) tunes the last layer"))
    near = [s.index for s in result.layers if s.near]
    if near:
        lines.append(f"near the thresholds but not passing: layers {near}")
    lines.append(f"{result.num_tokens} calibration tokens, {result.dtype}, model {result.model}")
    return "\n".join(lines)

