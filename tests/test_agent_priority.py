"""``[agent] nice``: the agent's CPU priority, inherited by its threads and the processes it
starts (cluster.priority). Set in a child Python (the test's own process keeps its priority); a
raised nice value (5) needs no privilege, a lowered one (the default, -10) needs CAP_SYS_NICE."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster.config import ConfigError, parse_agent_config
from tests.test_agent_config import GOOD

CHILD = """
import os, subprocess, sys, threading
from cluster.priority import raise_priority
assert raise_priority(int(sys.argv[1])) is None
seen = []
thread = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
thread.start()
thread.join()
child = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"],
    capture_output=True, text=True, check=True,
)
print(os.getpriority(os.PRIO_PROCESS, 0), seen[0], child.stdout.strip())
"""


def test_the_agent_thread_its_later_threads_and_its_children_share_the_priority() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=os.environ,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5", "5", "5"]


def test_the_default_puts_the_agent_ahead_of_batch_work() -> None:
    assert parse_agent_config(GOOD).agent.nice == -10
    assert parse_agent_config(GOOD.replace("[agent]\n", "[agent]\nnice = 0\n")).agent.nice == 0


@pytest.mark.parametrize("value", ["-21", "20"])
def test_a_nice_value_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"agent.nice"):
        parse_agent_config(GOOD.replace("[agent]\n", f"[agent]\nnice = {value}\n"))
