"""The spool's own record of its takeovers: which node activated on it, in which epoch, when.

Kept in the spool directory, so it moves with the spool on failover: whichever node is active
can show the last takeovers of every node (the dashboard's "last failovers"). One JSON line per
activation, appended and fsynced by worker 0 once its queue is recovered. It is a record for
people, not state: a line that cannot be written is logged and the relay serves on.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

from hamta.durable_files import append_durably

FILE = "activations.jsonl"


def record(spool: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` as one line and make it durable (OSError when that fails)."""
    line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
    append_durably(spool / FILE, line, mode=0o640)


def recent(spool: Path, limit: int = 20) -> list[dict[str, Any]]:
    """The last ``limit`` activations, newest first; lines cut short by a crash are skipped."""
    try:
        with open(spool / FILE, "rb") as lines:
            tail = deque(lines, maxlen=limit)
    except FileNotFoundError:
        return []
    entries = []
    for line in reversed(tail):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries
