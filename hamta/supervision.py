"""Supervision: the relay's long-lived tasks, and what happens when one of them dies.

asyncio keeps a task's exception to itself until someone awaits it, and a loop task (the spool's
group commit, the queue's timer, a delivery session) is awaited only at shutdown. A bug there used
to leave a relay that accepted connections, answered ``/health/ready`` with 200 and never
acknowledged another message. So every such task is started through :meth:`Supervisor.spawn`:
its unexpected end (an exception, not a cancellation by its owner) is logged at error level as one
``TaskFailed`` event naming the task and the exception, and handed to ``on_failure``, which turns
the relay unready and stops the process with a non-zero code (the cluster agent then restarts it
or fails over). A relay that may have lost a part of itself does not go on serving.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Supervisor:
    """Starts named tasks and reports the first one that fails."""

    def __init__(self, log: Any, on_failure: Callable[[str, BaseException], None]) -> None:
        self.log = log
        self._on_failure = on_failure
        #: "task name: ExceptionType: message" of the first failure, or None.
        self.failure: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, name: str, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start ``coro`` as a task called ``name``, watched until it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)  # a strong reference: the loop keeps only weak ones
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():  # cancelled by its owner, at teardown: an expected end
            return
        exc = task.exception()
        if exc is None:
            return
        name = task.get_name()
        error = f"{type(exc).__name__}: {exc}"
        self.log.error(
            "TaskFailed",
            task=name,
            error=error,
            traceback="".join(traceback.format_exception(exc)),
            action="relay unready; stopping with a non-zero exit code",
        )
        if self.failure is None:
            self.failure = f"{name}: {error}"
            self._on_failure(name, exc)


class StopDeadline:
    """The hard end of a stop: the process exits ``stop_timeout`` after the stop was asked.

    A graceful stop waits for sessions, deliveries and the spool; a task stuck on any of them
    (or a dead one they wait for) must not hold the process, since a relay that does not go
    cannot be restarted or failed over. The timer is a thread, so it fires even when the event
    loop itself is blocked; it logs one ``StopDeadlineExceeded`` event and calls ``os._exit``.
    """

    def __init__(self, stop_timeout: float, log: Any) -> None:
        self.stop_timeout = stop_timeout
        self.log = log
        self._armed_at: float | None = None
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        """Start counting (once; later calls keep the first start)."""
        if self._timer is not None:
            return
        self._armed_at = time.monotonic()
        self._timer = threading.Timer(self.stop_timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def graceful(self) -> float:
        """The time a graceful stop may still take: what is left, less a reserve for closing."""
        # The delivery engine gives cancelled sessions 2 s more, then servers and spool close.
        reserve = min(3.0, 0.3 * self.stop_timeout)
        if self._armed_at is None:
            return max(0.0, self.stop_timeout - reserve)
        left = self.stop_timeout - (time.monotonic() - self._armed_at)
        return max(0.0, left - reserve)

    def cancel(self) -> None:
        """The stop finished in time."""
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        self.log.error(
            "StopDeadlineExceeded",
            stop_timeout=self.stop_timeout,
            action="exiting at once (code 1)",
        )
        os._exit(1)
