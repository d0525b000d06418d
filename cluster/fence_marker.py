"""DRBD's fast fence-peer path: a local, term-stamped marker the promoting agent writes itself.

During a takeover ``drbdadm primary`` waits for DRBD's ``fence-peer`` handler whenever the peer's
disk is unknown (its machine is down). The full handler (``hamta drbd fence-peer``) imports the
configuration and kazoo and asks ZooKeeper; under TCG its start alone took ~7 s of an 8.6 s
storage step. Yet the promoting agent already knows the answer: it leads in epoch E and has
fenced the peer. So, before ``drbdadm primary``, the agent marks the peer outdated in ZooKeeper
itself (the same epoch-guarded transaction the full handler makes), then writes a marker here
(durably), and DRBD's handler — this module, standard library only — answers from it:

- exit 4 ("peer fenced") only when the marker names this resource and DRBD's peer, its term is
  the node's current term (the ``term`` file the agent writes when it takes leadership), and it
  is fresh (written less than its validity ago, never in the future);
- otherwise (no marker, stale, another term, unreadable, another peer) it executes the full
  handler given after ``--``, which asks ZooKeeper as before.

Why a stale marker cannot let a split brain through: the marker is written only after the ZooKeeper
mark succeeded, and that mark stays until a resync made the peer current (``after-resync-target``),
so while any marker exists, the peer's agent refuses to take over (``takeover_refusal``) and the
answer "peer outdated" is true of the cluster, whoever leads by then. The term and freshness
checks only keep the fast path to the promotion that wrote it (docs/fencing.md, layer 5).

Usage, as DRBD's handler (``DRBD_RESOURCE`` and ``DRBD_PEER`` come from drbdadm)::

    python3 -m cluster.fence_marker --dir /var/lib/hamta/drbd-fence -- \
        /opt/hamta/bin/hamta drbd fence-peer --config /etc/hamta/agent.toml
"""

from __future__ import annotations

import json
import os
import sys
import syslog
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

EXIT_PEER_OUTDATED = 4  # DRBD's "peer has been successfully fenced" (its value 4: outdated)
TERM_FILE = "term"


def marker_name(resource: str) -> str:
    """The marker's file name for a DRBD resource."""
    return f"{resource}.fenced"


@dataclass(frozen=True)
class Marker:
    """What the agent recorded: in ``term``, ``peer`` of ``resource`` is marked outdated."""

    term: int
    resource: str
    peer: str
    written: float  # wall clock, seconds
    valid: float  # seconds after ``written`` during which the handler may answer from it

    def encode(self) -> bytes:
        """The marker's file content (JSON)."""
        fields = {"term": self.term, "resource": self.resource, "peer": self.peer}
        return json.dumps({**fields, "written": self.written, "valid": self.valid}).encode()


def _read_json(path: Path) -> object:
    return json.loads(path.read_bytes())


def read_marker(path: Path) -> Marker:
    """The marker at ``path``; ``ValueError`` or ``OSError`` when missing or malformed."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    term, resource, peer = data.get("term"), data.get("resource"), data.get("peer")
    written, valid = data.get("written"), data.get("valid")
    if not (isinstance(term, int) and isinstance(resource, str) and isinstance(peer, str)):
        raise ValueError("term, resource or peer missing")
    if not (isinstance(written, int | float) and isinstance(valid, int | float)):
        raise ValueError("written or valid missing")
    return Marker(term, resource, peer, float(written), float(valid))


def read_term(directory: Path) -> int:
    """The node's current term (the epoch of its last leadership), as the agent recorded it."""
    data = _read_json(directory / TERM_FILE)
    if not isinstance(data, dict) or not isinstance(data.get("term"), int):
        raise ValueError("no term")
    term: int = data["term"]
    return term


def verdict(directory: Path, environ: Mapping[str, str], now: float) -> tuple[bool, str]:
    """Whether the peer may be reported fenced from the marker, and why (or why not)."""
    resource = environ.get("DRBD_RESOURCE", "")
    if not resource:
        return False, "no DRBD_RESOURCE"
    path = directory / marker_name(resource)
    try:
        marker = read_marker(path)
        term = read_term(directory)
    except FileNotFoundError as exc:
        return False, f"no {Path(exc.filename or path).name} in {directory}"
    except (OSError, ValueError) as exc:
        return False, f"unreadable marker in {directory}: {exc}"
    peer = environ.get("DRBD_PEER", "")
    if marker.resource != resource or (peer and marker.peer != peer):
        return False, f"the marker is for {marker.peer} of {marker.resource}, not {peer or '?'}"
    if marker.term != term:
        return False, f"the marker's term {marker.term} is not the current term {term}"
    age = now - marker.written
    if age < 0 or age > marker.valid:
        return False, f"stale marker of term {term} ({age:.1f}s old, {marker.valid:g}s valid)"
    return True, f"{marker.peer} marked outdated for {resource} in term {term} ({age:.1f}s ago)"


def _log(message: str) -> None:
    # As the full handler: DRBD gives its handlers no standard streams; the journal keeps why.
    if sys.stderr is not None:
        print(message, file=sys.stderr)
    syslog.openlog("hamta-drbd", syslog.LOG_PID, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_NOTICE, message)


def main(argv: Sequence[str] | None = None) -> int:
    """Answer 4 from a valid marker, else execute the full handler given after ``--``."""
    words = list(sys.argv[1:] if argv is None else argv)
    if len(words) < 4 or words[0] != "--dir" or words[2] != "--":
        usage = "usage: python3 -m cluster.fence_marker --dir DIR -- FULL-HANDLER..."
        print(usage, file=sys.stderr)
        return 1  # DRBD: "could not fence"; the peer is not reported outdated
    directory, fallback = Path(words[1]), words[3:]
    ok, why = verdict(directory, os.environ, time.time())
    if ok:
        _log(f"hamta drbd fence-peer (fast): {why} (exit {EXIT_PEER_OUTDATED})")
        return EXIT_PEER_OUTDATED
    _log(f"hamta drbd fence-peer (fast): {why}; asking ZooKeeper ({' '.join(fallback)})")
    try:
        os.execvp(fallback[0], fallback)
    except OSError as exc:
        _log(f"hamta drbd fence-peer (fast): cannot run {fallback[0]}: {exc} (exit 1)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
