"""The agent's CPU priority: ahead of batch work, so that a CPU hog cannot silence it.

A peer fences a leader whose heartbeats stop for ``peer_timeout`` (the fast takeover), and the
watchdog stops a relay whose agent does not feed it: both read a starved agent as a dead one.
On a shared machine under load (bench/soak.py: stress-ng beside the client load), an agent at
the default priority was starved for over a second at once, its heartbeat thread with it (the
GIL's holder waits for a core too), and its peer fenced it: a false failover. HA stacks raise
their membership daemons for this reason (corosync runs them real-time). The agent sets its nice
value before it starts any thread, so every thread of it and every process it starts (the relay,
the watchdog, fence agents, hooks) inherit it. Standard library only.
"""

from __future__ import annotations

import os


def raise_priority(nice: int) -> str | None:
    """Give this process (and what it starts from now on) the nice value ``nice``.

    Returns None when done, or why not (lowering a nice value needs CAP_SYS_NICE, as root has):
    the agent then runs at the priority it was given, and says so in its log.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        return f"cannot set the nice value to {nice}: {exc.strerror} (needs CAP_SYS_NICE)"
    return None
