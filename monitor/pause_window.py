"""``hamta cluster pause`` as a maintenance window of the cluster's checks, until ``resume``.

The pause is a znode the cluster link reads (``paused``: by, at, reason). While it is there,
the cluster's checks are in a window named :data:`PAUSE_WINDOW` from the pause's ``at`` with
no end: their incidents are opened and recorded "in maintenance", and no escalation step fires
(monitor.alerting, as for a configured window). At ``resume`` the window ends when the link
sees the znode gone; the ended pause is kept (the last :data:`KEPT` of them, in memory) so
that the uptime of this run of the monitor leaves that time out too.

The cluster's checks are those a paused pair's work touches: the service address (``service =
true``), each node's checks (``node = ...``), the relay's health and the round trip. DNS,
certificates and authentication records do not change because a node is being worked on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, overload

from monitor.maintenance import Window

PAUSE_WINDOW = "cluster paused"
KEPT = 20  # ended pauses remembered for the uptime
CLUSTER_KINDS = ("relay", "round_trip")


def cluster_checks(checks: Sequence[Any]) -> tuple[str, ...]:
    """The names of the checks a pause covers (see the module's docstring)."""
    return tuple(
        check.name
        for check in checks
        if getattr(check, "service", False)
        or getattr(check, "node", None)
        or check.kind in CLUSTER_KINDS
    )


def pause_window(paused: Mapping[str, Any], checks: tuple[str, ...], end: float) -> Window:
    """The window of a pause record (``{"by", "at", "reason"}``); ``end`` infinite while on."""
    return Window(
        PAUSE_WINDOW,
        checks,
        start=float(paused["at"]),
        end=end,
        by=str(paused.get("by", "")),
        reason=str(paused.get("reason", "")),
    )


class Windows(Sequence[Window]):
    """The windows in force: the configured ones, then the pause, as the cluster link last
    read it. A live sequence: the alerting, the API and the uptime read it at each use."""

    def __init__(self, configured: Sequence[Window], checks: Sequence[Any] = ()) -> None:
        self.configured = tuple(configured)
        self.covered = cluster_checks(checks)
        self._pause: Window | None = None
        self._ended: tuple[Window, ...] = ()

    @classmethod
    def of(cls, windows: Sequence[Window]) -> Windows:
        return windows if isinstance(windows, Windows) else cls(windows)

    @property
    def pause(self) -> Window | None:
        return self._pause

    def follow(self, paused: Mapping[str, Any] | None, now: float) -> str | None:
        """The pause as read at ``now`` (None: not paused). Returns "opened" or "closed" when
        the window changed, for the caller's log line; None otherwise."""
        if not self.covered:
            return None  # no check of the cluster: a window with no checks would cover all
        current = self._pause
        if paused is not None:
            window = pause_window(paused, self.covered, math.inf)
            if current is not None and current.start == window.start:
                return None
            self._pause = window
            return "opened"
        if current is None:
            return None
        self._pause = None
        ended = Window(
            current.name,
            current.checks,
            start=current.start,
            end=now,
            by=current.by,
            reason=current.reason,
        )
        self._ended = (*self._ended, ended)[-KEPT:]
        return "closed"

    def _all(self) -> tuple[Window, ...]:
        pause = (self._pause,) if self._pause is not None else ()
        return (*self.configured, *self._ended, *pause)

    def shown(self) -> tuple[Window, ...]:
        """What ``/api/maintenance`` lists: the configured windows and a running pause."""
        pause = (self._pause,) if self._pause is not None else ()
        return (*self.configured, *pause)

    @overload
    def __getitem__(self, index: int) -> Window: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Window]: ...
    def __getitem__(self, index: int | slice) -> Window | Sequence[Window]:
        return self._all()[index]

    def __len__(self) -> int:
        return len(self._all())

    def __iter__(self) -> Iterator[Window]:
        return iter(self._all())
