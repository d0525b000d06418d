"""What every part of the failover benchmark shares: its error, its output, its waits, its pace."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

import cluster
from cluster.lab.topology import CLIENT, DOMAIN

T = TypeVar("T")

DEFAULT_PREFIX: Final = "hbf"
DEFAULT_SUBNET: Final = "198.18.8.0/24"
# The client host answers no SMTP: mail for it is refused at connect and stays queued.
DEAD_HOST: Final = CLIENT
DEAD_DOMAIN: Final = f"{DEAD_HOST}.{DOMAIN}"
QUIET_RETRY: Final = {"first_delay": "30m", "max_delay": "4h"}
UP_TIMEOUT: Final = 120.0
TAKEOVER_TIMEOUT: Final = 60.0
STANDBY_TIMEOUT: Final = 60.0
FIRST_ACK_TIMEOUT: Final = 30.0
DRAIN_TIMEOUT: Final = 90.0
SWITCHOVER_TIMEOUT: Final = 30.0
SETTLE_MARGIN: Final = 1.0  # beyond min_failover_interval, for the takeover's own publishing
AGENT_STOP_GRACE: Final = 20.0
POLL: Final = 0.05
# The Vagrant cluster under TCG: an agent's restart imports hamta for 20-30 s, a machine boots
# in about a minute, one ssh round trip takes a second or more.
VAGRANT_TIMEOUT: Final = 300.0
VAGRANT_STANDBY_TIMEOUT: Final = 900.0
VAGRANT_SWITCHOVER_TIMEOUT: Final = 120.0
VAGRANT_DRAIN_TIMEOUT: Final = 600.0
VAGRANT_QUEUED: Final = 200


class BenchError(Exception):
    """The benchmark could not run or produced no valid measurement."""


def say(text: str = "") -> None:
    """Print one human-readable line (stdout, flushed)."""
    print(text, flush=True)


def wait_for(check: Callable[[], T | None], timeout: float, interval: float = POLL) -> T | None:
    """What ``check`` returns first that is not None, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(interval)


def lab_env() -> dict[str, str]:
    """The environment of the Python commands run inside the lab (the project importable)."""
    env = dict(os.environ)
    root = str(Path(cluster.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop("LD_PRELOAD", None)  # no fsync-eaters: both relays must be durable
    return env


def tail(path: Path, lines: int = 10) -> str:
    """The last ``lines`` lines of a log, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
