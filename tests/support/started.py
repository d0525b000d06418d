"""What the tests' helper servers share: ``with`` over start and stop, and ending a process.

Every helper that runs something (a relay, dnsmasq, unbound, Dovecot, Postfix, a sink) starts
it in ``start`` and ends it in ``stop``; a test uses it in a ``with`` block or a fixture. A
process is ended by its pid only (the tests end nothing they did not start), politely first.
"""

from __future__ import annotations

import abc
import signal
import subprocess
from typing import Any, Self


class Started(abc.ABC):
    """A helper used as ``with Helper(...) as helper:``: started on entry, stopped on exit."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start what the helper runs, and wait until it serves."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop it and remove what it left (idempotent)."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def end_process(
    proc: subprocess.Popen[Any] | None, grace: float, sig: int = signal.SIGTERM
) -> int | None:
    """Send ``sig`` to ``proc`` (SIGTERM: the graceful stop), give it ``grace`` seconds, then
    SIGKILL it; reap it either way. Its exit code; None without a process."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=grace)
