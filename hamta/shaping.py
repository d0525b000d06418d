"""Traffic shaping of one destination: its limits, a rate limiter, and throttle adaptation.

Pure arithmetic on times the caller passes in (the event loop's clock in the delivery engine),
so that every rule here can be checked with plain numbers. :class:`Limits` is what the
configuration says for one destination (``[delivery.limits]`` and ``[delivery.domains."d"]``);
:class:`Shaper` is what one relay process does with it right now: how many sessions it may run,
how fast it may send, and whether the destination told it to slow down.

Throttling is additive increase, multiplicative decrease: a reply that says "slow down"
(:func:`is_throttle_reply`: a 4xx of bounce class ``RateLimited``, see hamta.bounce_classes)
halves the rate and the sessions, down to a floor; every quiet period without another one steps
them back up by a quarter of the normal rate and one session, until they are back where the
configuration puts them.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass, field

from hamta.bounce_classes import BounceClassifier, default_rules
from hamta.config import DeliveryConfig, RetryConfig

# Defaults of the keys that have no older equivalent.
DEFAULT_MIN_RATE = 1.0
DEFAULT_QUIET_PERIOD = 60.0
# A burst of throttle replies (every session refused at once) is one signal, not many: after a
# decrease, further ones are ignored this long, so that the rate is not driven to the floor by
# replies to attempts made before the previous decrease took effect.
DECREASE_HOLD = 1.0
# Attempts older than this do not count for the observed rate of an unlimited destination.
RATE_WINDOW = 10.0


@functools.cache
def _default_classifier() -> BounceClassifier:
    return BounceClassifier(default_rules())


def is_throttle_reply(code: int, text: str, classifier: BounceClassifier | None = None) -> bool:
    """Does a reply ask us to slow down? A temporary (4xx) one that classifies as RateLimited.

    ``classifier`` defaults to the shipped rules (``hamta/data/bounce_rules.toml``).
    """
    if not 400 <= code < 500:
        return False
    verdict = (classifier or _default_classifier()).classify(code, None, text)
    return verdict.bounce_class == "RateLimited"


@dataclass(frozen=True, slots=True)
class Limits:
    """The configured limits of one destination, for the whole node."""

    max_connections: int = 20
    messages_per_second: float | None = None  # None: no limit
    burst: int = 1
    max_messages_per_connection: int = 100
    retry: RetryConfig = field(default_factory=RetryConfig)
    min_messages_per_second: float = DEFAULT_MIN_RATE
    throttle_quiet_period: float = DEFAULT_QUIET_PERIOD


def limits_for(delivery: DeliveryConfig, retry: RetryConfig, key: str) -> Limits:
    """The limits of ``key``: its override, else ``[delivery.limits]``, else older keys."""
    layers = [delivery.domains[key]] if key in delivery.domains else []
    layers.append(delivery.limits)

    def pick(name: str) -> object:
        for layer in layers:
            value = getattr(layer, name)
            if value is not None:
                return value
        return None

    def number(name: str, default: float) -> float:
        value = pick(name)
        return default if value is None else float(value)  # type: ignore[arg-type]

    rate = pick("messages_per_second")
    retry_update = {
        name: value
        for name, value in (
            ("first_delay", pick("retry_first_delay")),
            ("factor", pick("retry_factor")),
            ("max_delay", pick("retry_max_delay")),
        )
        if value is not None
    }
    policy = retry.model_copy(update=retry_update) if retry_update else retry
    if policy.first_delay > policy.max_delay:
        policy = policy.model_copy(update={"max_delay": policy.first_delay})
    return Limits(
        max_connections=int(number("max_connections", delivery.max_connections_per_destination)),
        messages_per_second=float(rate) if rate else None,  # type: ignore[arg-type]
        burst=int(number("burst", 1)),
        max_messages_per_connection=int(
            number("max_messages_per_connection", delivery.max_messages_per_connection)
        ),
        retry=policy,
        min_messages_per_second=number("min_messages_per_second", DEFAULT_MIN_RATE),
        throttle_quiet_period=number("throttle_quiet_period", DEFAULT_QUIET_PERIOD),
    )


class Shaper:
    """One process's share of a destination's limits, and how throttling has changed them.

    ``share`` is the number of relay processes of the node: each runs a ceiling share of the
    connections and an exact share of the rate, so the node as a whole keeps to the limits
    (connections round up, so that every worker can reach every destination).
    """

    __slots__ = (
        "_ceiling",
        "_last_change",
        "_recent",
        "_tat",
        "base_concurrency",
        "base_rate",
        "concurrency",
        "floor_rate",
        "limits",
        "rate",
        "throttled",
    )

    def __init__(self, limits: Limits | None = None, share: int = 1) -> None:
        self.limits = limits or Limits()
        self.base_concurrency = -(-self.limits.max_connections // share)
        rate = self.limits.messages_per_second
        self.base_rate: float | None = rate / share if rate else None
        self.floor_rate = self.limits.min_messages_per_second / share
        #: Sessions this process may run to the destination now.
        self.concurrency = self.base_concurrency
        #: Messages per second this process may send now (None: no limit).
        self.rate: float | None = self.base_rate
        #: Slowed down by throttle replies and not yet recovered.
        self.throttled = False
        self._ceiling = 0.0  # the rate to recover to
        self._last_change = -math.inf
        self._tat = -math.inf  # GCRA's theoretical arrival time of the next message
        self._recent: deque[float] = deque(maxlen=4096)

    # ------------------------------------------------------------ rate limit

    def reserve(self, now: float) -> float:
        """Take the next send slot: seconds to wait before sending (0: at once)."""
        self._recent.append(now)
        rate = self.rate
        if rate is None:
            return 0.0
        interval = 1.0 / rate
        # GCRA: up to ``burst`` messages back to back, then one per interval.
        start = max(now, self._tat - (self.limits.burst - 1) * interval)
        self._tat = max(self._tat, start) + interval
        return start - now

    def observed_rate(self, now: float) -> float:
        """Attempts per second over the last :data:`RATE_WINDOW` seconds."""
        recent = self._recent
        while recent and recent[0] < now - RATE_WINDOW:
            recent.popleft()
        if not recent:
            return 0.0
        return len(recent) / max(1.0, now - recent[0])

    # ------------------------------------------------------------ throttling

    def throttle(self, now: float) -> bool:
        """A throttle reply: halve rate and sessions (to the floor); True if anything changed."""
        if self.throttled and now - self._last_change < DECREASE_HOLD:
            return False
        if not self.throttled:
            # An unlimited destination recovers to the pace it was going at when told to slow.
            ceiling = self.base_rate or self.observed_rate(now)
            self._ceiling = max(ceiling, min(self.floor_rate, self.base_rate or math.inf))
            current = self._ceiling
        else:
            current = self.rate or self._ceiling
        floor = min(self.floor_rate, self._ceiling)
        rate = max(floor, current / 2)
        concurrency = max(1, self.concurrency // 2)
        changed = not self.throttled or rate != self.rate or concurrency != self.concurrency
        self.rate, self.concurrency, self.throttled = rate, concurrency, True
        self._last_change = now
        return changed

    def seconds_to_recovery(self, now: float) -> float:
        """How long until :meth:`recover` may take its next step."""
        return max(0.0, self._last_change + self.limits.throttle_quiet_period - now)

    def recover(self, now: float) -> bool:
        """After a quiet period: one step back up; True if it took one."""
        if not self.throttled or self.seconds_to_recovery(now) > 0:
            return False
        rate = min(self._ceiling, (self.rate or self._ceiling) + self._ceiling / 4)
        self.concurrency = min(self.base_concurrency, self.concurrency + 1)
        self._last_change = now
        if rate >= self._ceiling and self.concurrency >= self.base_concurrency:
            self.rate, self.throttled = self.base_rate, False
        else:
            self.rate = rate
        return True
