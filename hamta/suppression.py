"""The suppression list: recipients the relay refuses at RCPT, kept on the spool volume.

A recipient lands here after a hard bounce of the InvalidRecipient class, after a complaint (an
ARF feedback report, :mod:`hamta.complaints`) or by an operator's ``hamta suppression add``; mail
to it is then refused at RCPT with a 5xx that says why and since when.

Why SQLite, in ``suppression.sqlite`` at the root of the spool. The list moves with the spool's
volume on failover, so the new primary refuses the same recipients. Adds and removes come from
the relay and from an operator's CLI while the relay is down, and a node with several workers
has several processes reading and writing it: SQLite gives all of them one consistent view with
no reload protocol of our own, atomic transactions (a crash leaves the previous or the next state,
never a torn line), removal without compaction, and a lookup by primary key in microseconds. An
append-only file would have needed all of that written by hand. Durability: WAL with
``synchronous=FULL``, so a commit is fsynced before it returns, and a complaint is acknowledged
(250) only after that. Lookups run on the event loop (an indexed read from the page cache);
writes run in one thread of their own, as their fsync can take milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FILE_NAME = "suppression.sqlite"
REASONS = ("hard-bounce", "complaint", "manual", "domain-failure")
# The bounce class (hamta.bounce_classes) whose recipients are suppressed.
SUPPRESSED_BOUNCE_CLASS = "InvalidRecipient"
# The class of a domain-level failure, suppressed only when it goes on (DomainFailurePolicy).
DOMAIN_BOUNCE_CLASS = "BadDomain"
# Complaint counters get a label of their own for the domains ranked this high, "other" else.
TOP_DOMAINS = 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppression (
    address TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    created REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    expires REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS domain_failure (
    address TEXT PRIMARY KEY,
    first REAL NOT NULL,
    last REAL NOT NULL,
    failures INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS complaint_domain (
    domain TEXT PRIMARY KEY,
    complaints INTEGER NOT NULL
) WITHOUT ROWID;
"""


# Lists written before entries could expire have no ``expires`` column: added at open.
_MIGRATIONS = {"expires": "ALTER TABLE suppression ADD COLUMN expires REAL"}
_COLUMNS = "address, reason, created, detail, expires"


@dataclass(frozen=True, slots=True)
class DomainFailurePolicy:
    """When a recipient whose domain keeps failing (NXDOMAIN, null MX, no route) is suppressed.

    A DNS answer says nothing about one mailbox, and a destination's DNS outage must not
    suppress its real users: such failures bounce, but suppress only once they have gone on for
    ``period`` seconds (at least two of them), and then only for ``expiry`` seconds.
    """

    period: float = 3 * 86400.0
    expiry: float = 30 * 86400.0


class SuppressionError(Exception):
    """The suppression list cannot be opened or written."""


def normalize(address: str) -> str:
    """The form an address is kept and looked up in: stripped of <>, lower-cased.

    Local parts are case-sensitive in theory (RFC 5321 2.4) and case-insensitive at every
    mailbox provider in practice; a suppression that misses on case defeats its purpose.
    """
    return address.strip().strip("<>").strip().lower()


def valid_address(address: str) -> bool:
    """Does this look like local@domain (what RCPT accepts)?"""
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain) and not any(c.isspace() or c in "<>" for c in address)


@dataclass(frozen=True, slots=True)
class Suppression:
    """One suppressed recipient: why, since when (wall clock) and the evidence."""

    address: str
    reason: str
    created: float
    detail: str = ""
    expires: float | None = None  # wall clock; None: until removed

    @property
    def date(self) -> str:
        """The day it was suppressed, UTC, as in the RCPT reply."""
        return datetime.fromtimestamp(self.created, UTC).strftime("%Y-%m-%d")

    def reply(self) -> str:
        """The RCPT refusal for this recipient.

        5.1.1 (bad destination mailbox) for a hard bounce, which is what the destination said;
        5.7.1 (delivery not authorized) for a complaint or an operator's entry: the mailbox may
        exist, but this relay will not send to it.
        """
        if self.reason == "hard-bounce":
            return f"550 5.1.1 <{self.address}>: recipient suppressed (hard bounce on {self.date})"
        if self.reason == "domain-failure":
            until = datetime.fromtimestamp(self.expires or 0, UTC).strftime("%Y-%m-%d")
            return (
                f"550 5.1.2 <{self.address}>: recipient suppressed (its domain failing since "
                f"{self.date}, until {until})"
            )
        what = "complaint" if self.reason == "complaint" else "added by an operator"
        return f"550 5.7.1 <{self.address}>: recipient suppressed ({what} on {self.date})"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for the control socket and ``hamta suppression list --json``."""
        return {**asdict(self), "date": self.date}


class SuppressionStore:
    """The list in one SQLite file; a connection for one thread (the caller's)."""

    def __init__(self, path: Path, *, check_same_thread: bool = True) -> None:
        self.path = path
        try:
            # Created 0600 whatever the umask (recipients are private); SQLite gives its -wal
            # and -shm files the database file's mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(
                path, timeout=10.0, isolation_level=None, check_same_thread=check_same_thread
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise SuppressionError(f"{path}: cannot open the suppression list: {exc}") from None

    def _migrate(self) -> None:
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(suppression)")}
        for column, statement in _MIGRATIONS.items():
            if column not in columns:
                try:
                    self._db.execute(statement)
                except sqlite3.OperationalError as exc:  # another worker added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise

    def busy_timeout(self, seconds: float) -> None:
        """How long a statement waits for another connection's lock before it fails."""
        self._db.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")

    @classmethod
    def in_spool(cls, root: Path, **kwargs: Any) -> SuppressionStore:
        """The list at the root of a spool directory (which must exist)."""
        if not root.is_dir():
            raise SuppressionError(f"no spool directory at {root}")
        return cls(root / FILE_NAME, **kwargs)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def get(self, address: str, now: float | None = None) -> Suppression | None:
        """The entry for an address, or None (also when it has expired)."""
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM suppression WHERE address = ? "
            "AND (expires IS NULL OR expires > ?)",
            (normalize(address), time.time() if now is None else now),
        ).fetchone()
        return Suppression(*row) if row is not None else None

    def add(
        self,
        address: str,
        reason: str,
        detail: str = "",
        when: float | None = None,
        expires: float | None = None,
    ) -> tuple[Suppression, bool]:
        """Suppress an address (durably); an existing entry is kept. Returns (entry, added)."""
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        address = normalize(address)
        if not valid_address(address):
            raise ValueError(f"not an address: {address!r}")
        now = time.time() if when is None else when
        try:
            with contextlib.closing(self._db.cursor()) as cursor:
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    # An expired entry is replaced, not kept.
                    cursor.execute(
                        "DELETE FROM suppression WHERE address = ? AND expires <= ?",
                        (address, now),
                    )
                    cursor.execute(
                        f"INSERT OR IGNORE INTO suppression ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                        (address, reason, now, detail[:1000], expires),
                    )
                    added = cursor.rowcount == 1
                    cursor.execute("COMMIT")
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise SuppressionError(f"{self.path}: {exc}") from None
        entry = self.get(address, now)
        assert entry is not None
        return entry, added

    def remove(self, address: str) -> bool:
        """Take an address off the list; False when it was not on it."""
        try:
            cursor = self._db.execute(
                "DELETE FROM suppression WHERE address = ?", (normalize(address),)
            )
        except sqlite3.Error as exc:
            raise SuppressionError(f"{self.path}: {exc}") from None
        return cursor.rowcount == 1

    def entries(self) -> list[Suppression]:
        """Every entry, oldest first."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM suppression ORDER BY created, address"
        ).fetchall()
        return [Suppression(*row) for row in rows]

    def domain_failed(self, address: str, now: float, policy: DomainFailurePolicy) -> float | None:
        """Count a domain-level failure of ``address``; since when, once that is long enough.

        The count starts again when the last failure is older than the expiry: a record that
        old says nothing about the domain now.
        """
        address = normalize(address)
        try:
            with contextlib.closing(self._db.cursor()) as cursor:
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    cursor.execute(
                        "INSERT INTO domain_failure VALUES (?, ?, ?, 1) ON CONFLICT(address) DO "
                        "UPDATE SET first = CASE WHEN ? - last > ? THEN ? ELSE first END, "
                        "failures = CASE WHEN ? - last > ? THEN 1 ELSE failures + 1 END, "
                        "last = ?",
                        (address, now, now, now, policy.expiry, now, now, policy.expiry, now),
                    )
                    first, failures = cursor.execute(
                        "SELECT first, failures FROM domain_failure WHERE address = ?", (address,)
                    ).fetchone()
                    cursor.execute("COMMIT")
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise SuppressionError(f"{self.path}: {exc}") from None
        if failures >= 2 and now - first >= policy.period:
            return float(first)
        return None

    def prune(self, before: float) -> int:
        """Remove domain failures last seen and suppressions expired before ``before``."""
        try:
            failures = self._db.execute("DELETE FROM domain_failure WHERE last < ?", (before,))
            expired = self._db.execute("DELETE FROM suppression WHERE expires < ?", (before,))
        except sqlite3.Error as exc:
            raise SuppressionError(f"{self.path}: {exc}") from None
        return int(failures.rowcount + expired.rowcount)

    def count_complaint(self, domain: str) -> bool:
        """Count a complaint for ``domain``; True when it is now among the top domains."""
        try:
            with contextlib.closing(self._db.cursor()) as cursor:
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    cursor.execute(
                        "INSERT INTO complaint_domain VALUES (?, 1) ON CONFLICT(domain) "
                        "DO UPDATE SET complaints = complaints + 1",
                        (domain,),
                    )
                    (count,) = cursor.execute(
                        "SELECT complaints FROM complaint_domain WHERE domain = ?", (domain,)
                    ).fetchone()
                    # Ties rank below the domains that got there first: with 21 domains at
                    # one complaint each, the 21st is "other" (the label set stays bounded).
                    (above,) = cursor.execute(
                        "SELECT COUNT(*) FROM complaint_domain WHERE complaints >= ? "
                        "AND domain != ?",
                        (count, domain),
                    ).fetchone()
                    cursor.execute("COMMIT")
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise SuppressionError(f"{self.path}: {exc}") from None
        return int(above) < TOP_DOMAINS

    def complaint_counts(self) -> dict[str, int]:
        """Complaints per domain, ever."""
        rows = self._db.execute("SELECT domain, complaints FROM complaint_domain").fetchall()
        return {str(domain): int(count) for domain, count in rows}


class Suppressions:
    """The relay's list while active: lookups on the event loop, writes in a thread.

    ``guard`` is the spool's fencing check (None while this term owns the spool, else why
    not): a relay that a newer term superseded writes nothing more to the volume.
    """

    def __init__(
        self,
        root: Path,
        log: Any,
        guard: Callable[[], str | None] | None = None,
        domain_failures: DomainFailurePolicy | None = None,
    ) -> None:
        self.root = root
        self.domain_failures = domain_failures or DomainFailurePolicy()
        self.log = log
        self.guard = guard
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="hamta-suppression")
        self._reader: SuppressionStore | None = None
        self._writer: SuppressionStore | None = None
        self._pending: set[asyncio.Future[Any]] = set()

    async def open(self) -> None:
        """Open the list (created on first use) for reading here and writing in the thread."""
        loop = asyncio.get_running_loop()
        self._writer = await loop.run_in_executor(
            self._executor,
            lambda: SuppressionStore.in_spool(self.root, check_same_thread=False),
        )
        # Records that can no longer count go at each activation, so the table stays small.
        stale = time.time() - self.domain_failures.expiry
        pruned = await loop.run_in_executor(self._executor, self._writer.prune, stale)
        if pruned:
            self.log.info("SuppressionPruned", removed=pruned)
        self._reader = SuppressionStore.in_spool(self.root)
        # Looked up at RCPT on the event loop: never wait long on a lock (a failed lookup lets
        # the recipient through, as SuppressionLookupFailed says).
        self._reader.busy_timeout(0.05)

    async def close(self) -> None:
        """Finish the writes under way and close."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        loop = asyncio.get_running_loop()
        if self._writer is not None:
            await loop.run_in_executor(self._executor, self._writer.close)
        if self._reader is not None:
            self._reader.close()
        self._executor.shutdown(wait=False)

    def lookup(self, address: str) -> Suppression | None:
        """The entry for a recipient, or None (fast: called at every RCPT)."""
        if self._reader is None:
            return None
        try:
            return self._reader.get(address)
        except sqlite3.Error as exc:
            # A list that cannot be read must not stop mail: the recipient is let through.
            self.log.error("SuppressionLookupFailed", recipient=address, error=str(exc))
            return None

    async def _write(self, work: Callable[[SuppressionStore], Any]) -> Any:
        writer = self._writer
        if writer is None:
            raise SuppressionError("the suppression list is not open")
        if self.guard is not None:
            reason = self.guard()
            if reason is not None:
                raise SuppressionError(f"not written: {reason}")
        future = asyncio.get_running_loop().run_in_executor(self._executor, work, writer)
        self._pending.add(future)
        try:
            return await future
        finally:
            self._pending.discard(future)

    async def add(
        self, address: str, reason: str, detail: str = "", expires: float | None = None
    ) -> tuple[Suppression, bool]:
        """Suppress an address durably; returns (entry, added) and logs ``Suppressed``."""
        entry, added = await self._write(
            lambda store: store.add(address, reason, detail, expires=expires)
        )
        if added:
            self.log.info(
                "Suppressed", recipient=entry.address, reason=reason, detail=detail, expires=expires
            )
        return entry, bool(added)

    async def remove(self, address: str) -> bool:
        """Take an address off the list; logs ``Unsuppressed``."""
        removed = bool(await self._write(lambda store: store.remove(address)))
        if removed:
            self.log.info("Unsuppressed", recipient=normalize(address))
        return removed

    async def entries(self) -> list[Suppression]:
        """Every entry."""
        result: list[Suppression] = await self._write(lambda store: store.entries())
        return result

    async def count_complaint(self, domain: str) -> bool:
        """Count a complaint for a domain; True when it ranks among the top domains."""
        return bool(await self._write(lambda store: store.count_complaint(domain)))

    def record_hard_bounce(self, address: str, bounce_class: str, reply: str) -> bool:
        """A permanent failure of one recipient: suppress it if the class says it does not exist.

        Called from the delivery engine's outcome handling (synchronous there): the write is
        started here and finishes in the background; deactivation waits for it. Returns whether
        the bounce was of the suppressed class.
        """
        if bounce_class != SUPPRESSED_BOUNCE_CLASS or self._writer is None:
            return False
        task = asyncio.get_running_loop().create_task(
            self._suppress_bounce(address, bounce_class, reply)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return True

    def record_domain_failure(self, address: str, reply: str) -> None:
        """A permanent failure of a recipient's domain (no DNS, null MX, no route), not mailbox.

        Counted; suppresses (for a while) only once it has gone on for the policy's period.
        """
        if self._writer is None:
            return
        task = asyncio.get_running_loop().create_task(self._domain_failed(address, reply))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _domain_failed(self, address: str, reply: str) -> None:
        policy = self.domain_failures
        try:
            now = time.time()
            since = await self._write(lambda store: store.domain_failed(address, now, policy))
            if since is not None:
                since_day = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%d")
                await self.add(
                    address,
                    "domain-failure",
                    f"failing since {since_day}: {reply}",
                    expires=now + policy.expiry,
                )
        except (SuppressionError, ValueError) as exc:
            self.log.error("SuppressionFailed", recipient=address, error=str(exc))

    async def _suppress_bounce(self, address: str, bounce_class: str, reply: str) -> None:
        try:
            await self.add(address, "hard-bounce", f"{bounce_class}: {reply}")
        except (SuppressionError, ValueError) as exc:
            self.log.error("SuppressionFailed", recipient=address, error=str(exc))


async def control_command(
    suppressions: Suppressions | None, request: dict[str, Any]
) -> dict[str, Any]:
    """The control socket's ``suppression-list|add|remove`` commands, on an active relay."""
    if suppressions is None:
        raise SuppressionError("relay is not active: use the spool directory")
    command = request.get("command")
    if command == "suppression-list":
        return {"entries": [entry.as_dict() for entry in await suppressions.entries()]}
    address = str(request.get("address", ""))
    if not valid_address(normalize(address)):
        raise ValueError(f"not an address: {address!r}")
    if command == "suppression-add":
        entry, added = await suppressions.add(address, "manual", str(request.get("detail", "")))
        return {"added": added, "entry": entry.as_dict()}
    if command == "suppression-remove":
        return {"removed": await suppressions.remove(address)}
    raise ValueError(f"unknown command {command!r}")
