"""The arrows of docs/architecture.md that must never exist, checked on every folder's source."""

from __future__ import annotations

import argparse
import ast
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hamtactl

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hamta"

# Every folder of Python source, checked below; the tests themselves import whatever they test.
# A new folder fails test_every_folder_is_checked until it is given its place here.
FOLDERS = (
    "hamta",
    "hamtactl",
    "cluster",
    "cluster/lab",
    "fencing",
    "chaos",
    "bench",
    "monitor",
    "monitor/checks",
    "monitor/notifiers",
    "tests/support",
)
UNCHECKED = ("tests",)
LEFT_OUT = {"var", "build", "__pycache__", "test-artifacts", "fuzz-findings"}


@functools.cache
def imports_of(path: Path) -> frozenset[str]:
    """Every module a file imports (absolute names), inside functions too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return frozenset(names)


def sources(*folders: str) -> list[Path]:
    """The Python files of ``folders`` (each folder alone, not its sub-folders)."""
    return [path for folder in folders for path in sorted((ROOT / folder).glob("*.py"))]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


# The command line: the dispatcher and the command modules its table names.
COMMAND_LINE = {"hamtactl", *hamtactl.COMMANDS.values()}


def is_command_line(path: Path) -> bool:
    name = module_name(path)
    return name.split(".")[0] == "hamtactl" or name in COMMAND_LINE


def test_every_folder_is_checked() -> None:
    found = set()
    for folder, subfolders, files in os.walk(ROOT):
        # Not the virtualenv, the caches, git, nor what runs leave behind.
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in LEFT_OUT]
        if any(name.endswith(".py") for name in files):
            found.add(str(Path(folder).relative_to(ROOT)))
    assert found == set(FOLDERS) | set(UNCHECKED)


def test_the_relay_never_imports_the_cluster_fencing_chaos_or_the_command_line() -> None:
    for path in sources("hamta"):
        for name in imports_of(path):
            assert name.split(".")[0] not in {"cluster", "fencing", "chaos", "hamtactl"}, (
                path,
                name,
            )


def hamta_imports(module: str) -> set[str]:
    return {name for name in imports_of(PACKAGE / f"{module}.py") if name.startswith("hamta")}


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
        ("hamta/durable_files.py", "RWF_DSYNC"),  # append_synced: write and sync in one call
    }
    found = set()
    for package in ("hamta", "cluster", "fencing", "chaos", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Attribute) and node.attr in {
                    "fsync",
                    "fdatasync",
                    "RWF_DSYNC",
                    "RWF_SYNC",
                    "O_DSYNC",
                    "O_SYNC",
                }:
                    found.add((str(path.relative_to(ROOT)), node.attr))
    assert found == allowed


@pytest.mark.parametrize("module", ["queue", "dsn", "metrics", *SPOOL_MODULES])
def test_pure_modules_do_no_network_io(module: str) -> None:
    forbidden = {"aiosmtplib", "aiohttp", "aiosmtpd", "socket", "subprocess"}
    assert not {n.split(".")[0] for n in imports_of(PACKAGE / f"{module}.py")} & forbidden


def test_nothing_imports_the_dispatcher() -> None:
    for path in sources(*FOLDERS):
        if module_name(path).split(".")[0] != "hamtactl":
            assert not {n for n in imports_of(path) if n.split(".")[0] == "hamtactl"}, path


def test_only_the_command_line_imports_the_chaos_suite() -> None:
    for path in sources(*FOLDERS):
        if path.parent.name == "chaos" or is_command_line(path):
            continue
        for name in imports_of(path):
            assert name.split(".")[0] != "chaos", (path, name)


def test_the_agent_never_imports_the_lab() -> None:
    # The lab drives agents from outside, as an operator's machines would; the agent's command
    # line may still find a running lab for operators.
    for path in sources("cluster"):
        if is_command_line(path):
            continue
        for name in imports_of(path):
            assert not name.startswith("cluster.lab"), (path, name)


@pytest.mark.parametrize("path", sources("fencing", "hamtactl"), ids=module_name)
def test_standard_library_only(path: Path) -> None:
    # fencing: the agent uses it, it knows nothing of the agent, the relay or the lab.
    # hamtactl: it imports a command module only through its table, when the command is used.
    # The decision modules are checked, more strictly, below (DECISIONS).
    own = module_name(path).split(".")[0]
    for name in imports_of(path):
        root = name.split(".")[0]
        assert root in sys.stdlib_module_names or root == own, (path, name)


def sub_commands(parser: argparse.ArgumentParser) -> set[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(actions[0].choices)


def test_the_dispatcher_table_names_what_each_module_registers() -> None:
    for module in set(hamtactl.COMMANDS.values()):
        owned = {word for word, owner in hamtactl.COMMANDS.items() if owner == module}
        assert sub_commands(hamtactl.build_parser([module])) == owned, module


def test_the_dispatcher_loads_the_owner_of_the_first_word_only() -> None:
    assert hamtactl.modules_for(["serve", "--standby"]) == ["hamta.serve"]
    assert hamtactl.modules_for(["drbd", "fence-peer"]) == ["cluster.commands"]
    everything = list(dict.fromkeys(hamtactl.COMMANDS.values()))
    assert hamtactl.modules_for(["--help"]) == everything
    assert hamtactl.modules_for([]) == everything


def test_hamta_serve_loads_nothing_of_the_cluster_fencing_or_chaos() -> None:
    # What hamtactl.main does before it calls the command; no module of hamta imports those
    # packages, even inside a function (checked above), so nothing the relay runs later can.
    code = (
        "import sys, hamtactl\n"
        "argv = ['serve', '--standby']\n"
        "hamtactl.build_parser(hamtactl.modules_for(argv)).parse_args(argv)\n"
        "print('\\n'.join(sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    modules = done.stdout.split()
    assert "hamta.serve" in modules and "hamta.relay" in modules  # the command is there
    assert not [m for m in modules if m.split(".")[0] in {"cluster", "fencing", "chaos"}]


# The lab's STONITH and DRBD's fast fence-peer handler run inside every takeover: the packages
# around them import nothing.
@pytest.mark.parametrize("module", ["cluster.lab.fence", "cluster.fence_marker"])
def test_the_takeover_s_helpers_start_on_the_standard_library(module: str) -> None:
    code = (
        f"import sys\nbefore = set(sys.modules)\nimport {module}\n"
        "print('\\n'.join(set(sys.modules) - before))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    roots = {name.split(".")[0] for name in done.stdout.split()}
    assert roots - set(sys.stdlib_module_names) == {"cluster"}, roots


# The decision modules: every decision of the agent is testable with plain data. They import
# the standard library and each other only (state: the table; takeover: who may take over and
# what to fence; decision_data: what they decide over and return; gray_failure: what the check
# locations see; failsafe: the leases).
DECISIONS = ["state", "takeover", "decision_data", "watchdog_policy", "gray_failure", "failsafe"]


@pytest.mark.parametrize("module", DECISIONS)
def test_the_decision_modules_use_the_standard_library_only(module: str) -> None:
    path = ROOT / "cluster" / f"{module}.py"
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in {"__import__", "open", "exec", "eval"}
    own = {f"cluster.{other}" for other in DECISIONS}
    roots = {name.split(".")[0] for name in imports_of(path) - own}
    assert roots, "the parse found no imports at all"
    assert roots <= sys.stdlib_module_names
    forbidden = {"kazoo", "pyroute2", "asyncio", "subprocess", "socket", "time", "os", "threading"}
    assert not roots & forbidden


def test_the_relay_never_imports_the_monitor() -> None:
    # The monitor watches the relay from outside and may read hamta's modules; never the reverse.
    for path in PACKAGE.rglob("*.py"):
        for name in imports_of(path):
            assert name.split(".")[0] != "monitor", (path, name)


# The monitor's pure parts: verdicts (state from observations), uptime (figures from the state
# changes), incidents and escalation, maintenance windows. Plain data in and out, no clock read,
# no I/O: the standard library and each other only, like the agent's decision modules.
MONITOR_PURE = ["verdicts", "uptime", "incidents", "maintenance", "failover_rules"]


@pytest.mark.parametrize("module", MONITOR_PURE)
def test_the_monitor_s_pure_modules_use_the_standard_library_only(module: str) -> None:
    path = ROOT / "monitor" / f"{module}.py"
    own = {f"monitor.{other}" for other in MONITOR_PURE}
    roots = {name.split(".")[0] for name in imports_of(path) - own}
    assert roots and roots <= sys.stdlib_module_names, roots
    forbidden = {"asyncio", "socket", "time", "os", "sqlite3", "subprocess", "threading"}
    assert not roots & forbidden, roots


def test_the_monitor_reads_the_cluster_but_never_the_lab_chaos_or_the_command_line() -> None:
    # The monitor knows the cluster (monitor.cluster_link reads its znodes with the agent's own
    # coordinator and config models); the lab, chaos and the dispatcher stay out of it.
    for path in sources("monitor", "monitor/checks", "monitor/notifiers"):
        for name in imports_of(path):
            assert not name.startswith(("cluster.lab", "chaos", "hamtactl")), (path, name)
            if name.split(".")[0] == "cluster":
                assert module_name(path) in {"monitor.cluster_link", "monitor.config"}, (
                    path,
                    name,
                )


def test_the_tls_policy_decision_uses_the_standard_library_only() -> None:
    # hamta.tls_policy decides what TLS a session needs from plain data (docs/tls-policy.md):
    # the lookups (hamta.dane, hamta.mta_sts) and the handshake stay in the I/O modules.
    roots = {name.split(".")[0] for name in imports_of(PACKAGE / "tls_policy.py")}
    assert roots and roots <= sys.stdlib_module_names, roots
    forbidden = {"asyncio", "socket", "ssl", "time", "os", "subprocess"}
    assert not roots & forbidden, roots
