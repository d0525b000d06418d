"""The arrows of docs/architecture.md that must never exist, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hamta"


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (absolute names)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def hamta_imports(module: str) -> set[str]:
    return {name for name in imports_of(PACKAGE / f"{module}.py") if name.startswith("hamta")}


def test_the_relay_never_imports_the_cluster_fencing_or_chaos() -> None:
    for path in PACKAGE.glob("*.py"):
        if path.name == "cli.py":  # the command dispatches to every package
            continue
        for name in imports_of(path):
            assert name.split(".")[0] not in {"cluster", "fencing", "chaos"}, (path, name)


def test_the_spool_stands_alone() -> None:
    assert hamta_imports("spool") == set()


@pytest.mark.parametrize("module", ["queue", "dsn", "metrics", "spool"])
def test_pure_modules_do_no_network_io(module: str) -> None:
    forbidden = {"aiosmtplib", "aiohttp", "aiosmtpd", "socket", "subprocess"}
    assert not {n.split(".")[0] for n in imports_of(PACKAGE / f"{module}.py")} & forbidden


def test_nothing_imports_the_cli() -> None:
    for path in PACKAGE.glob("*.py"):
        if path.name != "cli.py":
            assert "hamta.cli" not in imports_of(path), path
