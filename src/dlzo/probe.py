"""Find the dominant layer by inference only: the first decoder layer whose residual-stream output
carries massive activations (Sun et al. 2024: max |h| > 100 and about 1000x the median)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dlzo.errors import DlzoError
from dlzo.models import decoder_layers

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


@dataclass
class ProbeResult:
    dominant_layer: int | None
    rule: dict
    model: str
    dtype: str
    num_tokens: int
    layers: list[LayerStats]
    embedding: LayerStats | None = None

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

    def update(self, hidden: torch.Tensor, sequence: int) -> None:
        flat = hidden.detach().float().abs().reshape(-1, hidden.shape[-1])  # (tokens, channels)
        self.max_abs = max(self.max_abs, float(flat.max()))
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
        for number, ids in enumerate(sequences):
            current["sequence"] = number
            model(input_ids=ids[None].to(device), use_cache=False)
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
    # "near": within 10x of both thresholds, e.g. a plateau of 800x the median where the rule asks 1000x.
    near = not passes and raw.max_abs > abs_threshold / 10 and ratio >= rel_threshold / 10
    return LayerStats(index, raw.max_abs, median, ratio, top, passes, near)


def find_dominant_layer(
    model: nn.Module,
    tokenizer,
    texts: list[str] | None = None,
    max_tokens: int = 512,
    abs_threshold: float = 100.0,
    rel_threshold: float = 1000.0,
) -> ProbeResult:
    """Probe the model and return the first layer whose output has massive activations (or None)."""
    max_length = getattr(model.config, "max_position_embeddings", None) or 2048
    sequences = calibration_sequences(tokenizer, texts or [DEFAULT_CALIBRATION_TEXT], max_tokens, max_length)
    if not sequences:
        raise DlzoError("the calibration text is empty after tokenization")
    raw_layers, raw_embedding = measure_layers(model, sequences)
    args = (tokenizer, sequences, abs_threshold, rel_threshold)
    layers = [_layer_stats(i, raw, *args) for i, raw in enumerate(raw_layers)]
    dominant = next((s.index for s in layers if s.passes), None)
    dtype = next(model.parameters()).dtype
    return ProbeResult(
        dominant_layer=dominant,
        rule={"abs_threshold": abs_threshold, "rel_threshold": rel_threshold,
              "definition": "first decoder layer (0-based) whose output has max|h| > abs_threshold "
                            "and max|h| / median|h| >= rel_threshold"},
        model=getattr(model, "dlzo_source", type(model).__name__),
        dtype=str(dtype).replace("torch.", ""),
        num_tokens=sum(len(s) for s in sequences),
        layers=layers,
        embedding=_layer_stats(-1, raw_embedding, *args),
    )


def format_table(result: ProbeResult) -> str:
    """A terminal table of the per-layer statistics and the verdict."""
    lines = [f"{'layer':>5}  {'max|h|':>10}  {'median|h|':>10}  {'ratio':>9}  top activation (token @pos, channel)"]
    rows = ([result.embedding] if result.embedding else []) + result.layers
    for s in rows:
        mark = "  <= dominant" if s.index == result.dominant_layer else ("  (near)" if s.near else "")
        top = s.top[0] if s.top else None
        where = f"{top.token!r} @{top.position}, ch {top.channel}" if top else ""
        name = "emb" if s.index < 0 else str(s.index)
        lines.append(f"{name:>5}  {s.max_abs:10.3g}  {s.median_abs:10.3g}  {s.ratio:9.3g}  {where}{mark}")
    rule = result.rule
    if result.dominant_layer is None:
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
    near = [s.index for s in result.layers if s.near]
    if near:
        lines.append(f"near the thresholds but not passing: layers {near}")
    lines.append(f"{result.num_tokens} calibration tokens, {result.dtype}, model {result.model}")
    return "\n".join(lines)


def save_outputs(result: ProbeResult, folder: str | Path) -> None:
    """Write FOLDER/probe.json and FOLDER/probe.png."""
    from dlzo.checkpoint import atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "probe.json", result.to_json())
    plot(result, folder / "probe.png")


def plot(result: ProbeResult, path: str | Path) -> None:
    """Log-scale max and median |h| per layer, with the thresholds and the chosen layer marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    indices = [s.index for s in result.layers]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.semilogy(indices, [s.max_abs for s in result.layers], "o-", label="max |h|")
    ax.semilogy(indices, [s.median_abs for s in result.layers], "s-", label="median |h|")
    ax.semilogy(indices, [s.median_abs * result.rule["rel_threshold"] for s in result.layers], ":",
                color="gray", label=f"median x {result.rule['rel_threshold']:g} (ratio threshold)")
    ax.axhline(result.rule["abs_threshold"], color="red", ls="--", label=f"abs threshold {result.rule['abs_threshold']:g}")
    if result.dominant_layer is not None:
        ax.axvline(result.dominant_layer, color="green", lw=2, alpha=0.6, label=f"dominant layer {result.dominant_layer}")
    ax.set_xlabel("decoder layer (0-based), output of the block")
    ax.set_ylabel("|activation|")
    verdict = "no massive activations" if result.dominant_layer is None else f"dominant layer {result.dominant_layer}"
    ax.set_title(f"Residual-stream magnitudes: {Path(str(result.model)).name} ({verdict})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


