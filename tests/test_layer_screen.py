"""The layer screen (`--rule screen`, dlzo.engine.layer_screen): on a planted problem whose best layer is known,
it picks that layer, at a rate inside its grid; the comparison is paired and reproducible, leaves the weights
as they were, counts a diverged arm as infinitely bad, lets the paper's rule's layer keep the choice within the
margin, and says so when the paper's rule and the pick disagree. Then the same procedure through `dlzo train`
and `dlzo.ZOTrainer` on a real model."""

import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch

import dlzo.engine.layer_choice
import dlzo.engine.layer_screen
from conftest import SMALL_RUN
from dlzo.engine.layer_choice import screen_candidates, screen_choice
from dlzo.engine.layer_screen import ScreenTask, pick, screen_layers
from dlzo.training.config import TrainConfig
from dlzo.training.loop import train

# A planted model: the loss is the sum over layers l of |θ_l - t_l|² / d; every θ_l starts at 0, so every
# candidate starts from the same loss, and tuning layer l alone can remove only its own term. Layer 3's term
# (1.0) is 100x layer 0's (0.01): the screen must pick layer 3.
DIM = 8
TARGETS = {0: 0.1, 3: 1.0}


def planted_task(seed_noise: int = 0) -> tuple[ScreenTask, dict[int, torch.nn.Parameter]]:
    params = {layer: torch.nn.Parameter(torch.zeros(DIM)) for layer in TARGETS}
    targets = {layer: torch.full((DIM,), value) for layer, value in TARGETS.items()}

    def per_unit(values: dict[int, torch.Tensor]) -> list[float]:  # one "dev example" per coordinate
        return sum((values[k] - targets[k]) ** 2 for k in TARGETS).tolist()

    def loss(values: dict[int, torch.Tensor]) -> float:
        return sum(per_unit(values)) / DIM

    def pair_loss(layer, step, plus, minus):
        name = f"w{layer}"
        current = {k: p.detach() for k, p in params.items()}
        return loss({**current, layer: plus[name]}), loss({**current, layer: minus[name]})

    task = ScreenTask(runner=lambda layer: layer, pair_loss=pair_loss,
                      dev_loss=lambda layer: per_unit({k: p.detach() for k, p in params.items()}),
                      parameters=lambda layer: [(f"w{layer}", params[layer])])
    return task, params


def test_screen_picks_the_planted_layer_and_puts_the_weights_back():
    task, params = planted_task()
    result = screen_layers(task, [0, 3], [0.01, 0.03, 0.1], steps=20, eps=1e-3, seed=0, eval_at=[10])
    assert result.layer == 3 and result.lr in (0.03, 0.1)
    assert result.start_loss == pytest.approx(0.01 + 1.0)
    best0, best3 = result.best(0)[1], result.best(3)[1]
    assert best0 > 1.0 - 1e-6  # layer 0 can remove at most its own 0.01
    assert best3 < 0.6  # layer 3 removes a large part of its 1.0
    assert set(result.curves[3][0.1]) == {10, 20} and result.curves[3][0.1][20] == result.losses[3][0.1]
    assert all(torch.equal(p, torch.zeros(DIM)) for p in params.values())  # every arm starts from, and leaves, θ
    again = screen_layers(planted_task()[0], [0, 3], [0.01, 0.03, 0.1], steps=20, eps=1e-3, seed=0, eval_at=[10])
    assert again.losses == result.losses  # the same seed and data: the same table, to the last digit
    other = screen_layers(planted_task()[0], [0, 3], [0.01, 0.03, 0.1], steps=20, eps=1e-3, seed=1)
    assert other.losses != result.losses and other.layer == 3


def test_a_diverging_rate_counts_as_infinitely_bad():
    task, params = planted_task()
    result = screen_layers(task, [0, 3], [0.03, 1e30], steps=6, eps=1e-3, seed=0)
    assert math.isinf(result.losses[3][1e30]) and math.isinf(result.losses[0][1e30])
    assert result.layer == 3 and result.lr == 0.03
    assert json.dumps(result.to_json())  # no infinity in the record: null
    assert result.to_json()["losses"]["3"]["1e+30"] is None
    assert all(torch.equal(p, torch.zeros(DIM)) for p in params.values())


def test_the_preferred_layer_keeps_the_choice_unless_clearly_beaten():
    task, _ = planted_task()
    result = screen_layers(task, [0, 3], [0.1], steps=20, eps=1e-3, seed=0, preferred=0)
    differences = [a - b for a, b in zip(result.units[0][0.1], result.units[3][0.1])]
    gap, se = statistics.fmean(differences), statistics.stdev(differences) / math.sqrt(DIM)
    assert result.layer == 3 and result.comparison == {"layer": 3, "against": 0, "gap": pytest.approx(gap),
                                                        "se": pytest.approx(se), "overrides": True}
    assert gap == pytest.approx(result.best(0)[1] - result.best(3)[1]) and gap > 2 * se
    assert pick(result, preferred=0, z=gap / se + 0.01) == 0  # within z standard errors: the preferred stays
    assert pick(result, preferred=0, z=gap / se - 0.01) == 3
    assert pick(result, preferred=None, z=1e9) == 3  # no preference: the lowest dev loss
    kept = screen_layers(planted_task()[0], [0, 3], [0.1], steps=20, eps=1e-3, seed=0, preferred=0, z=1e9)
    assert kept.layer == 0 and kept.comparison["overrides"] is False
    assert any("cannot tell the two apart, and keeps layer 0" in d for d in kept.doubts())


def test_candidates_are_the_rules_layers_and_the_last():
    probe = SimpleNamespace(layers=[None] * 24, picks={"sun": 3, "onset": 5})
    assert screen_candidates(probe) == ([3, 5, 23], 3)
    assert screen_candidates(SimpleNamespace(layers=[None] * 24, picks={"sun": None, "onset": 5})) == ([5, 23], 5)
    assert screen_candidates(SimpleNamespace(layers=[None] * 30, picks={"sun": 11, "onset": 11})) == ([11, 29], 11)
    assert screen_candidates(SimpleNamespace(layers=[None] * 5, picks={"sun": None, "onset": None})) == ([2, 4], None)


def test_screen_choice_says_when_it_disagrees_with_the_papers_rule():
    task, _ = planted_task()
    probe = SimpleNamespace(layers=[None] * 4, picks={"sun": 0, "onset": 0})
    record = screen_choice(None, probe, task, lr=0.1, eps=1e-3, seed=0)
    assert record["layer"] == 3 and record["paper_rule_layer"] == 0 and record["agrees_with_paper_rule"] is False
    assert "THE SCREEN DISAGREES WITH THE PAPER'S RULE" in record["reason"]
    assert record["rule"] == "screen" and record["rule_layers"] == {"sun": 0, "onset": 0}
    assert set(record["screen"]["losses"]) == {"0", "3"} and record["screen"]["steps"] == 60
    json.dumps(record)


@pytest.fixture
def short_screen(monkeypatch):
    """The screen at 4 steps (the procedure unchanged), and a planted probe: the rules' layer is 1."""
    monkeypatch.setitem(dlzo.engine.layer_screen.SCREEN, "steps", 4)
    monkeypatch.setitem(dlzo.engine.layer_screen.SCREEN, "dev_examples", 16)
    stats = [SimpleNamespace(max_abs=1000.0, ratio=5000.0)] * 5
    monkeypatch.setattr(dlzo.engine.layer_choice, "find_dominant_layer",
                        lambda *args, **kwargs: SimpleNamespace(dominant_layer=1, layers=stats,
                                                                picks={"sun": 1, "onset": 1}, reason="planted"))


@pytest.mark.slow
def test_train_with_rule_screen_records_the_screen(stories_path, tmp_path, capsys, short_screen):
    config = TrainConfig(**{**SMALL_RUN, "model": stories_path}, out=str(tmp_path / "a"), steps=1, eval_every=0,
                         scope="dominant", rule="screen")
    train(config)
    out = capsys.readouterr().out
    choice = json.loads((tmp_path / "a" / "run.json").read_text())["layer_choice"]
    assert choice["rule"] == "screen" and choice["layer"] in (1, 4) and choice["paper_rule_layer"] == 1
    assert set(choice["screen"]["losses"]) == {"1", "4"} and choice["screen"]["steps"] == 4
    assert choice["screen"]["rates"] == pytest.approx([1e-3 / 3, 1e-3])
    assert choice["agrees_with_paper_rule"] == (choice["layer"] == 1) and choice["seconds"] > 0
    assert f"dominant layer {choice['layer']}: screen, 4 ZO steps" in out
    train(TrainConfig(**{**SMALL_RUN, "model": stories_path}, out=str(tmp_path / "b"), steps=1, eval_every=0,
                      scope="dominant", rule="screen"))
    again = json.loads((tmp_path / "b" / "run.json").read_text())["layer_choice"]
    assert again["screen"]["losses"] == choice["screen"]["losses"] and again["layer"] == choice["layer"]


def test_zotrainer_with_rule_screen_uses_the_same_procedure(stories_path, tmp_path, short_screen):
    from test_hf_trainer import make_trainer

    import dlzo

    trainer = make_trainer(stories_path, tmp_path, zo=dlzo.ZOArguments(rule="screen"))
    choice = trainer.zo_layer_choice
    assert choice["rule"] == "screen" and set(choice["screen"]["losses"]) == {"1", "4"}
    assert trainer.zo_scope.layers == [choice["layer"]] and trainer.zo_layer_reason == choice["reason"]
    with pytest.raises(ValueError, match="rule=screen trains the candidate layers themselves"):
        dlzo.ZOArguments(scope="dominant-lora", rule="screen")
