import argparse
from dataclasses import dataclass

from dlzo.config import add_arguments, option, same_as
from dlzo.options import SweepConfig, TrainConfig


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
