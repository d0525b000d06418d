"""Per-domain delivery statistics: what ``/api/domains``, ``/api/domain/{d}`` and the
per-destination Prometheus metrics are made of.

:class:`DomainStats` counts, per recipient domain, the outcome of every recipient's delivery
attempt (delivered, deferred, bounced, expired), the bounce classes, complaints and delivery
latency, over a sliding window (an hour by default, kept as a dozen buckets) and in totals since
the process started. Memory is bounded: at most ``max_domains`` domains are tracked, and the least
recently active one is forgotten to make room (its totals still count in ``other``).

The figures of one relay process are a *snapshot*: plain JSON of sums only, so that the node's
answer with several workers is the sum of each worker's snapshot (:func:`merge_snapshots`), as
``merge_summaries`` does for ``/api/queue``. Rates, averages and the top-N cut of the Prometheus
metrics are computed from the merged sums, at the time of the request or the scrape; a domain
that falls out of the top N is folded into ``other`` at the next scrape and leaves no label
behind.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from hamta.queue import MailQueue

#: Outcomes of one recipient's attempt, as counted.
OUTCOMES = ("delivered", "deferred", "bounced", "expired")
#: The label every destination outside the top N is added up under.
OTHER = "other"

_WINDOW_FIELDS = (*OUTCOMES, "complaints", "latency_ms_sum", "latency_count")
_TOTAL_FIELDS = (*OUTCOMES, "complaints")
_COMPLAINTS = 4
_LATENCY_SUM = 5
_LATENCY_COUNT = 6


class _Bucket:
    __slots__ = ("classes", "counts", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.counts = [0.0] * len(_WINDOW_FIELDS)
        self.classes: dict[str, int] = {}


class _Domain:
    __slots__ = ("buckets", "totals")

    def __init__(self) -> None:
        self.buckets: deque[_Bucket] = deque()
        self.totals = [0] * len(_TOTAL_FIELDS)


class DomainStats:
    """Delivery outcomes per recipient domain, over a sliding window and since start.

    ``window`` is in seconds (the rates' period, stated in every answer); ``clock`` is monotonic.
    """

    def __init__(
        self,
        window: float = 3600.0,
        max_domains: int = 2000,
        *,
        buckets: int = 12,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.max_domains = max_domains
        self._width = window / buckets
        self._clock = clock
        self._domains: OrderedDict[str, _Domain] = OrderedDict()
        # Totals of forgotten domains: they stay in the `other` counter, which must not go down.
        self.evicted = dict.fromkeys(_TOTAL_FIELDS, 0)

    def __len__(self) -> int:
        return len(self._domains)

    def __contains__(self, domain: object) -> bool:
        return domain in self._domains

    def _bucket(self, domain: str) -> tuple[_Domain, _Bucket]:
        entry = self._domains.get(domain)
        if entry is None:
            entry = self._domains[domain] = _Domain()
            if len(self._domains) > self.max_domains:
                _, gone = self._domains.popitem(last=False)
                for name, value in zip(_TOTAL_FIELDS, gone.totals, strict=True):
                    self.evicted[name] += value
        else:
            self._domains.move_to_end(domain)
        now = self._clock()
        start = now - now % self._width
        if not entry.buckets or entry.buckets[-1].start != start:
            entry.buckets.append(_Bucket(start))
            self._trim(entry, now)
        return entry, entry.buckets[-1]

    def _trim(self, entry: _Domain, now: float) -> None:
        while entry.buckets and entry.buckets[0].start <= now - self.window:
            entry.buckets.popleft()

    def record(
        self,
        domain: str,
        outcome: str,
        count: int = 1,
        *,
        latency_ms: float | None = None,
        bounce_class: str | None = None,
    ) -> None:
        """Count ``count`` recipients of ``domain`` with ``outcome`` (one of :data:`OUTCOMES`).

        ``latency_ms`` (of a delivery) counts once per recipient; ``bounce_class`` is the class
        of a failed attempt.
        """
        index = OUTCOMES.index(outcome)
        entry, bucket = self._bucket(domain)
        bucket.counts[index] += count
        entry.totals[index] += count
        if latency_ms is not None:
            bucket.counts[_LATENCY_SUM] += latency_ms * count
            bucket.counts[_LATENCY_COUNT] += count
        if bounce_class is not None:
            bucket.classes[bounce_class] = bucket.classes.get(bounce_class, 0) + count

    def record_complaint(self, domain: str, count: int = 1) -> None:
        """Count a complaint (a feedback-loop report) about mail sent to ``domain``."""
        entry, bucket = self._bucket(domain)
        bucket.counts[_COMPLAINTS] += count
        entry.totals[_COMPLAINTS] += count

    def snapshot(self) -> dict[str, Any]:
        """Sums per tracked domain, in the window and since start: mergeable plain JSON."""
        now = self._clock()
        domains: dict[str, Any] = {}
        for name, entry in self._domains.items():
            self._trim(entry, now)
            window = [0.0] * len(_WINDOW_FIELDS)
            classes: dict[str, int] = {}
            for bucket in entry.buckets:
                for i, value in enumerate(bucket.counts):
                    window[i] += value
                for cls, value in bucket.classes.items():
                    classes[cls] = classes.get(cls, 0) + value
            domains[name] = {
                "window": {
                    f: (round(v, 3) if f == "latency_ms_sum" else int(v))
                    for f, v in zip(_WINDOW_FIELDS, window, strict=True)
                },
                "classes": classes,
                "totals": dict(zip(_TOTAL_FIELDS, entry.totals, strict=True)),
            }
        return {"window_seconds": self.window, "domains": domains, "evicted": dict(self.evicted)}


def _queue_row() -> dict[str, Any]:
    return {
        "queued_ready": 0,
        "queued_deferred": 0,
        "queued_in_flight": 0,  # recipients a session holds (``in_flight``: the destination's jobs)
        "in_flight": 0,
        "connections": 0,
        "suspended": False,
        "throttled": False,
        "window": dict.fromkeys(_WINDOW_FIELDS, 0),
        "classes": {},
        "totals": dict.fromkeys(_TOTAL_FIELDS, 0),
    }


def relay_snapshot(
    stats: DomainStats, queue: MailQueue | None, next_hop: Callable[[str], str] | None
) -> dict[str, Any]:
    """One relay's snapshot: its statistics with each domain's queue and destination state.

    Suspension and throttling are read from the destination (``suspended``, ``throttled``)
    where the queue has them.
    """
    snapshot = stats.snapshot()
    domains: dict[str, Any] = snapshot["domains"]
    for row in domains.values():
        for key, value in _queue_row().items():
            row.setdefault(key, value)
    if queue is None or next_hop is None:
        return snapshot
    for domain, counts in queue.by_domain().items():
        row = domains.setdefault(domain, _queue_row())
        row["queued_ready"] += counts.get("ready", 0)
        row["queued_deferred"] += counts.get("deferred", 0)
        row["queued_in_flight"] += counts.get("in_flight", 0)
    for domain, row in domains.items():
        # Not MailQueue.destination(): a view must not create destinations.
        destination = queue.destinations.get(next_hop(domain))
        if destination is None:
            continue
        row["destination"] = destination.key
        row["in_flight"] = destination.in_flight
        row["connections"] = destination.sessions
        row["suspended"] = bool(getattr(destination, "suspended", False))
        row["throttled"] = bool(getattr(destination, "throttled", False))
    return snapshot


def _merge_into(target: dict[str, Any], source: dict[str, Any]) -> None:
    for key, value in source.items():
        if isinstance(value, dict):
            _merge_into(target.setdefault(key, {}), value)
        elif isinstance(value, bool):
            target[key] = bool(target.get(key)) or value
        elif isinstance(value, int | float):
            target[key] = target.get(key, 0) + value
        else:
            target.setdefault(key, value)


def merge_snapshots(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The node's snapshot: the workers' sums added up (the window is the first one's)."""
    merged: dict[str, Any] = {"window_seconds": None, "domains": {}, "evicted": {}}
    for snapshot in snapshots:
        if merged["window_seconds"] is None:
            merged["window_seconds"] = snapshot.get("window_seconds")
        _merge_into(merged["domains"], snapshot.get("domains", {}))
        _merge_into(merged["evicted"], snapshot.get("evicted", {}))
    return merged


def _rate(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole else 0.0


def domain_view(domain: str, row: dict[str, Any], window_seconds: float) -> dict[str, Any]:
    """The JSON of ``/api/domain/{domain}`` (and of each entry of ``/api/domains``).

    Counts and rates are over the last ``window_seconds``; ``totals`` since the relay started.
    Rates are per attempt: delivered + deferred + bounced + expired recipients.
    """
    window = row.get("window", {})
    delivered = int(window.get("delivered", 0))
    deferred = int(window.get("deferred", 0))
    bounced = int(window.get("bounced", 0))
    expired = int(window.get("expired", 0))
    complaints = int(window.get("complaints", 0))
    attempts = delivered + deferred + bounced + expired
    latency_count = window.get("latency_count", 0)
    ready, waiting = int(row.get("queued_ready", 0)), int(row.get("queued_deferred", 0))
    held = int(row.get("queued_in_flight", 0))
    view: dict[str, Any] = {
        "domain": domain,
        "destination": row.get("destination", domain),
        "window_seconds": window_seconds,
        "queued": ready + waiting + held,
        "queued_ready": ready,
        "queued_deferred": waiting,
        "queued_in_flight": held,
        "in_flight": int(row.get("in_flight", 0)),
        "connections": int(row.get("connections", 0)),
        "suspended": bool(row.get("suspended", False)),
        "throttled": bool(row.get("throttled", False)),
        "attempts": attempts,
        "delivered": delivered,
        "deferred": deferred,
        "hard_bounces": bounced,
        "soft_bounces": deferred + expired,
        "expired": expired,
        "hard_bounce_rate": _rate(bounced, attempts),
        "soft_bounce_rate": _rate(deferred + expired, attempts),
        "complaints": complaints,
        "complaint_rate": _rate(complaints, delivered),
        "avg_latency_ms": round(window.get("latency_ms_sum", 0) / latency_count, 3)
        if latency_count
        else None,
        "bounce_classes": dict(sorted(row.get("classes", {}).items(), key=lambda kv: -kv[1])),
        "totals": dict(row.get("totals", {})),
    }
    return view


def _depth(row: dict[str, Any]) -> int:
    return sum(int(row.get(f"queued_{f}", 0)) for f in ("ready", "deferred", "in_flight"))


def ranked(snapshot: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Domains by queue depth, then in flight, then attempts in the window, then name."""

    def key(item: tuple[str, dict[str, Any]]) -> tuple[int, int, int, str]:
        name, row = item
        attempts = sum(int(row.get("window", {}).get(f, 0)) for f in OUTCOMES)
        return (-_depth(row), -int(row.get("in_flight", 0)), -attempts, name)

    return sorted(snapshot.get("domains", {}).items(), key=key)


def domains_view(snapshot: dict[str, Any], limit: int | None = None) -> dict[str, Any]:
    """The JSON of ``/api/domains``: destinations by queue depth, with bounces and throttling."""
    rows = ranked(snapshot)
    window = float(snapshot.get("window_seconds") or 0.0)
    shown = rows if limit is None else rows[:limit]
    return {
        "window_seconds": window,
        "count": len(rows),
        "domains": [domain_view(name, row, window) for name, row in shown],
    }


class _Collected:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def destination_metrics(snapshot: dict[str, Any], top: int) -> str:
    """The per-destination metric families for ``snapshot``: the top ``top`` by queue depth,
    every other domain (and every forgotten one) added up as ``other``.

    Built anew at each scrape, so a label that leaves the top N is gone from the next one.
    """
    depth = GaugeMetricFamily(
        "hamta_destination_queue_messages",
        "Recipients queued (ready or deferred) per destination; top N by depth, rest as other",
        labels=["destination"],
    )
    deliveries = CounterMetricFamily(
        "hamta_destination_deliveries",
        "Recipient outcomes per destination since start (expired counts as bounced); "
        "top N by queue depth, rest as other",
        labels=["destination", "outcome"],
    )
    rows = ranked(snapshot)
    other_depth = 0
    other = {"delivered": 0, "deferred": 0, "bounced": 0}

    def outcomes(totals: dict[str, Any]) -> dict[str, int]:
        return {
            "delivered": int(totals.get("delivered", 0)),
            "deferred": int(totals.get("deferred", 0)),
            "bounced": int(totals.get("bounced", 0)) + int(totals.get("expired", 0)),
        }

    for position, (name, row) in enumerate(rows):
        counts = outcomes(row.get("totals", {}))
        if position < top:
            depth.add_metric([name], _depth(row))
            for outcome, value in counts.items():
                deliveries.add_metric([name, outcome], value)
        else:
            other_depth += _depth(row)
            for outcome, value in counts.items():
                other[outcome] += value
    for outcome, value in outcomes(snapshot.get("evicted", {})).items():
        other[outcome] += value
    depth.add_metric([OTHER], other_depth)
    for outcome, value in other.items():
        deliveries.add_metric([OTHER, outcome], value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected([depth, deliveries]))
    return generate_latest(registry).decode()
