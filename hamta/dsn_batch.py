"""One DSN per message, not one per failed destination; and a limit per sender domain.

A message's recipients are delivered per destination (a job per domain), so a message to 100
domains that do not exist failed as 100 jobs, each with a DSN of its own: 1,275 such messages
made 136,042 DSNs to a (forged) sender, about 100 times what was sent. Failed recipients of a
message are therefore collected for ``[delivery] dsn_window`` after the first one fails, and
get one DSN that lists them all (RFC 3464 allows any number of per-recipient parts); recipients
that fail later (a deferred one that expires) get a DSN of their own batch.

DSNs are also limited per sender domain (``dsn_rate_per_domain`` a minute, a token bucket):
beyond it, the DSN is not sent (``DsnRateLimited``), the recipients are finished all the same,
and ``hamta_dsns_total{outcome="rate_limited"}`` counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from hamta.dsn import FailedRecipient
from hamta.spool import LiveMessage, Spawn, create_task


@dataclass(slots=True)
class FailedBatch:
    """The failed recipients of one message collected so far, by destination domain."""

    message: LiveMessage
    reports: list[FailedRecipient] = field(default_factory=list)
    # (domain, recipient indexes, attempts): what to finish, or to retry if the DSN fails.
    groups: list[tuple[str, list[int], int]] = field(default_factory=list)
    expired: bool = True


class DsnBatcher:
    """Collects failed recipients per message for ``window`` seconds, then hands on the batch."""

    def __init__(
        self,
        window: float,
        flush: Callable[[FailedBatch], Awaitable[None]],
        spawn: Spawn = create_task,
    ) -> None:
        self.window = window
        self._flush = flush
        self._spawn = spawn  # the relay's supervisor: a DSN task dying of a bug stops the relay
        self._batches: dict[str, FailedBatch] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._running: set[asyncio.Task[None]] = set()  # timers, until their flush is done

    def add(
        self,
        message: LiveMessage,
        domain: str,
        rcpts: list[int],
        reports: list[FailedRecipient],
        *,
        expired: bool,
        attempts: int,
    ) -> None:
        """Failed recipients of ``message`` (at ``domain``): into its batch, opened if need be."""
        qid = message.rec.qid
        batch = self._batches.get(qid)
        if batch is None:
            batch = self._batches[qid] = FailedBatch(message)
            timer = self._spawn(f"dsn {qid}", self._after_window(qid))
            self._timers[qid] = timer
            self._running.add(timer)
            timer.add_done_callback(self._running.discard)
        batch.reports.extend(reports)
        batch.groups.append((domain, list(rcpts), attempts))
        batch.expired = batch.expired and expired  # "time expired" only when all did

    async def _after_window(self, qid: str) -> None:
        await asyncio.sleep(self.window)
        self._timers.pop(qid, None)
        batch = self._batches.pop(qid, None)
        if batch is not None:
            await self._flush(batch)

    @property
    def pending(self) -> int:
        """Messages whose batch is still open."""
        return len(self._batches)

    async def flush_all(self) -> None:
        """Hand on every open batch now (the engine stops)."""
        timers, self._timers = self._timers, {}
        for timer in timers.values():
            timer.cancel()
        for timer in timers.values():
            with contextlib.suppress(asyncio.CancelledError):
                await timer
        batches, self._batches = self._batches, {}
        for batch in batches.values():
            await self._flush(batch)
        if self._running:  # batches whose window ended just before: their flush is under way
            await asyncio.gather(*self._running, return_exceptions=True)
