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


CLUSTER = ROOT / "cluster"


def test_the_agent_never_imports_the_lab() -> None:
    for path in CLUSTER.glob("*.py"):
        if path.name == "cli.py":  # the command line finds a running lab for operators
            continue
        for name in imports_of(path):
            assert not name.startswith("cluster.lab"), (path, name)


def test_the_lab_is_imported_lazily_by_the_command_line() -> None:
    # hamta serve imports hamta.cli, which registers the lab's commands: the lab's heavy
    # modules (pyroute2, ZooKeeper helpers) must stay out of that import.
    for path in (CLUSTER / "lab" / "cli.py", CLUSTER / "cli.py", CLUSTER / "lab" / "__init__.py"):
        eager = top_level_imports(path)
        assert not {"cluster.lab.lab", "pyroute2", "kazoo", "cluster.zookeeper"} & eager, path


def top_level_imports(path: Path) -> set[str]:
    """The modules a file imports when it is imported (not inside functions or TYPE_CHECKING)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_fencing_stands_below_the_agent() -> None:
    # The agent uses fencing; fencing knows nothing of the agent, the lab or the chaos suite.
    for path in (ROOT / "fencing").glob("*.py"):
        for name in imports_of(path):
            assert name.split(".")[0] not in {"cluster", "chaos", "hamta"}, (path, name)


def test_nothing_but_the_command_imports_the_chaos_suite() -> None:
    for package in ("hamta", "cluster", "fencing"):
        for path in (ROOT / package).rglob("*.py"):
            if path == PACKAGE / "cli.py":
                continue
            for name in imports_of(path):
                assert name.split(".")[0] != "chaos", (path, name)


def test_the_relay_never_imports_the_monitor() -> None:
    # The monitor watches the relay from outside and may read hamta's modules; never the reverse.
    for path in PACKAGE.rglob("*.py"):
        for name in imports_of(path):
            assert name.split(".")[0] != "monitor", (path, name)
