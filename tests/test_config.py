import argparse
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from dlzo.choices import ESTIMATORS, UPDATE_RULES
from dlzo.cli.flags import add_arguments
from dlzo.cli.options import EvalConfig, ExportConfig
from dlzo.engine.directions import DISTRIBUTIONS
from dlzo.errors import DlzoError
from dlzo.fields import comma_list, literal_fields, option, same_as
from dlzo.studies.options import RaceConfig, SweepConfig
from dlzo.training.config import TrainConfig, ZOArguments, absolute_paths


def test_same_as_shares_help_and_default_unless_overridden():
    @dataclass
    class Child:
        eps: float = same_as(TrainConfig, "eps")
        eval_every: int = same_as(TrainConfig, "eval_every", default=7)
        own: str = option("x", "its own option")

    fields = Child.__dataclass_fields__
    assert fields["eps"].metadata["help"] == TrainConfig.__dataclass_fields__["eps"].metadata["help"]
    assert Child().eps == TrainConfig().eps and Child().eval_every == 7
    parser = argparse.ArgumentParser()
    add_arguments(parser, Child)
    assert parser.parse_args(["--eps", "0.01"]).eps == 0.01


def test_shared_options_of_the_commands_have_one_description():
    for name in ("task", "data_dir", "batch_size", "eps", "num_train", "num_dev", "num_test", "dtype"):
        assert (SweepConfig.__dataclass_fields__[name].metadata["help"]
                == TrainConfig.__dataclass_fields__[name].metadata["help"]), name


def test_paths_are_recorded_absolute_without_following_links(tmp_path, monkeypatch):
    """A Hub cache file is a link to a blob with no extension: the link's own name is kept; --data-dir hf
    (the Hub) stays even where a folder named hf exists; hub model ids stay."""
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "9f2c1ab").write_text("{}\n")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "rows.jsonl").symlink_to(tmp_path / "blobs" / "9f2c1ab")
    (tmp_path / "hf").mkdir()
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(model="HuggingFaceTB/SmolLM2-135M", data="snap/rows.jsonl", data_dir="hf",
                         prefix_store="~/store")
    absolute_paths(config)
    assert config.data == str(tmp_path / "snap" / "rows.jsonl") and config.data_dir == "hf"
    assert config.model == "HuggingFaceTB/SmolLM2-135M" and config.prefix_store == str(Path.home() / "store")



def test_enum_options_are_literal_types_whose_values_are_written_once():
    """The allowed values come from the engine (the lowest module that needs them), and every command that has
    the option offers exactly those: argparse's choices are the Literal's values."""
    choices = literal_fields(TrainConfig)
    assert choices["distribution"] == DISTRIBUTIONS == ("gaussian", "rademacher", "lowrank")
    assert choices["estimator"] == ESTIMATORS and choices["zo_update"] == UPDATE_RULES
    assert choices["rule"] == ("guarded", "sun", "onset", "screen") and choices["optimizer"] == ("zo", "adamw")
    for cls in (SweepConfig, RaceConfig, EvalConfig):
        assert literal_fields(cls)["dtype"] == choices["dtype"], cls
    assert literal_fields(EvalConfig)["checkpoint"] == literal_fields(ExportConfig)["checkpoint"] == (
        "best", "last", "final")
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    offered = {action.dest: tuple(action.choices) for action in parser._actions if action.choices}
    assert offered == choices


def test_a_config_built_without_the_command_line_is_checked_against_its_choices():
    """A TrainConfig made in Python (a race recipe, a sweep, a script) or from a run's record never went through
    argparse: validate() names the flag and the values, in one line."""
    with pytest.raises(DlzoError, match=r"^--distribution 'uniform' is not one of gaussian, rademacher, lowrank$"):
        TrainConfig(model="m", distribution="uniform").validate()
    with pytest.raises(DlzoError, match=r"^--zo-update 'nesterov' is not one of sgd, momentum, adam, hizoo, normalized, orthogonal$"):
        TrainConfig(model="m", zo_update="nesterov").validate()
    with pytest.raises(DlzoError, match=r"^--dtype 'float8' is not one of auto, float32"):
        SweepConfig(model="m", dtype="float8").validate()
    with pytest.raises(DlzoError, match=r"^--checkpoint 'bogus' is not one of best, last, final$"):
        ExportConfig(run="r", to="t", checkpoint="bogus").validate()


def test_zo_arguments_share_train_configs_definitions():
    """ZOTrainer's options that `dlzo train` also has are TrainConfig's fields: the same help, default and
    allowed values (including zo_update and estimator, which it lacked)."""
    train, zo = {f.name: f for f in fields(TrainConfig)}, {f.name: f for f in fields(ZOArguments)}
    shared = ("rule", "eps", "q", "distribution", "params", "lora_r", "lora_alpha", "estimator", "zo_update",
              "beta1", "beta2", "hessian_smooth")
    train_types, zo_types = typing.get_type_hints(TrainConfig), typing.get_type_hints(ZOArguments)
    for name in shared:
        assert zo[name].metadata["help"] == train[name].metadata["help"], name
        assert zo[name].default == train[name].default, name
        assert zo_types[name] == train_types[name], name
    with pytest.raises(ValueError, match=r"ZOArguments\.zo_update must be one of sgd, momentum, adam, hizoo, normalized, orthogonal, not 'sg'"):
        ZOArguments(zo_update="sg")
    with pytest.raises(ValueError, match="hizoo needs estimator=two-sided"):
        ZOArguments(zo_update="hizoo", estimator="one-sided")
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\)"):
        ZOArguments(beta2=1.0)


def test_comma_separated_options_are_read_by_one_parser():
    assert comma_list("0, 1,,2 ") == ["0", "1", "2"] and comma_list("") == [] and comma_list(" , ") == []
    assert comma_list("1e-4,1e-3", float) == [1e-4, 1e-3]
    with pytest.raises(DlzoError, match=r"^--seeds '0,x' is not a list$"):
        comma_list("0,x", int, "--seeds '0,x' is not a list")
