"""The guarded layer rule, the default of --scope dominant (issue 35): the paper's (sun) rule's layer where the
paper's premise holds there (most calibration sequences carry the massive activation, and it has stopped growing),
else the last layer. Planted outliers give the ground truth; the carrier count is checked against a brute-force
count over each sequence's hidden states."""

import json

import pytest
import torch
from test_probe import SMOLLM2_CURVE, climbing_curve

from conftest import small_run, tiny_model
from dlzo.engine.layer_choice import choose_dominant_layer, guarded_choice
from dlzo.model.loading import decoder_layers
from dlzo.model.premise import premise_decision
from dlzo.model.probe import (
    LayerStats,
    calibration_sequences,
    find_dominant_layer,
    format_table,
    sun_decision,
)
from dlzo.training.config import TrainConfig
from dlzo.training.loop import train

SMALL = small_run(eps=1e-3)
TEXTS = [f"Sentence number {i} says the film was {'good' if i % 2 else 'bad'} and the actors were fine."
         for i in range(8)]


def plant(model, layer: int, forwards: set[int] | None = None, scale: float = 1e4) -> list[int]:
    """Add `scale` to channel 5 of the first token of `layer`'s output, on every forward or on the forwards
    numbered in `forwards` (0-based): the residual stream carries it on through the later layers. Returns the
    forward counter (set it to 0 to plant on the same forwards again)."""
    block = decoder_layers(model)[layer]
    original, seen = block.forward, [0]

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        number, seen[0] = seen[0], seen[0] + 1
        if forwards is not None and number not in forwards:
            return out
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        hidden[:, 0, 5] += scale
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    block.forward = forward
    return seen


def brute_force_carriers(model, tokenizer, layer: int, result) -> int:
    """Each sequence's own max|h| at `layer` against the sun thresholds (the layer's median over all tokens)."""
    stats = result.layers[layer]
    count = 0
    with torch.no_grad():
        for ids in calibration_sequences(tokenizer, TEXTS, 512):
            hidden = model(input_ids=ids[None], output_hidden_states=True).hidden_states[layer + 1]
            top = float(hidden.abs().max())
            count += top > result.rule["abs_threshold"] and top >= result.rule["rel_threshold"] * stats.median_abs
    return count


def test_an_outlier_every_sequence_carries_keeps_the_papers_layer(stories_tokenizer):
    model = tiny_model("llama", layers=6)
    plant(model, 2)
    result = find_dominant_layer(model, stories_tokenizer, TEXTS)
    assert result.num_sequences == len(TEXTS) and result.picks["sun"] == 2
    assert result.layers[2].carriers == len(TEXTS) == brute_force_carriers(model, stories_tokenizer, 2, result)
    assert result.layers[1].carriers == 0
    assert result.premise["holds"] and result.premise["climb"] < 1.01
    assert "the paper's premise at layer 2 holds: carried by 8 of 8" in format_table(result)
    choice = guarded_choice(result)
    assert choice["layer"] == 2 and choice["agrees_with_paper_rule"] and choice["doubts"] == []
    assert "premise holds there: carried by 8 of 8 calibration sequences" in choice["reason"]


def test_an_outlier_on_one_sequence_only_sends_the_choice_to_the_last_layer(stories_tokenizer):
    """Qwen2.5-Coder-0.5B's shape: its rule layer (3) owes its outlier to one token of one SST-2 sentence."""
    model = tiny_model("llama", layers=6)
    counter = plant(model, 1, forwards={3})
    result = find_dominant_layer(model, stories_tokenizer, TEXTS)
    assert result.picks["sun"] == 1
    counter[0] = 0
    assert result.layers[1].carriers == 1 == brute_force_carriers(model, stories_tokenizer, 1, result)
    assert not result.premise["holds"] and "only 1 of 8 calibration sequences carry it (at least 90% wanted)" in result.premise["reason"]
    assert "the paper's premise at layer 1 FAILS: only 1 of 8" in format_table(result)
    assert result.to_json()["premise"]["carriers"] == 1 and result.to_json()["layers"][1]["carriers"] == 1
    choice = guarded_choice(result)
    assert choice["layer"] == 5 and choice["paper_rule_layer"] == 1 and not choice["agrees_with_paper_rule"]
    assert "THE CHOICE DISAGREES WITH THE PAPER'S RULE" in choice["reason"]
    assert choice["doubts"] and "--rule sun" in choice["doubts"][0]


def curve_stats(values: list[float], carriers: int) -> list[LayerStats]:
    median = values[0] / 5000
    return [LayerStats(i, v, median, v / median, carriers=carriers if v > 100 else 0) for i, v in enumerate(values)]


def test_an_outlier_that_keeps_climbing_fails_the_premise():
    """The third family of issue 35: 127x at layer 0, then 35x more over 14 layers, on the BOS token of every
    sequence. The sun rule picks layer 0; the premise fails on the climb alone."""
    layers = curve_stats(climbing_curve(0), carriers=10)
    assert sun_decision(layers)[0] == 0
    premise = premise_decision(layers, 0, 10)
    assert not premise["holds"] and premise["carriers"] == 10
    assert premise["climb"] == pytest.approx(max(climbing_curve(0)[1:-1]) / 127.0, rel=1e-4)
    assert "climb 34.7x above it" in premise["reason"] and "carry" not in premise["reason"]


def test_smollm2s_curve_passes_and_the_thresholds_are_the_boundaries():
    layers = curve_stats(SMOLLM2_CURVE, carriers=41)
    assert premise_decision(layers, 11, 41)["holds"]
    assert premise_decision(layers, 11, 45)["holds"]  # 41 of 45 = 91% carry it: at least 90%
    assert not premise_decision(layers, 11, 46)["holds"]  # 89%
    assert not premise_decision(layers, 11, 41, max_climb=0.99)["holds"]  # the plateau stays within 1.0x
    assert premise_decision(layers, None, 41) == {"layer": None, "holds": False, "reason": "the sun rule finds no layer"}


def test_no_massive_activations_tunes_the_last_layer(stories_tokenizer):
    result = find_dominant_layer(tiny_model("llama", layers=6), stories_tokenizer, TEXTS)
    choice = guarded_choice(result)
    assert result.picks["sun"] is None and choice["layer"] == 5 and choice["doubts"] == []
    assert "finds no massive activations" in choice["reason"] and "tuning the last layer 5" in choice["reason"]


@pytest.mark.requires_shared
def test_dlzo_train_uses_the_guarded_rule_by_default(tmp_path, capsys):
    """stories260K has no massive activations: --scope dominant tunes its last layer and records why."""
    assert TrainConfig().rule == "guarded"
    train(TrainConfig(**SMALL, out=str(tmp_path), steps=1, eval_every=0, scope="dominant"))
    choice = json.loads((tmp_path / "run.json").read_text())["layer_choice"]
    assert choice["layer"] == 4 and choice["rule"] == "guarded" and choice["premise"]["holds"] is False
    assert "dominant layer 4: the paper's rule (sun) finds no massive activations" in capsys.readouterr().out


def test_choose_dominant_layer_probes_the_training_texts(stories_tokenizer):
    """The same training texts give the same pick; the premise is judged on them, as the sun rule is."""
    from dlzo.data.examples import Example

    model = tiny_model("llama", layers=6)
    plant(model, 3)
    train_examples = [Example(prompt=t[:-5], continuations=[t[-5:]], label=0) for t in TEXTS]
    first = choose_dominant_layer(model, stories_tokenizer, train_examples, 1e-3)
    assert first["layer"] == 3 and first["premise"]["sequences"] == len(TEXTS)
    assert choose_dominant_layer(model, stories_tokenizer, train_examples, 1e-3) == first
