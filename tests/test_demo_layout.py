"""Imports point one way: `demo` may use `server` and `pattern_store`; the server does not import the demo
(only `server/cli.py`'s commands, when they run), and `pattern_store` imports neither."""

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
