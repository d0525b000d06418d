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


SPOOL_MODULES = ("spool", "spool_format", "spool_recovery")


@pytest.mark.parametrize("module", SPOOL_MODULES)
def test_the_spool_stands_alone(module: str) -> None:
    # Its three modules and its durable writes (hamta.durable_files: standard library only).
    allowed = {f"hamta.{name}" for name in SPOOL_MODULES} | {"hamta.durable_files"}
    assert hamta_imports(module) <= allowed - {f"hamta.{module}"}
    assert hamta_imports("durable_files") == set()


def test_only_durable_files_and_the_spools_group_commit_sync_files() -> None:
    # One place for write, fsync the file, fsync its directory: any other fsync is a copy of
    # it, and copies are where a step goes missing (activations.jsonl, DKIM keys did).
    allowed = {
        ("hamta/durable_files.py", "fsync"),
        ("hamta/spool.py", "fdatasync"),  # the hot path: batches appended to open segments
        ("hamta/epoch_token.py", "fsync"),  # one block rewritten in place (O_DIRECT readers)
    }
    found = set()
    for package in ("hamta", "cluster", "fencing", "chaos", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and node.attr in {"fsync", "fdatasync"}:
                    found.add((str(path.relative_to(ROOT)), node.attr))
    assert found == allowed


@pytest.mark.parametrize("module", ["queue", "dsn", "metrics", *SPOOL_MODULES])
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
