"""Reports nobody could read, kept whole on the spool volume for an operator.

Mail to the complaints and bounces addresses is consumed, never relayed. A report that cannot be
read is still accepted: refusing it would send a bounce to a robot nobody reads, and what it
reported would be lost. It is kept instead, as ``quarantine/<queue id>.eml`` on the spool volume
(so it fails over with the spool), fsynced before the 250, and only while the spool keeps the
room it reserves for real mail and the quarantine its quota (files, bytes: past it, 452); reports
older than the retention are swept away by a periodic task of the active relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hamta.durable_files import write_durably
from hamta.smtp_replies import REPLY_SPOOL_FULL as REPLY_NO_ROOM
from hamta.smtp_replies import REPLY_SUPERSEDED

QUARANTINE_DIR = "quarantine"


def quarantine_refusal(directory: Path, size: int, min_free: int) -> str | None:
    """Why a report of ``size`` bytes may not be kept now (None: it may).

    Mail to the report addresses comes from anywhere: kept reports must not take the room the
    spool keeps free (``spool.min_free``), or a stranger could make real mail get 452.
    """
    try:
        free = shutil.disk_usage(directory if directory.exists() else directory.parent).free
    except OSError as exc:
        return f"cannot see the free space of {directory}: {exc}"
    if free - size < min_free:
        return f"{free} bytes free, {size} to keep, {min_free} to stay free"
    return None


REPLY_QUARANTINE_FULL = "452 4.3.4 Too many unreadable reports kept, try again later"


@dataclass(frozen=True, slots=True)
class QuarantineQuota:
    """How much ``quarantine/`` may hold, and for how long ([suppression] quarantine_*)."""

    max_bytes: int = 64 * 1024 * 1024
    max_files: int = 1000
    retention: float = 14 * 86400.0


DEFAULT_QUOTA = QuarantineQuota()


def _kept(directory: Path) -> list[tuple[Path, os.stat_result]]:
    found = []
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        if path.suffix == ".eml":
            with contextlib.suppress(FileNotFoundError):  # swept by another worker meanwhile
                found.append((path, path.stat()))
    return found


def quota_refusal(directory: Path, size: int, quota: QuarantineQuota) -> str | None:
    """Why one more report of ``size`` bytes would break the quota (None: it would not)."""
    kept = _kept(directory)
    used = sum(stat.st_size for _, stat in kept)
    if len(kept) + 1 > quota.max_files:
        return f"{len(kept)} reports kept, at most {quota.max_files}"
    if used + size > quota.max_bytes:
        return f"{used} bytes kept, {size} to keep, at most {quota.max_bytes}"
    return None


def sweep(directory: Path, retention: float, now: float) -> list[str]:
    """Remove the reports kept longer than ``retention``; the names removed."""
    removed = []
    for path, stat in _kept(directory):
        if now - stat.st_mtime > retention:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
    return removed


async def sweep_periodically(
    directory: Path,
    quota: QuarantineQuota,
    wall_clock: Callable[[], float],
    log: Any,
    guard: Callable[[], str | None] | None,
) -> None:
    """Sweep expired reports now and then (a task of the active relay, cancelled with it)."""
    interval = min(3600.0, max(1.0, quota.retention / 10))
    while True:
        if guard is None or guard() is None:  # a superseded term touches nothing more
            try:
                removed = await asyncio.to_thread(sweep, directory, quota.retention, wall_clock())
            except OSError as exc:
                log.error("QuarantineSweepFailed", directory=str(directory), error=str(exc))
            else:
                if removed:
                    log.info(
                        "QuarantineSwept",
                        removed=len(removed),
                        files=removed[:20],
                        retention=quota.retention,
                    )
        await asyncio.sleep(interval)


def kept_reply(qid: str) -> str:
    """The 250 for a report kept in quarantine."""
    return f"250 2.0.0 Ok: unreadable report kept as {qid}"


@dataclass(frozen=True, slots=True)
class ReportQuarantine:
    """Where one intake keeps the reports it could not read, and how it says it could not."""

    directory: Path
    min_free: int
    log: Any
    guard: Callable[[], str | None] | None
    not_recorded_reply: str  # a 451 naming the kind of report
    not_recorded_event: str  # the log event when the disk refused the write
    quota: QuarantineQuota = DEFAULT_QUOTA

    @classmethod
    def on_spool(
        cls,
        spool_root: Path,
        min_free: int,
        log: Any,
        guard: Callable[[], str | None] | None,
        *,
        not_recorded_reply: str,
        not_recorded_event: str,
        quota: QuarantineQuota = DEFAULT_QUOTA,
    ) -> ReportQuarantine:
        """The ``quarantine/`` directory beside the spool on its volume."""
        return cls(
            spool_root / QUARANTINE_DIR,
            min_free,
            log,
            guard,
            not_recorded_reply,
            not_recorded_event,
            quota,
        )

    async def keep(self, data: bytes, qid: str) -> Path | str:
        """Keep ``data`` durably as ``<qid>.eml``: its path, or the SMTP reply that refuses it."""
        if self.guard is not None and self.guard() is not None:
            return REPLY_SUPERSEDED  # the term ended while the report was read
        problem = quarantine_refusal(self.directory, len(data), self.min_free)
        if problem is not None:
            self.log.error("ReportNotKept", queue_id=qid, error=problem)
            return REPLY_NO_ROOM
        over = await asyncio.to_thread(quota_refusal, self.directory, len(data), self.quota)
        if over is not None:
            self.log.error("ReportNotKept", queue_id=qid, error=f"quarantine full: {over}")
            return REPLY_QUARANTINE_FULL
        try:
            return await asyncio.to_thread(write_durably, self.directory, f"{qid}.eml", data)
        except OSError as exc:
            self.log.error(self.not_recorded_event, queue_id=qid, error=str(exc))
            return self.not_recorded_reply
