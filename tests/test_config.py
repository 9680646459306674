import argparse
from dataclasses import dataclass
from pathlib import Path

from dlzo.cli.flags import add_arguments
from dlzo.fields import option, same_as
from dlzo.studies.options import SweepConfig
from dlzo.training.config import TrainConfig, absolute_paths


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
