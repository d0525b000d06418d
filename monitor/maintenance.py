"""Maintenance windows: when a check's alerts are held. Pure, standard library only.

A window is one-off (``start`` to ``end``, instants) or recurring (on given weekdays, from a
wall-clock time in an IANA time zone, for a duration). A recurring window follows the wall
clock across a change of daylight saving time: "Sunday 01:00 Europe/Stockholm" starts at 01:00
local on both sides of the change, so its instant in UTC moves by an hour; its duration is
elapsed time. A start that falls in the hour a spring change skips is read with the offset
before the change (``fold=0``), i.e. an hour later on the new wall clock.

Windows come from the configuration, and from ``hamta cluster pause`` at run time (a one-off
window with an infinite end until ``resume``; monitor.pause_window keeps it beside the
configured ones).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

DAY = 86400.0
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class Window:
    """One window. ``checks`` empty: every check. One-off: ``start``/``end`` (epoch seconds).
    Recurring: ``days`` (0 = Monday), ``at`` (wall-clock time), ``duration``, ``zone``."""

    name: str
    checks: tuple[str, ...] = ()
    start: float | None = None
    end: float | None = None
    days: tuple[int, ...] = ()
    at: dt.time | None = None
    duration: float = 0.0
    zone: str = "UTC"
    # A window opened at run time (``hamta cluster pause``): who opened it and why. Its ``end``
    # is infinite until the pause is lifted.
    by: str = ""
    reason: str = ""

    def covers(self, check: str) -> bool:
        return not self.checks or check in self.checks

    @property
    def recurring(self) -> bool:
        return self.at is not None

    def occurrences(self, around: float) -> Iterable[tuple[float, float]]:
        """This window's (start, end) instants that may contain or follow ``around``."""
        if not self.recurring:
            if self.start is not None and self.end is not None:
                yield self.start, self.end
            return
        assert self.at is not None
        zone = ZoneInfo(self.zone)
        today = dt.datetime.fromtimestamp(around, zone).date()
        # Occurrences that began up to ``duration`` ago may still be running; a week ahead
        # holds the next one of any weekly window.
        back = math.ceil(self.duration / DAY) + 1
        for offset in range(-back, 8):
            day = today + dt.timedelta(days=offset)
            if day.weekday() in self.days:
                begin = dt.datetime.combine(day, self.at, tzinfo=zone).timestamp()
                yield begin, begin + self.duration

    def between(self, start: float, end: float) -> Iterable[tuple[float, float]]:
        """This window's occurrences that overlap ``start``..``end`` (not clipped)."""
        if not self.recurring:
            found = self.occurrences(start)
        else:
            # A week's look around each week of the range finds every occurrence in it.
            found = (o for around in _weekly(start, end) for o in self.occurrences(around))
        yield from sorted({(s, e) for s, e in found if s < end and e > start})

    def current(self, now: float) -> tuple[float, float] | None:
        """The occurrence running at ``now``, if any."""
        return next(((s, e) for s, e in self.occurrences(now) if s <= now < e), None)

    def upcoming(self, now: float) -> tuple[float, float] | None:
        """The running occurrence, else the next one to start (None: none to come)."""
        future = sorted((s, e) for s, e in self.occurrences(now) if e > now)
        return future[0] if future else None


def _weekly(start: float, end: float) -> Iterable[float]:
    at = start
    while at < end + 7 * DAY:
        yield at
        at += 7 * DAY


def spans(
    windows: Iterable[Window], check: str, start: float, end: float
) -> list[tuple[float, float]]:
    """The times from ``start`` to ``end`` that a window covering ``check`` holds (clipped,
    maybe overlapping: ``monitor.uptime`` joins them), for the uptime to leave out."""
    return [
        (max(s, start), min(e, end))
        for window in windows
        if window.covers(check)
        for s, e in window.between(start, end)
    ]


def active_window(windows: Iterable[Window], check: str, now: float) -> Window | None:
    """The first window that holds ``check``'s alerts at ``now`` (None: alerts go out)."""
    return next((w for w in windows if w.covers(check) and w.current(now) is not None), None)
