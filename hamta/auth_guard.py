"""Failed logins and per-user sending limits: what slows a password guesser, then stops it.

Failures are counted over a sliding window per client address and per user name. Each failure
delays the reply to the next attempt (``failure_delay`` doubling, capped), so that a guesser gets
few tries a minute; past ``max_failures_per_client`` (or ``_per_user``) AUTH gets 454 4.7.0
without the password being looked at, until ``lockout`` has passed. A success clears the
client's and the user's counts. The clock is injected (monotonic seconds).

Per process: with several workers each counts what reaches it (SO_REUSEPORT spreads one
client's connections), so a guesser may get up to ``workers`` times the attempts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from hamta.config import AuthConfig

_MAX_TRACKED = 100_000  # keys remembered at most: past it the oldest idle ones are forgotten


@dataclass(frozen=True, slots=True)
class Gate:
    """Before a login is checked: wait ``delay`` seconds first, or refuse it (``locked``)."""

    delay: float
    locked: str | None  # "client" or "user" when locked out, else None


class _Failures:
    """Failure times per key within a window, and lockouts until a time."""

    def __init__(self, window: float, limit: int, lockout: float) -> None:
        self.window = window
        self.limit = limit
        self.lockout = lockout
        self.times: dict[str, deque[float]] = {}
        self.locked_until: dict[str, float] = {}

    def count(self, key: str, now: float) -> int:
        times = self.times.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self.times[key]
            return 0
        return len(times)

    def locked(self, key: str, now: float) -> bool:
        until = self.locked_until.get(key)
        if until is None:
            return False
        if now >= until:
            del self.locked_until[key]
            return False
        return True

    def fail(self, key: str, now: float) -> bool:
        """Count a failure; True when it starts a lockout."""
        if len(self.times) >= _MAX_TRACKED and key not in self.times:
            oldest = min(self.times, key=lambda k: self.times[k][-1])
            del self.times[oldest]
        times = self.times.setdefault(key, deque())
        times.append(now)
        if self.count(key, now) >= self.limit:
            self.locked_until[key] = now + self.lockout
            self.times.pop(key, None)
            return True
        return False

    def clear(self, key: str) -> None:
        self.times.pop(key, None)


class LoginGuard:
    """The failure counts of one relay process, by client address and by user."""

    def __init__(self, config: AuthConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.clients = _Failures(
            config.failure_window, config.max_failures_per_client, config.lockout
        )
        self.users = _Failures(config.failure_window, config.max_failures_per_user, config.lockout)

    def gate(self, client: str, user: str) -> Gate:
        """Whether ``client`` may try ``user`` now, and how long it waits first."""
        now = self.clock()
        if self.clients.locked(client, now):
            return Gate(0.0, "client")
        if self.users.locked(user, now):
            return Gate(0.0, "user")
        failures = max(self.clients.count(client, now), self.users.count(user, now))
        if failures == 0 or self.config.failure_delay == 0:
            return Gate(0.0, None)
        delay = self.config.failure_delay * 2 ** (failures - 1)
        return Gate(min(delay, self.config.max_failure_delay), None)

    def failed(self, client: str, user: str) -> str | None:
        """Count a failed login; the lockout it starts ("client", "user") or None."""
        now = self.clock()
        locked = None
        if self.clients.fail(client, now):
            locked = "client"
        if self.users.fail(user, now):
            locked = locked or "user"
        return locked

    def succeeded(self, client: str, user: str) -> None:
        """A good login: its client's and user's failures are forgotten."""
        self.clients.clear(client)
        self.users.clear(user)


class SendRate:
    """Messages per minute per user (a sliding minute); users without a limit pass."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.sent: dict[str, deque[float]] = {}

    def allow(self, user: str, per_minute: int | None) -> bool:
        """Count one message of ``user`` unless it is over ``per_minute``."""
        if per_minute is None:
            return True
        now = self.clock()
        times = self.sent.setdefault(user, deque())
        while times and times[0] <= now - 60.0:
            times.popleft()
        if len(times) >= per_minute:
            return False
        times.append(now)
        return True
