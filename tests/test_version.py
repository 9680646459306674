"""`dlzo --version` names the installed package's version, the one pyproject.toml declares."""

import re
from pathlib import Path

import pytest

from dlzo.cli.main import main


def test_version_flag_prints_the_declared_version(capsys):
    declared = re.search(r'^version = "([^"]+)"', (Path(__file__).parents[1] / "pyproject.toml").read_text(),
                         re.M).group(1)
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"dlzo {declared}"
