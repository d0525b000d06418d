"""Sending notifications without ever holding up the checks.

Each notifier has its own bounded queue and one worker task: a receiver that hangs or fails
holds only its own queue, and one notifier's events go out in order (a PagerDuty trigger before
its resolve). ``submit`` never waits: when a queue is full the notification is dropped, counted
and logged. A failed send is retried with exponential backoff (tenacity), each retry logged;
after the last attempt it is given up, logged, and reported to ``on_result``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from monitor.notifiers import Notification, NotifierError, Sender

# Told of each notification's end: (notifier, notification, delivered, attempts, error).
OnResult = Callable[[str, Notification, bool, int, str], Awaitable[None]]


@dataclass(slots=True)
class Counts:
    sent: int = 0
    failed: int = 0
    retries: int = 0
    dropped: int = 0


class Dispatcher:
    def __init__(
        self,
        senders: Mapping[str, Sender],
        log: Any,
        on_result: OnResult,
        *,
        queue: int = 100,
        attempts: int = 5,
        retry_wait: float = 1.0,
        retry_max_wait: float = 60.0,
    ) -> None:
        self.senders = dict(senders)
        self.log = log
        self.on_result = on_result
        self.attempts = attempts
        self.retry_wait = retry_wait
        self.retry_max_wait = retry_max_wait
        self.queues: dict[str, asyncio.Queue[Notification]] = {
            name: asyncio.Queue(maxsize=queue) for name in self.senders
        }
        self.counts = {name: Counts() for name in self.senders}

    def submit(self, notifier: str, note: Notification) -> bool:
        """Queue ``note`` for ``notifier`` at once; False (and a logged count) when full."""
        try:
            self.queues[notifier].put_nowait(note)
        except asyncio.QueueFull:
            counts = self.counts[notifier]
            counts.dropped += 1
            self.log.error(
                "NotificationDropped",
                notifier=notifier,
                incident=note.incident,
                notification=note.event,
                dropped=counts.dropped,
                reason="queue full",
            )
            return False
        return True

    async def run(self) -> None:
        """One worker per notifier, until cancelled (with none, it only waits)."""
        if not self.senders:
            await asyncio.Event().wait()
        async with asyncio.TaskGroup() as group:
            for name in self.senders:
                group.create_task(self._worker(name), name=f"notifier {name}")

    async def _worker(self, name: str) -> None:
        queue = self.queues[name]
        while True:
            note = await queue.get()
            try:
                await self._deliver(name, note)
            finally:
                queue.task_done()

    async def _deliver(self, name: str, note: Notification) -> None:
        counts = self.counts[name]

        def before_sleep(state: RetryCallState) -> None:
            counts.retries += 1
            error = state.outcome.exception() if state.outcome else None
            self.log.warning(
                "NotificationRetry",
                notifier=name,
                incident=note.incident,
                notification=note.event,
                attempt=state.attempt_number,
                wait=round(state.upcoming_sleep, 3),
                error=str(error),
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=self.retry_wait, max=self.retry_max_wait),
            retry=retry_if_exception_type(NotifierError),
            before_sleep=before_sleep,
            reraise=True,
        )
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    await self.senders[name].send(note)
        except Exception as exc:  # a sender's bug too: it must not end the worker
            counts.failed += 1
            self.log.error(
                "NotificationFailed",
                notifier=name,
                incident=note.incident,
                notification=note.event,
                attempts=attempts,
                error=str(exc),
            )
            await self.on_result(name, note, False, attempts, str(exc))
            return
        counts.sent += 1
        self.log.info(
            "NotificationSent",
            notifier=name,
            incident=note.incident,
            notification=note.event,
            attempts=attempts,
        )
        await self.on_result(name, note, True, attempts, "")

    async def drain(self, limit: float) -> None:
        """Wait up to ``limit`` seconds for the queues to empty (at shutdown, and in tests)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                for queue in self.queues.values():
                    await queue.join()
