"""Uptime, outages and response-time series from a check's history: pure, standard library only.

The store gives the state changes (and the last one before a range, which says where the check
stood when the range began) and the observations summed up per bucket; the arithmetic is here.

- A check's timeline is the state each change led to, held until the next change; before the
  first known change it is "unknown" (the monitor had not looked yet, or the record was pruned).
- Uptime over a range is the time serving (up, degraded, or warning: a certificate near its end
  still serves) over the time known; "unknown" time is left out of both and reported, so a
  monitor started an hour ago shows 100 % of an hour, not 1/24 of a day. No known time: None.
- The times the monitor itself did not run (``gaps``: from its last sign of life to its next
  start) are "unknown" too, whatever the state was before: nobody looked.
- Time inside a maintenance window of the check (``maintenance``: the windows' occurrences,
  from ``monitor.maintenance.spans``) is left out of the ratio too, and reported on its own,
  as status pages (Gatus, Uptime Kuma, Statuspage) do: planned work is not downtime, nor is it
  counted as up. A window over time nobody looked at leaves it "unknown" (nobody looked).
- An outage is an interval in "down": start, end (None while it lasts), duration; it runs
  from the change into down to the change out of it, across a gap if the monitor stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from monitor.verdicts import SERVING, State, StateChange

HOUR, DAY = 3600.0, 86400.0
#: The ranges the API and the page know, and their span in seconds.
RANGES: dict[str, float] = {"24h": DAY, "7d": 7 * DAY, "30d": 30 * DAY, "90d": 90 * DAY}
#: Bucket width per range: a few hundred points each, enough for a plot, few for the browser.
BUCKETS: dict[str, float] = {"24h": 300.0, "7d": 1800.0, "30d": 2 * HOUR, "90d": 6 * HOUR}


class RangeError(ValueError):
    """A range the API does not know."""


def span(name: str) -> float:
    """The seconds of range ``name`` (24h, 7d, 30d, 90d); RangeError names the known ones."""
    try:
        return RANGES[name]
    except KeyError:
        known = ", ".join(RANGES)
        raise RangeError(f"unknown range {name!r} (known: {known})") from None


@dataclass(frozen=True, slots=True)
class Interval:
    state: State
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Uptime:
    """Seconds serving, not serving, unknown and in maintenance in a range; ``ratio`` of the
    known time outside maintenance."""

    serving: float
    failing: float
    unknown: float
    maintenance: float = 0.0

    @property
    def known(self) -> float:
        return self.serving + self.failing

    @property
    def ratio(self) -> float | None:
        return self.serving / self.known if self.known > 0 else None

    def as_json(self) -> dict[str, float | None]:
        ratio = self.ratio
        return {
            "ratio": None if ratio is None else round(ratio, 6),
            "serving_s": round(self.serving, 3),
            "failing_s": round(self.failing, 3),
            "unknown_s": round(self.unknown, 3),
            "maintenance_s": round(self.maintenance, 3),
        }


@dataclass(frozen=True, slots=True)
class Outage:
    check: str
    start: float
    end: float | None  # None: still down
    detail: str

    def duration(self, now: float) -> float:
        return (now if self.end is None else self.end) - self.start

    def as_json(self, now: float) -> dict[str, object]:
        return {
            "check": self.check,
            "start": self.start,
            "end": self.end,
            "duration_s": round(self.duration(now), 3),
            "ongoing": self.end is None,
            "detail": self.detail,
        }


Gap = tuple[float, float]


def timeline(
    changes: Sequence[StateChange], start: float, end: float, gaps: Sequence[Gap] = ()
) -> list[Interval]:
    """The states from ``start`` to ``end``, given the changes in time order (the last one
    before ``start`` included, if any), "unknown" in the ``gaps``; adjacent intervals, empty
    ones left out, neighbours in the same state merged."""
    state, at = State.UNKNOWN, start
    intervals: list[Interval] = []
    for change in changes:
        if change.at >= end:
            break
        if change.at > at:
            intervals.append(Interval(state, at, change.at))
            at = change.at
        state = change.current
    if end > at:
        intervals.append(Interval(state, at, end))
    return _merged([piece for i in intervals for piece in _cut(i, sorted(gaps))])


def _cut(interval: Interval, gaps: Sequence[Gap]) -> list[Interval]:
    """``interval`` with the parts inside ``gaps`` (sorted by start) made unknown."""
    pieces, at = [], interval.start
    for gap_start, gap_end in gaps:
        low, high = max(gap_start, at), min(gap_end, interval.end)
        if high <= low:
            continue
        if low > at:
            pieces.append(Interval(interval.state, at, low))
        pieces.append(Interval(State.UNKNOWN, low, high))
        at = high
    if interval.end > at:
        pieces.append(Interval(interval.state, at, interval.end))
    return pieces


def _merged(intervals: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for interval in intervals:
        if merged and merged[-1].state is interval.state and merged[-1].end == interval.start:
            merged[-1] = Interval(interval.state, merged[-1].start, interval.end)
        else:
            merged.append(interval)
    return merged


def merged_spans(spans: Iterable[Gap]) -> list[Gap]:
    """``spans`` sorted, overlapping and touching ones joined, empty ones left out."""
    joined: list[Gap] = []
    for low, high in sorted(spans):
        if high <= low:
            continue
        if joined and low <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(joined[-1][1], high))
        else:
            joined.append((low, high))
    return joined


def _inside(start: float, end: float, spans: Sequence[Gap]) -> float:
    """Seconds of ``start``..``end`` inside ``spans`` (merged: no second counted twice)."""
    return sum(max(0.0, min(end, high) - max(start, low)) for low, high in spans)


def uptime(
    changes: Sequence[StateChange],
    start: float,
    end: float,
    gaps: Sequence[Gap] = (),
    maintenance: Sequence[Gap] = (),
) -> Uptime:
    serving = failing = unknown = held = 0.0
    windows = merged_spans(maintenance)
    for interval in timeline(changes, start, end, gaps):
        length = interval.end - interval.start
        if interval.state is State.UNKNOWN:
            unknown += length
            continue
        planned = _inside(interval.start, interval.end, windows)
        held += planned
        if interval.state in SERVING:
            serving += length - planned
        else:
            failing += length - planned
    return Uptime(serving, failing, unknown, held)


def outages(changes: Sequence[StateChange], start: float, now: float) -> list[Outage]:
    """The down intervals that overlap ``start``..``now``, oldest first.

    An outage that began before ``start`` is given its real start when its change is among
    ``changes`` (the store passes the last change before the range).
    """
    found: list[Outage] = []
    began: StateChange | None = None
    for change in changes:
        if change.current is State.DOWN and began is None:
            began = change
        elif change.current is not State.DOWN and began is not None:
            if change.at > start:
                found.append(Outage(began.check, began.at, change.at, began.detail))
            began = None
    if began is not None:
        found.append(Outage(began.check, began.at, None, began.detail))
    return found


@dataclass(frozen=True, slots=True)
class Bucket:
    """The observations of one bucket as the store sums them up."""

    index: int
    count: int
    mean: float
    peak: float
    failures: int


def series(rows: Iterable[Bucket], start: float, width: float, count: int) -> dict[str, list[Any]]:
    """Columns for uPlot: bucket start times, mean and max seconds, failures; an empty bucket
    is None (a gap in the line, not a zero)."""
    t = [start + i * width for i in range(count)]
    mean: list[float | None] = [None] * count
    peak: list[float | None] = [None] * count
    failures: list[int] = [0] * count
    runs: list[int] = [0] * count
    for row in rows:
        if 0 <= row.index < count:
            mean[row.index] = round(row.mean, 4)
            peak[row.index] = round(row.peak, 4)
            failures[row.index] = row.failures
            runs[row.index] = row.count
    return {"t": t, "mean_s": mean, "max_s": peak, "failures": failures, "runs": runs}


def grid(name: str, now: float) -> tuple[float, float, int]:
    """Start, bucket width and bucket count of range ``name`` ending at ``now``; the buckets
    are aligned on multiples of the width so that two calls a minute apart agree."""
    length = span(name)
    width = BUCKETS[name]
    last = (now // width) * width
    count = int(length // width) + 1
    return last - (count - 1) * width, width, count
