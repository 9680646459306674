"""Choosing and measuring layers: which decoder layer to tune, and how strongly each one moves the loss.

- `choose_dominant_layer`: rule "guarded" (the default): the paper's (sun) rule's layer where its premise holds
  there, else the last layer (`guarded_choice`). Rules "sun" and "onset": the probe's layer (massive activations,
  dlzo.model.probe); when the probe finds none, the most perturbation-sensitive layer of a quick measurement
  (`QUICK_SENSITIVITY`). Rule "screen": a short paired training race of the rules' layers and the last layer
  (dlzo.engine.layer_screen) decides.
- `guarded_choice`: the guarded rule's record, shared by `dlzo train` and `dlzo.ZOTrainer`.
- `screen_choice`: that screen and its record, shared by `dlzo train` and `dlzo.ZOTrainer`.
- `layer_sensitivity`: per-layer |L(θ+εz_l) - L(θ-εz_l)| / 2ε, inference only.
- `propagation`: how far a one-layer perturbation travels through the later layers.
- `layer_parameters`: the named tensors of one decoder layer.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dlzo.choices import LayerRule, ProbeRule
from dlzo.data.examples import Example
from dlzo.engine.fastpath import BranchedForward
from dlzo.engine.layer_screen import SCREEN, ScreenTask, screen_layers
from dlzo.engine.prefix import FrozenPrefix
from dlzo.engine.scoring import (
    EncodedBatch,
    encode,
    fast_layout,
    hidden_states,
    per_example_losses,
    token_logprobs,
)
from dlzo.engine.zo import ZOOptimizer
from dlzo.model.loading import decoder_layers
from dlzo.model.probe import LayerStats, ProbeResult, find_dominant_layer

# The quick measurement behind --scope dominant's fallback (the demo shows the same one, so that its
# picture and the trained layer agree): 2 directions x the first 2 training batches of 16.
QUICK_SENSITIVITY = {"seeds": 2, "batches": 2, "batch_size": 16}



@dataclass
class LayerSensitivity:
    layer: int
    mean: float  # mean over seeds and batches of |L(θ+εz_l) - L(θ-εz_l)| / 2ε
    std: float
    values: list[float]


def layer_parameters(model: nn.Module, layer: int) -> list[tuple[str, nn.Parameter]]:
    block_params = {id(p) for p in decoder_layers(model)[layer].parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in block_params]


def leading_batches(model: nn.Module, tokenizer, examples: list, batch_size: int, count: int,
                    device: torch.device | None = None, skip: int = 0) -> list[EncodedBatch]:
    """`count` batches of `examples` after the first `skip` ones, encoded as the trainer's fast path does
    (fewer when the examples run out: a small file of your own may not fill two batches)."""
    device = device or next(model.parameters()).device
    layout = fast_layout(model, tokenizer)
    return [encode(tokenizer, examples[i * batch_size : (i + 1) * batch_size], layout=layout).to(device)
            for i in range(skip, skip + count) if i * batch_size < len(examples)]


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batches: list, eps: float = 1e-3, seeds: int = 3,
                      layers: list[int] | None = None, progress=None, first_seed: int = 0,
                      distribution: str = "gaussian", pair_loss: Callable | None = None) -> list[LayerSensitivity]:
    """Inference only: for each layer, perturb it alone along `seeds` directions (seeds first_seed, ...) on
    each batch. `pair_loss(runner, batch, plus, minus, cache)` gives (L+, L-) of one batch; by default dlzo's
    task loss of an EncodedBatch (`BranchedForward.loss_pair`); dlzo.training.hf_trainer passes the model's own loss."""
    pair_loss = pair_loss or (lambda runner, batch, plus, minus, cache:
                              runner.loss_pair(batch, plus, minus, prefix_cache=cache))
    chosen = range(len(decoder_layers(model))) if layers is None else layers
    results = []
    # the unperturbed layers below layer l give the same hidden states for every l, seed and branch:
    # computing them once per batch makes the measurement about a third cheaper on a 30-layer model
    prefix_caches = [{} for _ in batches]
    for layer in chosen:
        named = layer_parameters(model, layer)
        runner = BranchedForward(model, [n for n, _ in named])
        probe = ZOOptimizer(named, lr=0.0, eps=eps, seed=10_000 + layer, distribution=distribution)
        values = []
        for seed in range(first_seed, first_seed + seeds):
            plus, minus, _ = probe.perturbed(seed)
            for batch, cache in zip(batches, prefix_caches):
                loss_plus, loss_minus = pair_loss(runner, batch, plus, minus, cache)
                values.append(abs(float(loss_plus - loss_minus)) / (2 * eps))
        results.append(LayerSensitivity(layer, statistics.fmean(values),
                                        statistics.pstdev(values) if len(values) > 1 else 0.0, values))
        if progress is not None:
            progress.update(1)
    return results


@torch.no_grad()
def propagation(model: nn.Module, batch: EncodedBatch, eps: float = 1e-3, seed: int = 0,
                layers: list[int] | None = None) -> list[list[float]]:
    """matrix[l][j] = ||h_j(θ+εz_l) - h_j(θ)|| / ||h_j(θ)|| for the output h_j of every layer j
    (0 where j < l: a perturbation cannot reach earlier layers)."""
    blocks = decoder_layers(model)
    chosen = range(len(blocks)) if layers is None else layers
    mask = (batch.attention_mask if batch.attention_mask is not None else torch.ones_like(batch.input_ids)).bool()

    def outputs() -> list[torch.Tensor]:
        captured = []
        handles = [b.register_forward_hook(lambda _m, _i, o: captured.append((o[0] if isinstance(o, tuple) else o)[mask]))
                   for b in blocks]
        try:
            hidden_states(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    clean = outputs()
    matrix = []
    for layer in chosen:
        named = layer_parameters(model, layer)
        probe = ZOOptimizer(named, lr=0.0, eps=eps, seed=20_000 + layer, exact_restore=True)
        saved = [p.detach().clone() for _, p in named]
        probe.add_noise(seed, eps)
        try:
            perturbed = outputs()
        finally:
            for (_, p), original in zip(named, saved):
                p.data.copy_(original)
        matrix.append([float((a - b).norm() / b.norm().clamp_min(1e-12)) if j >= layer else 0.0
                       for j, (a, b) in enumerate(zip(perturbed, clean))])
    return matrix


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rho of two per-layer measurements (average ranks for ties): 1 when they order the
    layers the same way, about 0 when one says nothing about the other."""
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    norm = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / norm if norm else 0.0


def probed_layer(model: nn.Module, tokenizer, texts: list[str] | None = None,
                 rule: ProbeRule = "sun") -> tuple[int | None, str]:
    """(the probe's layer by `rule`, why) or (None, why not): the first step of choosing the dominant layer,
    shared by `dlzo train` and `dlzo.ZOTrainer`."""
    if tokenizer is None:
        return None, "no tokenizer for the probe"
    result = find_dominant_layer(model, tokenizer, texts, rule=rule)
    if result.dominant_layer is None:
        return None, f"probe found no massive activations (its closest layer was {result.closest_layer.index})"
    if rule == "sun":
        return result.dominant_layer, sun_reason(result.layers[result.dominant_layer])
    return result.dominant_layer, f"probe, {rule} rule: {result.reason}"


def sun_reason(stats: LayerStats) -> str:
    """Why the sun rule picked the layer of `stats`, in the wording of earlier runs' run.json (kept)."""
    return f"probe: first layer with massive activations (max|h| {stats.max_abs:.3g}, {stats.ratio:.3g}x the median)"


def most_sensitive_layer(model: nn.Module, batches: list, eps: float, distribution: str = "gaussian",
                         pair_loss: Callable | None = None,
                         seeds: int = QUICK_SENSITIVITY["seeds"]) -> tuple[int, list[float]]:
    """The dominant layer's fallback when the rule finds none, for `dlzo train` and `dlzo.ZOTrainer` alike:
    each decoder layer perturbed alone along `seeds` directions on `batches` (`layer_sensitivity`); returns
    (the layer with the largest mean |L+ - L-|/2ε, each layer's mean). A non-finite value (half precision can
    overflow) says nothing about the layer and is left out of its mean."""
    measured = layer_sensitivity(model, batches, eps=eps, seeds=seeds, distribution=distribution, pair_loss=pair_loss)
    means = []
    for layer in measured:
        finite = [v for v in layer.values if math.isfinite(v)]
        means.append(statistics.fmean(finite) if finite else 0.0)
    return max(range(len(means)), key=means.__getitem__), means


def choose_dominant_layer(model: nn.Module, tokenizer, train: list[Example], eps: float,
                          device: torch.device | None = None, rule: LayerRule = "guarded", dev: list[Example] | None = None,
                          lr: float = 1e-3, seed: int = 0, distribution: str = "gaussian", generation: bool = False,
                          max_length: int = 2048) -> dict:
    """{"layer": K, "reason": why, ...}: rule "guarded", `guarded_choice` on the probe of the first training texts;
    the probe's layer by `rule` (sun or onset, dlzo.model.probe), when the rule finds none the most
    perturbation-sensitive layer of a quick measurement. Rule "screen": the
    screen of the rules' layers and the last layer (`screen_choice`), trained on `train`'s first batches at
    `lr` x SCREEN's factors and compared on `dev`'s first examples (held-out training examples without it)."""
    texts = [e.prompt + e.continuations[e.label] for e in train[:64]]
    if rule == "guarded":
        return guarded_choice(find_dominant_layer(model, tokenizer, texts, rule="sun"))
    if rule == "screen":
        probe = screen_probe(model, tokenizer, texts)
        task = example_screen_task(model, tokenizer, train, dev, device, generation, max_length)
        return screen_choice(model, probe, task, lr=lr, eps=eps, seed=seed, distribution=distribution)
    layer, why = probed_layer(model, tokenizer, texts, rule)
    if layer is not None:
        doubt = early_layer_doubt(layer, len(decoder_layers(model)))
        return {"layer": layer, "reason": why, **({"doubts": [doubt]} if doubt else {})}
    batches = leading_batches(model, tokenizer, train, QUICK_SENSITIVITY["batch_size"], QUICK_SENSITIVITY["batches"],
                              device)
    layer, means = most_sensitive_layer(model, batches, eps)
    return {"layer": layer, "reason": (
        "probe found no massive activations; fell back to the most perturbation-sensitive layer "
        f"(mean |L+ - L-|/2eps = {means[layer]:.3g}, layers: " + ", ".join(f"{i}:{m:.3g}" for i, m in enumerate(means))
        + ")"), "doubts": ["the sensitivity fallback's pick is not reproducible (docs/results/study.md, section 2); "
                           "--rule screen compares candidate layers by training them"]}


# Why the guarded rule's fallback is the last layer (docs/results/study.md): wherever the premise failed, the last
# layer beat (Qwen2.5-Coder-0.5B SST-2 and RTE, a third family's SST-2) or tied (Qwen2.5 CB, COPA) the rule's layer,
# and it is the cheapest layer to tune (the frozen-prefix cache skips every layer below it).
LAST_LAYER_WHY = ("the last layer beat or tied the rule's layer on every model where the premise failed "
                  "(docs/results/study.md)")


def guarded_choice(probe: ProbeResult) -> dict:
    """The guarded rule: the sun rule's layer when the paper's premise holds there (`probe.premise`,
    dlzo.model.premise.premise_decision), else the last layer. Costs nothing beyond the probe; the same
    calibration texts give the same pick. The record says whether the pick agrees with the paper's rule."""
    last = len(probe.layers) - 1
    paper, premise = probe.picks.get("sun"), probe.premise
    record = {"rule": "guarded", "rule_layers": dict(probe.picks), "paper_rule_layer": paper, "premise": premise}
    if paper is not None and premise.get("holds"):
        return {"layer": paper, "reason": f"{sun_reason(probe.layers[paper])}; the paper's premise holds there: {premise['reason']}",
                **record, "agrees_with_paper_rule": True, "doubts": []}
    if paper is None:
        why = f"the paper's rule (sun) finds no massive activations ({probe.reason})"
    else:
        why = f"the paper's rule (sun) picks layer {paper}, but its premise fails there: {premise['reason']}"
    agrees = paper == last
    verdict = "" if agrees or paper is None else "; THE CHOICE DISAGREES WITH THE PAPER'S RULE"
    return {"layer": last, "reason": f"{why}; tuning the last layer {last} ({LAST_LAYER_WHY}){verdict}",
            **record, "agrees_with_paper_rule": agrees,
            "doubts": [] if agrees or paper is None else [
                f"the paper's rule picks layer {paper} and the guarded rule layer {last}; --rule sun tunes the "
                f"paper's layer, --rule screen compares them by training both"]}


def probe_choice(model: nn.Module, tokenizer, rule: LayerRule) -> dict:
    """The layer-choice record from the probe of its default calibration text alone (`dlzo.ZOTrainer`): rule
    guarded, `guarded_choice` (always a layer); sun or onset, the rule's layer with `early_layer_doubt`, or
    {"layer": None, "reason": why not} for the caller's sensitivity fallback."""
    if rule == "guarded" and tokenizer is not None:
        return guarded_choice(screen_probe(model, tokenizer))
    layer, why = probed_layer(model, tokenizer, rule="sun" if rule == "guarded" else rule)
    doubt = early_layer_doubt(layer, len(decoder_layers(model))) if layer is not None else None
    return {"layer": layer, "reason": why, "doubts": [doubt] if doubt else []}


def early_layer_doubt(layer: int, num_layers: int) -> str | None:
    """Why a rule's layer in the first quarter of the model is doubtful, or None. Measured (docs/results/study.md):
    SmolLM2-135M's rule layer (11 of 30) beats the last layer; Qwen2.5-Coder-0.5B's (3 of 24) and a third family's
    (0) train worse than the last layer."""
    if layer >= num_layers / 4:
        return None
    return (f"the rule's layer {layer} is in the first quarter of the model's {num_layers} layers, where on "
            f"Qwen2.5-Coder-0.5B (layer 3 of 24) and a third family (layer 0) the rule's layer trained worse than the "
            f"last layer; --rule screen compares it with the last layer by training both")


def screen_probe(model: nn.Module, tokenizer, texts: list[str] | None = None) -> ProbeResult:
    """The probe whose picks (both rules') name the screen's candidates."""
    return find_dominant_layer(model, tokenizer, texts, rule="sun")


def screen_candidates(probe: ProbeResult) -> tuple[list[int], int | None]:
    """(the layers the screen compares, the one it prefers): the paper's rule's layer (sun), the onset rule's,
    and the last layer; with no rule's layer, the middle and the last. The paper's rule's layer is preferred
    (else the onset rule's): it keeps the choice unless another candidate clearly beats it (`layer_screen.pick`)."""
    last = len(probe.layers) - 1
    ruled = [probe.picks.get(name) for name in ("sun", "onset")]
    ruled = [layer for layer in ruled if layer is not None]
    candidates = list(dict.fromkeys(ruled + [last])) if ruled else list(dict.fromkeys([last // 2, last]))
    return candidates, (ruled[0] if ruled else None)


def screen_choice(model: nn.Module, probe: ProbeResult, task: ScreenTask, lr: float, eps: float, seed: int,
                  distribution: str = "gaussian", setting: dict | None = None) -> dict:
    """Run the layer screen (dlzo.engine.layer_screen) on the probe's candidates and return the layer-choice
    record: the pick, why in words, the paper's rule's layer and whether the two agree, the screen's table."""
    setting = {**SCREEN, **(setting or {})}
    candidates, preferred = screen_candidates(probe)
    paper = probe.picks.get("sun")
    record = {"rule": "screen", "rule_layers": dict(probe.picks), "paper_rule_layer": paper}
    if len(candidates) == 1:  # the rules' layer is the last layer: nothing to compare
        return {"layer": candidates[0], "reason": f"screen: the rules' layer {candidates[0]} is the last layer, "
                "the only candidate", **record, "agrees_with_paper_rule": paper == candidates[0], "doubts": []}
    rates = [lr * factor for factor in setting["rate_factors"]]
    result = screen_layers(task, candidates, rates, setting["steps"], eps, seed, distribution, preferred,
                           setting["z"])
    agrees = paper == result.layer
    if paper is None:
        verdict = "the paper's rule (sun) finds no layer"
    elif agrees:
        verdict = f"the paper's rule (sun) picks the same layer {paper}"
    else:
        verdict = f"the paper's rule (sun) picks layer {paper}: THE SCREEN DISAGREES WITH THE PAPER'S RULE"
    reason = f"{result.summary()}; picked layer {result.layer} (lr {result.lr:.3g} in the screen); {verdict}"
    return {"layer": result.layer, "reason": reason, **record, "agrees_with_paper_rule": agrees,
            "doubts": result.doubts(), "screen": result.to_json()}


def example_screen_task(model: nn.Module, tokenizer, train: list[Example], dev: list[Example] | None,
                        device: torch.device | None = None, generation: bool = False, max_length: int = 2048,
                        setting: dict | None = None) -> ScreenTask:
    """The screen's batches from a run's examples: the first `steps` training batches of
    QUICK_SENSITIVITY's batch size (cycled when the examples run out), and the first `dev_examples` of `dev`
    (else the training examples after those batches) in batches of 32, each candidate's frozen layers cached."""
    setting = {**SCREEN, **(setting or {})}
    device = device or next(model.parameters()).device
    layout, size = fast_layout(model, tokenizer), QUICK_SENSITIVITY["batch_size"]
    used = min(len(train), setting["steps"] * size)
    held = dev if dev else train[used:]
    held = (held or train)[: setting["dev_examples"]]

    def batches(examples: list[Example], batch_size: int) -> list[EncodedBatch]:
        return [encode(tokenizer, examples[i : i + batch_size], max_length=max_length, generation=generation,
                       layout=layout).to(device) for i in range(0, len(examples), batch_size)]

    train_batches, dev_batches = batches(train[:used], size), batches(held, 32)

    def runner(layer: int) -> BranchedForward:
        names = [n for n, _ in layer_parameters(model, layer)]
        return BranchedForward(model, names, FrozenPrefix(model, layer, 2**30) if layer >= 1 else None)

    def dev_loss(branched: BranchedForward) -> list[float]:
        losses = []
        for batch in dev_batches:
            with branched.frozen.applied(batch) if branched.frozen is not None else contextlib.nullcontext():
                losses += per_example_losses(batch, token_logprobs(model, batch)).tolist()
        return losses

    return ScreenTask(runner=runner, dev_loss=dev_loss, parameters=lambda layer: layer_parameters(model, layer),
                      pair_loss=lambda branched, step, plus, minus: branched.loss_pair(
                          train_batches[step % len(train_batches)], plus, minus))


def model_loss_screen_task(model: nn.Module, train: list, held: list) -> ScreenTask:
    """The screen's task for batches of model keyword arguments with `labels` (dlzo.ZOTrainer): the model's own
    loss on the `train` batches (step t reads batch t mod len), and one dev loss per `held` batch (the screen
    pairs batches where dlzo's trainer pairs examples). Every forward runs the whole model: no frozen prefix."""

    def runner(layer: int) -> BranchedForward:
        return BranchedForward(model, [n for n, _ in layer_parameters(model, layer)])

    def dev_loss(branched: BranchedForward) -> list[float]:
        current = dict(layer_parameters(model, next(iter(branched.local_names))))
        return [float(branched.pair_model_loss(b, current, current)[0]) for b in held]

    return ScreenTask(runner=runner, dev_loss=dev_loss, parameters=lambda layer: layer_parameters(model, layer),
                      pair_loss=lambda branched, step, plus, minus: branched.pair_model_loss(
                          train[step % len(train)], plus, minus))
