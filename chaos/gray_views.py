"""What the gray failure scenarios look at: the active node's decisions in its agent's log, and
the check locations' verdicts on the service (``hamta monitor status`` through the lab)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence

from cluster.lab.lab import Lab


def gray_decisions(lab: Lab, node: str) -> list[str]:
    """The notes of ``node``'s gray failure decisions (its agent's log), in order."""
    notes = []
    try:
        lines = (lab.node_dir(node) / "agent.log").read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        if '"gray_failure' not in line:
            continue
        with contextlib.suppress(ValueError):
            fields = json.loads(line)
            if fields.get("event") == "Decision" and fields.get("trigger") == "gray_failure":
                notes.append(str(fields.get("note", "")))
    return notes


def vip_state(rows: Sequence[dict[str, object]] | None) -> str | None:
    """A location's state of the service check ``vip-smtp`` (None: not known)."""
    for row in rows or ():
        if row.get("name") == "vip-smtp":
            return str(row.get("state"))
    return None


VERDICTS_TIMEOUT = 30.0  # one `hamta monitor status` (a Python start) on a loaded machine


def service_up_everywhere(lab: Lab) -> bool:
    """Whether every check location's monitor sees the service up."""
    verdicts = lab.monitor_verdicts(VERDICTS_TIMEOUT)
    return bool(verdicts) and all(vip_state(rows) == "up" for rows in verdicts.values())
