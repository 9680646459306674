"""The package's shape, checked: no import circle, no dlzo import inside a function, short functions, README's map."""

import ast
import pkgutil
import re
from pathlib import Path

import pytest

import dlzo

PACKAGE = Path(dlzo.__file__).parent
LONGEST_FUNCTION = 80  # lines; the figure the architecture issue asked to keep well under 100


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    """Every module of the package, subpackages included (a package's __init__ under the package's name)."""
    return {module_name(path): ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}


def dlzo_imports(node: ast.AST) -> set[str]:
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.ImportFrom) and child.level:  # from .zo import x / from . import zo (one package)
            module = "dlzo" + (f".{child.module}" if child.module else "")
            found.add(module)
            found.update(f"dlzo.{a.name}" for a in child.names if module == "dlzo")
        elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("dlzo"):
            found.add(child.module)
            found.update(f"dlzo.{a.name}" for a in child.names if child.module == "dlzo")
        elif isinstance(child, ast.Import):
            found.update(a.name for a in child.names if a.name.startswith("dlzo."))
    return found


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph (module -> the modules it imports), as a path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                return path + [target]
            if target not in state and (circle := visit(target, path + [target])):
                return circle
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (circle := visit(name, [name])):
            return circle
    return None


def test_no_import_circle():
    trees = modules()
    graph = {name: {m for m in dlzo_imports(tree) if m in trees and m != name} for name, tree in trees.items()}
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_no_dlzo_import_inside_a_function():
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden = dlzo_imports(node)
                assert not hidden, f"{name}.{node.name} imports {sorted(hidden)} inside the function"


def test_functions_are_short():
    lengths = {f"{name}.{node.name}": node.end_lineno - node.lineno + 1
               for name, tree in modules().items() for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    longest = max(lengths, key=lengths.get)
    assert lengths[longest] <= LONGEST_FUNCTION, f"{longest} is {lengths[longest]} lines"


def test_the_checker_sees_a_circle():
    """The circle check must be able to fail: imports written every way are read, and a circle is found."""
    a = ast.parse("from dlzo.b import x\n")
    b = ast.parse("def f():\n    from .c import y\n")
    c = ast.parse("from . import a\nimport dlzo.d\n")
    graph = {"dlzo.a": dlzo_imports(a), "dlzo.b": dlzo_imports(b), "dlzo.c": dlzo_imports(c) - {"dlzo"},
             "dlzo.d": set()}
    assert graph == {"dlzo.a": {"dlzo.b"}, "dlzo.b": {"dlzo.c"}, "dlzo.c": {"dlzo.a", "dlzo.d"}, "dlzo.d": set()}
    assert find_circle(graph) == ["dlzo.a", "dlzo.b", "dlzo.c", "dlzo.a"]
    assert find_circle({**graph, "dlzo.c": {"dlzo.d"}}) is None


@pytest.mark.slow
def test_top_level_names_survive_their_modules_import():
    """`dlzo.train(config)` named the submodule dlzo.train once anything had imported it (Python sets a package
    attribute to each submodule it imports): no export may share a submodule's name, and each one, read after
    its module was imported, is the exported object itself."""
    import importlib
    import subprocess
    import sys

    assert not set(dlzo.__all__) & {f"{info.name}" for info in pkgutil.iter_modules([str(PACKAGE)])}
    check = ("import importlib, dlzo\n"
             "for name, module in dlzo._EXPORTS.items():\n"
             "    importlib.import_module(module)\n"
             "    assert getattr(dlzo, name) is getattr(importlib.import_module(module), name), name\n"
             "assert callable(dlzo.train) and callable(dlzo.train)\n")
    subprocess.run([sys.executable, "-c", check], check=True, timeout=300)  # a fresh interpreter: no module imported
    assert importlib.import_module("dlzo.training.loop").train is dlzo.train


def test_every_module_has_a_row_in_the_architecture_table():
    """docs/architecture.md's module table is the map of the package: a module it leaves out is a room no reader
    finds, a row naming no module is a room that moved."""
    doc = (PACKAGE.parent.parent / "docs" / "architecture.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `dlzo.")]
    named = {name for line in rows for name in re.findall(r"`(dlzo[\w.]*)`", line.split("|")[1])}
    public = {name for name in modules() if not name.endswith("__main__") and name != "dlzo"}
    assert public - named == set(), "modules without a row in docs/architecture.md's table"
    assert named - public == set(), "rows in docs/architecture.md's table naming no module"


# The layers, bottom to top: a module may import its own layer and the ones below, never one above.
LAYERS = ["dlzo.errors", "dlzo.fields", "dlzo.choices", "dlzo.data", "dlzo.model", "dlzo.engine", "dlzo.evaluation", "dlzo.training", "dlzo.studies",
          "dlzo.cli"]
MOST_MODULES_PER_FOLDER = 12
MOST_LINES_PER_MODULE = 450


def layer_of(name: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if name == layer or name.startswith(layer + ".")), None)


def test_nothing_outside_the_command_line_imports_it():
    """dlzo.cli holds every command's argument handling: the library never reaches up into it (the package's
    `python -m dlzo` entry point, dlzo/__main__.py, is the one door into it)."""
    for name, tree in modules().items():
        if name.startswith("dlzo.cli") or name == "dlzo.__main__":
            continue
        reached = {m for m in dlzo_imports(tree) if m == "dlzo.cli" or m.startswith("dlzo.cli.")}
        assert not reached, f"{name} imports {sorted(reached)}"


def test_imports_point_down_the_layers():
    """data < model < engine < evaluation < training < studies < cli: an import of a higher layer is an arrow running back up."""
    for name, tree in modules().items():
        own = layer_of(name)
        if own is None:
            continue
        for target in dlzo_imports(tree):
            other = layer_of(target)
            assert other is None or other <= own, f"{name} (layer {LAYERS[own]}) imports {target}"


def test_the_layer_check_can_fail():
    assert layer_of("dlzo.engine.zo") < layer_of("dlzo.training.loop") < layer_of("dlzo.cli.main")
    assert layer_of("dlzo.data.examples") < layer_of("dlzo.engine.scoring")
    assert layer_of("dlzo") is None


def test_folders_and_modules_stay_small():
    folders: dict[str, int] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            folders[str(path.parent.relative_to(PACKAGE.parent))] = folders.get(str(path.parent.relative_to(PACKAGE.parent)), 0) + 1
        lines = len(path.read_text().splitlines())
        assert lines <= MOST_LINES_PER_MODULE, f"{path.relative_to(PACKAGE.parent)} has {lines} lines"
    crowded = {folder: count for folder, count in folders.items() if count > MOST_MODULES_PER_FOLDER}
    assert not crowded, f"folders with more than {MOST_MODULES_PER_FOLDER} modules: {crowded}"
    assert len(folders) >= 7, "the subpackages were not found"
