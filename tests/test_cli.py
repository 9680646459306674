from pathlib import Path

import pytest

from dlzo.cli.flags import load_recipe
from dlzo.cli.main import main
from dlzo.errors import DlzoError
from dlzo.studies.options import RaceConfig
from dlzo.training.config import TrainConfig

RECIPES = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "configs").glob("*/*.toml"))


def test_the_recipes_are_found():
    assert len(RECIPES) >= 30  # a glob that finds nothing would turn the test below into no test at all


@pytest.mark.parametrize("path", RECIPES)
def test_every_recipe_parses_into_its_config(path):
    from dlzo.studies.lr_grid import parse_grid
    from dlzo.studies.options import SweepConfig

    if "race-" in path:
        config = RaceConfig(**load_recipe(path, RaceConfig))
        config.validate()
        assert config.eps > 0 and config.max_steps > 0
        return
    if "sweep-" in path or "study-" in path:
        config = SweepConfig(**load_recipe(path, SweepConfig))
        # the Qwen2.5 recipes take --model on the command line (the path fetch.sh prints)
        config.model = config.model or "given-on-the-command-line"
        config.validate()
        if config.lr_grid:
            assert parse_grid(config.lr_grid)
    else:
        config = TrainConfig(**load_recipe(path, TrainConfig))
        config.model = config.model or "given-on-the-command-line"  # configs/any-model: --model on the command line
        config.validate()
    assert config.eps > 0 and config.steps > 0


def test_recipe_with_unknown_key_is_one_line_error(tmp_path, capsys):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('model = "x"\nlearning_rate = 1e-6\n')
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dlzo: error: --config {recipe}: unknown key 'learning_rate'") and err.count("\n") == 1


def test_flags_override_recipe(tmp_path, monkeypatch):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "m"\ntask = "sst2"\nsteps = 7\nlr = 0.5\n')
    seen = {}
    monkeypatch.setattr("dlzo.cli.commands.train", lambda config: seen.setdefault("config", config))
    main(["train", "--config", str(recipe), "--lr", "0.25"])
    assert seen["config"].steps == 7 and seen["config"].lr == 0.25 and seen["config"].model == "m"


def test_wrong_type_in_recipe(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('steps = "many"\n')
    with pytest.raises(DlzoError, match="key 'steps' should be int"):
        load_recipe(str(recipe), TrainConfig)


@pytest.mark.parametrize("argv,message", [
    (["train", "--model", "m", "--zo-update", "nesterov"],
     "argument --zo-update: invalid choice: 'nesterov' (choose from 'sgd', 'momentum', 'adam', 'hizoo', 'normalized', 'orthogonal')"),
    (["eval", "--checkpoint", "newest"], "argument --checkpoint: invalid choice: 'newest'"),
    (["train", "--model", "m", "--lerning-rate", "1e-3"], "unrecognized arguments: --lerning-rate 1e-3"),
])
def test_a_bad_flag_is_one_line_and_exit_2(argv, message, capsys):
    """argparse's own mistakes (a value outside the choices, an unknown flag) are one line like every other bad
    input, without argparse's usage block, and exit 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dlzo: error: {message}") and err.count("\n") == 1, err


def test_a_recipe_value_outside_the_choices_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "m"\ndistribution = "uniform"\n')
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err == (f"dlzo: error: --config {recipe}: key 'distribution' should be one of gaussian, rademacher, lowrank, "
                   f"got 'uniform'\n")
    recipe.write_text('zo_update = true\n')
    with pytest.raises(DlzoError, match="key 'zo_update' should be one of sgd, momentum, adam, hizoo, normalized, orthogonal, got True"):
        load_recipe(str(recipe), TrainConfig)
