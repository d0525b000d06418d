"""Where the cluster's records live in ZooKeeper, what they hold, and who may touch them.

Znodes, all under ``/hamta/<cluster>``, all JSON:

- ``members/<node>`` (ephemeral): each agent's heartbeat, a ``cluster.decision_data.Member``.
- ``leader`` (ephemeral): ``{"node", "epoch", "since"}``; its owner session is the leader.
- ``epoch`` (persistent): ``{"epoch", "node", "at"}``, the highest term ever taken and by whom.
- ``history`` (persistent): the last 50 failover records.
- ``served`` (persistent): ``{"epoch", "node", "at"}``, the last takeover that served (published).
- ``paused`` (persistent, present while paused): ``{"by", "at", "reason"}``.
- ``switchover`` (persistent, present while requested): ``{"source", "target", "at"}``.
- ``scheduled-switchover`` (persistent, present while scheduled): a ``ScheduledSwitchover``.
- ``nodes/<node>`` (persistent, empty): every node that ever joined, until an operator forgets it.
- ``outdated/<node>`` (persistent): a node whose DRBD replica missed writes, and in which epoch.
- ``split-brain`` (persistent, text): DRBD found the replicas diverged.
- ``monitors/<location>`` (ephemeral): each monitor's current verdicts (``monitor.cluster_link``).
- ``pulses/<node>`` (ephemeral): ``{"node", "epoch", "beat"}``, rewritten every
  ``peer_timeout / 4`` by a node that may hold the leader znode; its peer watches it advance
  (``cluster.coordination_pulse``) to tell a cut peer channel from a dead node.

The ``cluster.coordination.Coordinator`` reads and writes them (``cluster.coordination_*``).
"""

from __future__ import annotations

import stat as stat_module
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec
from kazoo.security import (
    ACL,
    Id,
    Permissions,
    make_digest_acl,
    make_digest_acl_credential,
)

ROOT: Final = "/hamta"
#: The node name of operator commands' sessions: they publish no member and are never fenced.
OPERATOR: Final = "operator"
HISTORY_LIMIT: Final = 50
# Writes guarded by a version are retried this many times against concurrent writers.
VERSION_RETRIES: Final = 20


class CoordinationError(Exception):
    """ZooKeeper could not be reached, refused access, or did not answer in time."""


@dataclass(frozen=True)
class Credentials:
    """The cluster's ZooKeeper digest user: the only identity allowed on its znodes."""

    user: str
    password: str = field(repr=False)

    @classmethod
    def from_file(cls, path: Path) -> Credentials:
        """Read ``user:password`` (one line) from a file only its owner can read."""
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise CoordinationError(f"ZooKeeper credentials file {path} does not exist") from None
        except OSError as exc:
            raise CoordinationError(f"ZooKeeper credentials file {path}: {exc}") from exc
        if mode & 0o077:
            raise CoordinationError(
                f"ZooKeeper credentials file {path} is accessible to group or others "
                f"(mode {stat_module.S_IMODE(mode):04o}); make it private: chmod 600 {path}"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CoordinationError(f"ZooKeeper credentials file {path}: {exc}") from exc
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        user, colon, password = lines[0].partition(":") if len(lines) == 1 else ("", "", "")
        if not (user and colon and password):
            # Never echo the content: it may hold a password.
            raise CoordinationError(
                f"ZooKeeper credentials file {path} must hold exactly one line 'user:password'"
            )
        return cls(user, password)

    @property
    def auth(self) -> tuple[str, str]:
        """The (scheme, credential) pair kazoo sends at every connection."""
        return ("digest", f"{self.user}:{self.password}")

    @property
    def digest_id(self) -> str:
        """``user:hash``, as an ACL names this user (no secret: the hash of the password)."""
        return str(make_digest_acl_credential(self.user, self.password))

    def acl(self, readers: Sequence[str] = ()) -> list[ACL]:
        """Every permission for this user, READ for each reader (``user:hash``), none for others.

        The readers are the fleet's (``agent.fleet_reader``): they may read every pair of the
        ensemble and change none (docs/fleet.md).
        """
        return [make_digest_acl(self.user, self.password, all=True), *reader_acl(readers)]


def reader_acl(readers: Sequence[str]) -> list[ACL]:
    """READ, and nothing else, for each digest identity ``user:hash`` of ``readers``."""
    return [ACL(Permissions.READ, Id("digest", reader)) for reader in readers]


class LeaderRecord(msgspec.Struct):
    node: str
    epoch: int
    since: float


class EpochRecord(msgspec.Struct):
    epoch: int = 0
    node: str | None = None
    at: float | None = None  # when the term was taken (wall clock of the taker)


class PulseRecord(msgspec.Struct):
    """A node's pulse: what changes matters (each write is an advance), the rest is for people
    reading ZooKeeper."""

    node: str
    epoch: int
    beat: int  # writes so far by this agent


class ServedRecord(msgspec.Struct):
    """The last takeover that served (its promotion published: ACTIVE), whichever term it was."""

    epoch: int
    node: str
    at: float


@dataclass(frozen=True)
class Paths:
    """The path of each znode of one cluster, whose root is ``root``."""

    root: str

    @property
    def members(self) -> str:
        return f"{self.root}/members"

    @property
    def leader(self) -> str:
        return f"{self.root}/leader"

    @property
    def epoch(self) -> str:
        return f"{self.root}/epoch"

    @property
    def history(self) -> str:
        return f"{self.root}/history"

    @property
    def paused(self) -> str:
        return f"{self.root}/paused"

    @property
    def switchover(self) -> str:
        return f"{self.root}/switchover"

    @property
    def nodes(self) -> str:
        return f"{self.root}/nodes"

    @property
    def scheduled_switchover(self) -> str:
        return f"{self.root}/scheduled-switchover"

    @property
    def outdated(self) -> str:
        return f"{self.root}/outdated"

    @property
    def split_brain(self) -> str:
        return f"{self.root}/split-brain"

    @property
    def served(self) -> str:
        return f"{self.root}/served"

    def outdated_node(self, node: str) -> str:
        return f"{self.outdated}/{node}"

    def member(self, node: str) -> str:
        return f"{self.members}/{node}"

    def known(self, node: str) -> str:
        return f"{self.nodes}/{node}"

    @property
    def monitors(self) -> str:
        return f"{self.root}/monitors"

    def monitor(self, location: str) -> str:
        return f"{self.monitors}/{location}"

    @property
    def pulses(self) -> str:
        return f"{self.root}/pulses"

    def pulse(self, node: str) -> str:
        return f"{self.pulses}/{node}"


def check_name(kind: str, name: str) -> None:
    """Refuse a name that would not be one znode's (a cluster, node or location name)."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"invalid {kind} name for a znode: {name!r}")
