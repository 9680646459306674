"""The package's shape, checked: no import circle, no dlzo import inside a function, short functions, README's map."""

import ast
import pkgutil
import re
from pathlib import Path

import dlzo

PACKAGE = Path(dlzo.__file__).parent
LONGEST_FUNCTION = 80  # lines; the figure the architecture issue asked to keep well under 100


def modules() -> dict[str, ast.Module]:
    return {f"dlzo.{info.name}": ast.parse((PACKAGE / f"{info.name}.py").read_text())
            for info in pkgutil.iter_modules([str(PACKAGE)])}


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
    assert importlib.import_module("dlzo.training").train is dlzo.train


def test_every_module_has_a_row_in_the_readme_table():
    """README's module table is the map of the package: a module it leaves out is a room no reader finds (four
    were missing before this test), a row naming no module is a room that moved."""
    readme = (PACKAGE.parent.parent / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `dlzo.")]
    named = {name for line in rows for name in re.findall(r"`(dlzo\.\w+)`", line.split("|")[1])}
    public = {name for name in modules() if not name.endswith("__main__") and name != "dlzo.__init__"}
    assert public - named == set(), "modules without a row in README's table"
    assert named - public == set(), "rows in README's table naming no module"
