"""dlzo race: recipes raced to a target test metric in one process (stories260K, offline)."""

import itertools
import json
import time
import types

import pytest

from conftest import DATA, STORIES, small_run
from dlzo.cli.flags import load_recipe
from dlzo.cli.main import main
from dlzo.errors import DlzoError
from dlzo.evaluation.evaluate import EvalResult
from dlzo.studies import race as race_module
from dlzo.studies.options import RaceConfig
from dlzo.studies.race import race, race_ratios
from dlzo.studies.recipes import parse_recipes, recipe_config

TINY = small_run("lr", "quiet", num_train=32, num_dev=8, num_test=8)
SCORING = 3600.0  # seconds each scripted scoring takes on the race's clock (virtual: nothing sleeps)


def test_recipes_parse_typed_and_bad_ones_name_the_recipe():
    recipes = parse_recipes("adamw: optimizer=adamw scope=full lr=1e-5; lever: scope=lezo:2 zo_update=adam "
                            "beta1=0.8 q=2 fast_path=false;")
    assert recipes == [("adamw", {"optimizer": "adamw", "scope": "full", "lr": 1e-5}),
                       ("lever", {"scope": "lezo:2", "zo_update": "adam", "beta1": 0.8, "q": 2, "fast_path": False})]
    for bad, message in (("a: lr=fast", "recipe a: lr='fast'"), ("a: colour=red", "recipe a: 'colour=red'"),
                         ("a: steps=3", "race's own"), ("a: lr=1; a: lr=2", "distinct"), ("lr=1", "NAME:")):
        with pytest.raises(DlzoError, match=message):
            parse_recipes(bad)


def test_a_first_order_recipe_may_checkpoint_its_backward_and_a_zo_one_may_not(tmp_path):
    [(_, first_order)] = parse_recipes("fo: optimizer=adamw scope=layer:2 gradient_checkpointing=true")
    assert first_order == {"optimizer": "adamw", "scope": "layer:2", "gradient_checkpointing": True}
    assert recipe_config(RaceConfig(model="m"), first_order, 0, tmp_path).gradient_checkpointing
    [(_, zo)] = parse_recipes("zo: gradient_checkpointing=1")
    with pytest.raises(DlzoError, match="^--gradient-checkpointing needs --optimizer adamw"):
        recipe_config(RaceConfig(model="m"), zo, 0, tmp_path)


def test_the_smollm2_recipe_files_load():
    values = load_recipe("configs/smollm2-135m/race-sst2.toml", RaceConfig)
    names = [n for n, _ in parse_recipes(values["recipes"])]
    assert {"adamw", "full", "dominant"} <= set(names) and values["target"] == 0.7
    values = load_recipe("configs/smollm2-135m/race-cb.toml", RaceConfig)
    assert [n for n, _ in parse_recipes(values["recipes"])] == ["dominant", "full"]
    assert values["dev_loss"] and not values["stop_at_target"] and values["task"] == "cb"


def test_ratio_arithmetic():
    results = {"full": {"reached": True, "steps_to_target": 40, "seconds_to_target": 80.0, "steps": 40,
                        "train_seconds": 80.0},
               "adamw": {"reached": False, "steps_to_target": None, "seconds_to_target": None, "steps": 9,
                         "train_seconds": 30.0},
               "dom": {"reached": True, "steps_to_target": 20, "seconds_to_target": 4.0, "steps": 20,
                       "train_seconds": 4.0}}
    ratios = race_ratios(results, 3.0, "full", "adamw")
    dom = ratios["recipes"]["dom"]
    assert dom["vs_upstream_full"] == pytest.approx(3.0 * 40 / 4.0) and dom["vs_full"] == pytest.approx(20.0)
    assert dom["vs_adamw"] == pytest.approx(7.5) and dom["bounds"]["vs_adamw"] == "at least"
    assert dom["bounds"]["vs_full"] == "reached, to the scoring interval" and ratios["recipes"]["adamw"]["vs_full"] is None
    # crossings known to their scoring intervals: full in (70, 80] s (upstream: steps 35-40), dom in (2, 4] s
    results["full"].update(seconds_before_target=70.0, steps_before_target=35)
    results["dom"].update(seconds_before_target=2.0)
    dom = race_ratios(results, 3.0, "full", "adamw")["recipes"]["dom"]
    assert dom["vs_full"] == pytest.approx(20.0) and dom["range"]["vs_full"] == pytest.approx([70 / 4, 80 / 2])
    assert dom["range"]["vs_upstream_full"] == pytest.approx([3.0 * 35 / 4, 3.0 * 40 / 2])
    assert dom["range"]["vs_adamw"] == [pytest.approx(30 / 4), None]  # never reached: no upper bound
    assert race_ratios(results, 3.0, "full", "adamw")["recipes"]["full"]["range"]["vs_full"] == [1.0, 1.0]
    del results["full"]["seconds_before_target"]  # a record from before the interval was kept: no range
    assert race_ratios(results, 3.0, "full", "adamw")["recipes"]["dom"]["range"]["vs_full"] is None
    results["full"]["seconds_before_target"] = 70.0
    results["dom"]["seconds_before_target"] = 0.0  # met at the first scoring after step 0's
    assert race_ratios(results, None, "full", "adamw")["recipes"]["dom"]["range"]["vs_full"][1] is None
    # AdamW met the target only at its final scoring, past the budget: it is known not to have crossed by its
    # last scoring under the target (18 s, step 6), not by the 30 s its run ended at
    results["adamw"].update(seconds_below_target=18.0, steps_below_target=6)
    dom = race_ratios(results, 3.0, "full", "adamw")["recipes"]["dom"]
    assert dom["vs_adamw"] == pytest.approx(18 / 4) and dom["range"]["vs_adamw"] == [pytest.approx(18 / 4), None]
    results["full"].update(reached=False, seconds_below_target=50.0, steps_below_target=25)
    dom = race_ratios(results, 3.0, "full", "adamw")["recipes"]["dom"]
    assert dom["vs_full"] == pytest.approx(50 / 4) and dom["vs_upstream_full"] == pytest.approx(3.0 * 25 / 4)


def test_time_to_full_mezos_best_dev_loss():
    """Full MeZO's best dev loss (0.55, first at 60 s) is the bar; dom gets under it at 20 s, lazy never."""
    def run(points):
        return {"reached": False, "steps_to_target": None, "seconds_to_target": None, "steps": 3,
                "train_seconds": points[-1][0], "curve": [{"step": i, "seconds": t, "metric": 0.5, "dev_loss": d}
                                                          for i, (t, d) in enumerate(points)]}
    results = {"full": run([(0.0, 0.7), (30.0, 0.6), (60.0, 0.55), (90.0, 0.55), (120.0, 0.58)]),
               "dom": run([(1.0, 0.7), (10.0, 0.56), (20.0, 0.54), (30.0, 0.50)]),
               "lazy": run([(1.0, 0.7), (50.0, 0.69)])}
    ratios = race_ratios(results, None, "full", "adamw")
    assert ratios["references"]["full_best_dev_loss"] == {"dev_loss": 0.55, "seconds": 60.0, "step": 2}
    assert ratios["recipes"]["dom"]["seconds_to_full_best_dev_loss"] == 20.0
    assert ratios["recipes"]["dom"]["vs_full_best_dev_loss"] == pytest.approx(3.0)
    assert ratios["recipes"]["full"]["vs_full_best_dev_loss"] == pytest.approx(1.0)
    assert ratios["recipes"]["lazy"]["seconds_to_full_best_dev_loss"] is None
    assert "full_best_dev_loss" not in race_ratios({"dom": results["dom"]}, None, "full", "adamw")["references"]
    never = {"full": run([(0.0, 0.7), (30.0, 0.75), (60.0, float("nan"))]), "dom": results["dom"]}
    assert "full_best_dev_loss" not in race_ratios(never, None, "full", "adamw")["references"]  # no improvement


@pytest.mark.slow
@pytest.mark.requires_shared
def test_a_race_without_stopping_trains_every_recipe_for_its_budget(tmp_path, monkeypatch):
    """--no-stop-at-target: a recipe that reached the target keeps training to --max-steps, its reach kept."""
    monkeypatch.setattr(race_module, "evaluate",
                        lambda *a, **k: EvalResult("sst2", "accuracy", 0.9, 8))
    report = race(RaceConfig(**TINY, recipes="full: scope=full lr=1e-4; dominant: scope=layer:1 lr=1e-3", seeds="0",
                             target=0.7, max_steps=3, eval_every=1, upstream_repeats=0, dev_loss=True,
                             stop_at_target=False, out=str(tmp_path / "race")))
    for run in report["results"]["0"].values():
        assert run["steps"] == 3 and run["steps_to_target"] == 0 and len(run["curve"]) == 4
    # the finished recipes are kept under the same race options only
    (tmp_path / "race" / "race.json").unlink()
    with pytest.raises(DlzoError, match="ran with --budget-s 240.0, the race now asks for 100.0"):
        race(RaceConfig(**TINY, recipes="full: scope=full lr=1e-4; dominant: scope=layer:1 lr=1e-3", seeds="0",
                        target=0.7, max_steps=3, eval_every=1, upstream_repeats=0, dev_loss=True,
                        stop_at_target=False, budget_s=100.0, out=str(tmp_path / "race")))
    best = report["ratios"]["0"]["references"]["full_best_dev_loss"]
    full_devs = [p["dev_loss"] for p in report["results"]["0"]["full"]["curve"]]
    assert best["dev_loss"] == min(full_devs) and best["step"] == full_devs.index(min(full_devs))
    assert "vs_full_best_dev_loss" in report["summary"]["dominant"]["ratios"]
    assert (tmp_path / "race" / "race.png").exists()


@pytest.mark.slow
@pytest.mark.requires_shared
def test_a_target_met_past_the_budget_is_not_reached(tmp_path, monkeypatch):
    """The budget is checked after each step, so the last one can end past it: a target met at that scoring
    counted as reached (182.4 s against a 180 s budget in the CB race). Here every scoring meets the target;
    the layer recipe's cache build alone passes a 1 µs budget, full MeZO (no cache) is at 0 s at step 0."""
    monkeypatch.setattr(race_module, "evaluate", lambda *a, **k: EvalResult("sst2", "accuracy", 0.9, 8))
    report = race(RaceConfig(**TINY, recipes="full: scope=full lr=1e-4; dominant: scope=layer:1 lr=1e-3", seeds="0",
                             target=0.7, max_steps=3, eval_every=1, upstream_repeats=0, budget_s=1e-6,
                             out=str(tmp_path / "race")))
    full, dom = report["results"]["0"]["full"], report["results"]["0"]["dominant"]
    assert full["reached"] and full["seconds_to_target"] == 0.0
    assert dom["prefix_cache_seconds"] > 1e-6 and not dom["reached"] and dom["curve"][0]["metric"] == 0.9
    assert dom["seconds_below_target"] == 0.0  # over the target at every scoring: it may have crossed at 0 s


@pytest.mark.slow
@pytest.mark.requires_shared
def test_choosing_the_dominant_layer_is_training_time(tmp_path, monkeypatch):
    """--scope dominant chooses its layer by inference on training texts (on stories260K: the probe finds no
    massive activation, then the sensitivity fallback's forwards): counted like the cache's build, it was not."""
    monkeypatch.setattr(race_module, "evaluate", lambda *a, **k: EvalResult("sst2", "accuracy", 0.5, 8))
    report = race(RaceConfig(**TINY, recipes="dom: scope=dominant lr=1e-3", seeds="0", target=0.7, max_steps=1,
                             eval_every=1, upstream_repeats=0, out=str(tmp_path / "race")))
    dom = report["results"]["0"]["dom"]
    assert dom["layer_choice_seconds"] > 0
    assert dom["curve"][0]["seconds"] == pytest.approx(dom["prefix_cache_seconds"] + dom["layer_choice_seconds"],
                                                       abs=1e-3)


@pytest.mark.slow
@pytest.mark.requires_shared
def test_race_writes_curves_ratios_and_excludes_evaluation_time(tmp_path, monkeypatch):
    """Scripted test metrics (each scoring takes an hour on the race's clock, advanced by the fake evaluation:
    a real sleep made the test depend on the machine's load): full never reaches 0.7, dominant does at step 2."""
    scripted = itertools.cycle([0.5, 0.6, 0.65, 0.5, 0.8])
    offset = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0])

    def fake_evaluate(model, tokenizer, task, examples, *args, **kwargs):
        offset[0] += SCORING
        return EvalResult(task.name, "accuracy", next(scripted), len(examples))

    monkeypatch.setattr(race_module, "evaluate", fake_evaluate)
    monkeypatch.setattr(race_module, "time", clock)
    started = clock.perf_counter()
    report = race(RaceConfig(**TINY, recipes="full: scope=full lr=1e-4; dominant: scope=layer:1 lr=1e-3",
                             seeds="0,1", target=0.7, max_steps=4, eval_every=2, upstream_repeats=1,
                             out=str(tmp_path / "race")))
    wall = clock.perf_counter() - started
    saved = json.loads((tmp_path / "race" / "race.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"])) and (tmp_path / "race" / "race.png").exists()
    for seed in ("0", "1"):
        full, dom = saved["results"][seed]["full"], saved["results"][seed]["dominant"]
        assert not full["reached"] and full["steps"] == 4 and [p["step"] for p in full["curve"]] == [0, 2, 4]
        assert dom["reached"] and dom["steps_to_target"] == 2 and dom["steps"] == 2
        for run in (full, dom):
            # the step-0 scoring is not training time; building the frozen-prefix cache is
            assert run["curve"][0]["seconds"] == pytest.approx(run["prefix_cache_seconds"], abs=1e-3)
            assert run["eval_seconds"] >= SCORING * run["evaluations"] > SCORING > run["train_seconds"]
            assert run["curve"][-1]["seconds"] == pytest.approx(run["train_seconds"], abs=1e-3)
            assert run["peak_mem_bytes"] > 0 and run["mem_vs_inference"] > 0.5
        # two steps of stories260K and the cache's build (training time), none of the scorings' hours
        assert dom["seconds_to_target"] == dom["curve"][1]["seconds"] < SCORING
        # crossed between the scoring before (step 0) and this one: the interval the time is known to
        assert (dom["steps_before_target"], dom["seconds_before_target"]) == (0, dom["curve"][0]["seconds"])
        upstream = saved["upstream_full"][seed]["step_s"]
        ratios = saved["ratios"][seed]["recipes"]["dominant"]
        assert ratios["vs_upstream_full"] == pytest.approx(upstream * full["steps"] / dom["seconds_to_target"])
        assert ratios["vs_full"] == pytest.approx(full["train_seconds"] / dom["seconds_to_target"])
        assert ratios["bounds"] == {"vs_full": "at least", "vs_upstream_full": "at least"}
        trajectory = tmp_path / "race" / f"seed{seed}" / "dominant" / "trajectory.jsonl"
        assert len(trajectory.read_text().splitlines()) == 2  # the Session's own step log: replayable
    total = sum(r["train_seconds"] + r["eval_seconds"] for s in saved["results"].values() for r in s.values())
    assert total < wall
    assert saved["summary"]["dominant"]["reached"] == 2 and saved["summary"]["full"]["reached"] == 0
    assert saved["summary"]["dominant"]["ratios"]["vs_full"]["n"] == 2


@pytest.mark.slow
@pytest.mark.requires_shared
def test_race_command_scores_for_real_with_the_lever_and_dev_loss(tmp_path, capsys):
    out = tmp_path / "race"
    args = ["race", "--model", str(STORIES), "--data-dir", str(DATA), "--num-train", "32", "--num-dev", "8",
            "--num-test", "8", "--batch-size", "4", "--recipes", "lever: scope=layer:1 zo_update=momentum lr=1e-3",
            "--max-steps", "2", "--eval-every", "1", "--upstream-repeats", "0", "--dev-loss", "--out", str(out)]
    assert main(args) == 0
    saved = json.loads((out / "race.json").read_text())
    run = saved["results"]["0"]["lever"]
    assert run["zo_update"] == "momentum" and len(run["curve"]) == 3
    assert all(0 <= p["metric"] <= 1 and p["dev_loss"] > 0 for p in run["curve"])
    assert saved["upstream_full"]["0"] is None and "lever" in capsys.readouterr().out
    assert main(args) == 2  # the folder already holds a race


@pytest.mark.slow
@pytest.mark.requires_shared
def test_a_killed_race_resumes_from_its_finished_recipes(tmp_path, monkeypatch):
    """Finished recipes (and the upstream timing) are read back; a recipe killed midway starts over."""
    config = dict(TINY, recipes="full: scope=full lr=1e-4; dominant: scope=layer:1 lr=1e-3", seeds="0",
                  target=0.99, max_steps=2, eval_every=1, upstream_repeats=1, out=str(tmp_path / "race"))
    first = race(RaceConfig(**config))
    seed = tmp_path / "race" / "seed0"
    (tmp_path / "race" / "race.json").unlink()
    (seed / "dominant" / "race-recipe.json").unlink()  # as if killed during this recipe
    ran = []
    original = race_module.RecipeRun.run
    monkeypatch.setattr(race_module.RecipeRun, "run", lambda self: ran.append(self.config.out) or original(self))
    monkeypatch.setattr(race_module, "upstream_step", lambda *a: pytest.fail("the upstream timing was kept"))
    again = race(RaceConfig(**config))
    assert ran == [str(seed / "dominant")]
    assert again["results"]["0"]["full"] == json.loads(json.dumps(first["results"]["0"]["full"]))
    assert again["upstream_full"] == json.loads(json.dumps(first["upstream_full"]))
    (tmp_path / "race" / "race.json").unlink()  # a recipe or a shared setting changed: its record is not reused
    changed = config["recipes"].replace("lr=1e-4", "lr=2e-4")
    with pytest.raises(DlzoError, match=r"full/race-recipe.json: this recipe ran with --lr 0.0001, the race now gives 0.0002"):
        race(RaceConfig(**{**config, "recipes": changed}))
    with pytest.raises(DlzoError, match=r"race-recipe.json: this recipe ran with --eps 0.001"):
        race(RaceConfig(**{**config, "eps": 1e-2}))
