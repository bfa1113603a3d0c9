"""The shape of the code: imports point one way (`demo` may use `server` and `pattern_store`; the server does
not import the demo, only `server/cli.py`'s commands when they run; `pattern_store` imports neither; no
module of the packages imports, through others, itself), and no class or function grows past what one
reader holds in mind (classes about 250 lines, functions 60, the CLI's parser declarations excepted)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from conftest import ROOT


def imported(node: ast.AST) -> list[str]:
    """Top-level package names an import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name.partition(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.partition(".")[0]]
    return []


def imports_of(file: Path, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(file.read_text(), filename=str(file))
    nodes = tree.body if module_level_only else ast.walk(tree)
    return {name for node in nodes for name in imported(node)}


def test_the_server_never_imports_the_demo_but_the_cli_commands_do_lazily() -> None:
    for file in sorted((ROOT / "server").rglob("*.py")):
        at_load = imports_of(file, module_level_only=True)
        assert "demo" not in at_load, f"{file.relative_to(ROOT)} imports demo when it loads"
        if file.name != "cli.py" or file.parent.name != "server":
            assert "demo" not in imports_of(file), f"{file.relative_to(ROOT)} imports demo"
    assert "demo" in imports_of(ROOT / "server" / "cli.py")  # `taskmoe eval` and `chat` use it


def test_the_pattern_store_imports_neither_server_nor_demo() -> None:
    for file in sorted((ROOT / "pattern_store").rglob("*.py")):
        assert not imports_of(file) & {"server", "demo"}, f"{file.relative_to(ROOT)}"


def test_the_demo_package_is_installed_with_the_project() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "demo*" in include and (ROOT / "demo" / "__init__.py").is_file()


PACKAGES = ("server", "pattern_store", "demo")
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 60
DECLARATIONS = {("server/cli.py", "build_parser")}  # argparse declarations: long, and flat


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = file
    return found


def _module_level_imports(file: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports when it loads (not the lazy imports inside functions)."""
    names = set()
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names & modules.keys()


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected components of more than one)."""
    order, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in order:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], order[other])
        if low[node] == order[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in graph:
        if node not in order:
            visit(node)
    return cycles


def test_no_module_imports_itself_through_others() -> None:
    modules = _modules()
    graph = {name: _module_level_imports(file, modules) for name, file in modules.items()}
    assert import_cycles(graph) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail


def test_no_class_or_function_outgrows_a_reader() -> None:
    too_long = []
    for file in _modules().values():
        where = str(file.relative_to(ROOT))
        for node in ast.walk(ast.parse(file.read_text())):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES:
                too_long.append(f"{where}: class {node.name} has {lines} lines")
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_function and lines > MAX_FUNCTION_LINES and (where, node.name) not in DECLARATIONS:
                too_long.append(f"{where}: {node.name}() has {lines} lines")
    assert too_long == []
