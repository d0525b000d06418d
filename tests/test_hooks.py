"""The role-change hooks with real scripts: one records its environment, one fails, one hangs
(and forks a child that would outlive it), run by ``cluster.hooks`` through fencing.process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cluster.hooks import HookRefusedError, Hooks, RoleChange
from hamta.eventlog import get_logger

CHANGE = RoleChange("alpha", "passive", "active", 7, "198.18.0.100/24", "leader vacant")


def script(directory: Path, name: str, body: str) -> list[str]:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return [str(path)]


def hooks(
    pre_promote: list[str] = [],  # noqa: B006 - never mutated
    on_role_change: list[str] = [],  # noqa: B006
    post_demote: list[str] = [],  # noqa: B006
    timeout: float = 5.0,
) -> Hooks:
    return Hooks(
        pre_promote=pre_promote,
        on_role_change=on_role_change,
        post_demote=post_demote,
        timeout=timeout,
        log=get_logger(component="agent"),
    )


def test_a_hook_gets_the_change_in_its_environment(tmp_path: Path) -> None:
    out = tmp_path / "env"
    command = script(tmp_path, "record", f'env | grep ^HAMTA_ | sort > {out}\necho "go"\n')
    with capture_logs() as logs:
        detail = asyncio.run(hooks(pre_promote=command).pre_promote(CHANGE))
    assert detail == "pre_promote said go"
    assert out.read_text().splitlines() == [
        "HAMTA_EPOCH=7",
        "HAMTA_NEW_ROLE=active",
        "HAMTA_NODE=alpha",
        "HAMTA_OLD_ROLE=passive",
        "HAMTA_REASON=leader vacant",
        "HAMTA_VIP=198.18.0.100/24",
    ]
    (line,) = [entry for entry in logs if entry["event"] == "Hook"]
    assert line["hook"] == "pre_promote" and line["exit"] == 0 and line["stdout"] == "go"


def test_a_failing_pre_promote_refuses_with_its_last_words(tmp_path: Path) -> None:
    command = script(tmp_path, "no", 'echo "array degraded: no promotion" >&2\nexit 3\n')
    with capture_logs() as logs, pytest.raises(HookRefusedError) as refused:
        asyncio.run(hooks(pre_promote=command).pre_promote(CHANGE))
    assert str(refused.value) == "pre_promote exited 3: array degraded: no promotion"
    (line,) = [entry for entry in logs if entry["event"] == "Hook"]
    assert line["log_level"] == "warning" and line["exit"] == 3
    assert line["stderr"] == "array degraded: no promotion"


def test_a_hung_hook_is_killed_at_its_limit_with_what_it_forked(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    # The child would hold on after its parent: the whole process group goes.
    command = script(tmp_path, "hang", f"sleep 60 &\necho $! > {pid_file}\nwait\n")
    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(HookRefusedError) as refused:
        asyncio.run(hooks(pre_promote=command, timeout=0.5).pre_promote(CHANGE))
    assert time.monotonic() - started < 3.0
    assert str(refused.value) == "pre_promote killed at its 0.5s limit"
    (line,) = [entry for entry in logs if entry["event"] == "Hook"]
    assert line["log_level"] == "error" and line["exit"] is None
    child = int(pid_file.read_text())
    assert not alive(child)


def alive(pid: int) -> bool:
    """Running (a killed child reparented to init may stay a zombie a moment: that is dead)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def test_a_missing_program_refuses_the_promotion(tmp_path: Path) -> None:
    with pytest.raises(HookRefusedError, match="cannot start"):
        asyncio.run(hooks(pre_promote=[str(tmp_path / "absent")]).pre_promote(CHANGE))


def test_role_change_hooks_never_wait_and_run_in_order(tmp_path: Path) -> None:
    record = tmp_path / "record"
    on_change = script(
        tmp_path, "change", f'sleep 0.3\necho "$HAMTA_OLD_ROLE>$HAMTA_NEW_ROLE" >> {record}\n'
    )
    demoted = script(tmp_path, "demoted", f'echo "post_demote $HAMTA_EPOCH" >> {record}\n')

    async def main() -> tuple[float, list[str]]:
        runner = hooks(on_role_change=on_change, post_demote=demoted)
        serving = asyncio.create_task(runner.serve())
        started = time.monotonic()
        runner.role_changed(RoleChange("alpha", "active", "demoting", 7, "", "switchover"))
        runner.role_changed(RoleChange("alpha", "demoting", "passive", 7, "", "passive after 1s"))
        queued = time.monotonic() - started
        await runner.drain()
        serving.cancel()
        return queued, record.read_text().splitlines()

    with capture_logs() as logs:
        queued, lines = asyncio.run(main())
    assert queued < 0.05  # the decision loop goes on at once
    assert lines == ["active>demoting", "demoting>passive", "post_demote 7"]
    ran: list[Any] = [entry["hook"] for entry in logs if entry["event"] == "Hook"]
    assert ran == ["on_role_change", "on_role_change", "post_demote"]


def test_no_hook_configured_runs_nothing() -> None:
    runner = hooks()
    assert asyncio.run(runner.pre_promote(CHANGE)) == "no pre_promote hook"
    runner.role_changed(CHANGE)
    assert runner._queue.empty()
