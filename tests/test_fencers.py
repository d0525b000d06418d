"""The agent's fencers against real programs: plain commands run like the fencing package's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from cluster.fencers import CommandFencer, FenceFailedError

# Forks a helper that keeps the output pipe open, records both pids, then hangs: the fence tool
# stuck on a dead BMC whose helper would outlive a kill of the tool alone.
HANGING_WITH_A_CHILD = """
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "30"])
with open(sys.argv[1], "w") as pids:
    pids.write(f"{os.getpid()} {child.pid}")
time.sleep(30)
"""


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _all_dead(pids: list[int]) -> bool:
    """Whether every pid is gone, allowing a moment for a SIGKILL to land."""
    deadline = time.monotonic() + 2
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _pids(path: Path) -> list[int]:
    deadline = time.monotonic() + 5
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, "the fence command never started"
        time.sleep(0.01)
    return [int(pid) for pid in path.read_text().split()]


@pytest.fixture
def hanging(tmp_path: Path) -> tuple[Path, Path]:
    """The hanging fence command and the file its pids go to."""
    return _script(tmp_path / "fence_hang", HANGING_WITH_A_CHILD), tmp_path / "pids"


def _kill_left(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def test_a_fence_command_over_its_limit_is_killed_with_its_children(
    hanging: tuple[Path, Path],
) -> None:
    script, pids_file = hanging
    fencer = CommandFencer([[str(script), str(pids_file)], ["true", "{peer}"]])
    started = time.monotonic()
    detail = asyncio.run(fencer.fence("node2", 7, 0.5))
    assert time.monotonic() - started < 3
    assert detail == "fenced node2 with true"
    pids = _pids(pids_file)
    try:
        assert _all_dead(pids), "a fence program outlived its limit"
    finally:
        _kill_left(pids)


def test_an_abandoned_fence_step_leaves_no_fence_program_running(
    hanging: tuple[Path, Path],
) -> None:
    script, pids_file = hanging

    async def abandon() -> None:
        task = asyncio.create_task(CommandFencer([[str(script), str(pids_file)]]).fence("n", 1, 30))
        await asyncio.to_thread(_pids, pids_file)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(abandon())
    pids = _pids(pids_file)
    try:
        assert _all_dead(pids), "the step was abandoned, its fence was not"
    finally:
        _kill_left(pids)


def test_every_failure_is_reported_in_order(tmp_path: Path) -> None:
    failing = _script(
        tmp_path / "fence_refused",
        "import sys\nprint('Connecting to BMC')\nprint('Unable to connect', file=sys.stderr)\n"
        "sys.exit(1)",
    )
    fencer = CommandFencer([[str(failing)], ["hvt-no-such-fence"]])
    with pytest.raises(FenceFailedError) as failed:
        asyncio.run(fencer.fence("node2", 7, 5))
    assert str(failed.value) == (
        f"{failing}: exit 1 Unable to connect; hvt-no-such-fence not installed"
    )
    with pytest.raises(FenceFailedError, match="no fence agent or command configured"):
        asyncio.run(CommandFencer([]).fence("node2", 7, 5))
