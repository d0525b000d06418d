"""The monitor's Prometheus metrics: per check (up, latency, days to certificate expiry, the round
trip's steps) and of the alerting (notifications sent, failed and dropped per notifier; open
incidents by severity).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from monitor.config import Check
from monitor.incidents import Severity
from monitor.observation import Observation
from monitor.verdicts import SERVING, CheckState, State

STATES = tuple(State)
#: What became of a notification; each is a ``result`` of hamta_monitor_notifications_total.
RESULTS = ("sent", "failed", "dropped")


class NotifierCounts(Protocol):
    """A notifier's counts as the dispatcher keeps them (``monitor.notifiers.dispatch.Counts``)."""

    @property
    def sent(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def retries(self) -> int: ...


class _NotificationCollector(Collector):
    """Reads the dispatcher's own counts at each scrape: one count, kept in one place."""

    def __init__(self, counts: Mapping[str, NotifierCounts]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        results = CounterMetricFamily(
            "hamta_monitor_notifications",
            "Notifications per notifier by result: sent, failed (after every attempt), dropped"
            " (its queue was full)",
            labels=["notifier", "result"],
        )
        retries = CounterMetricFamily(
            "hamta_monitor_notification_retries",
            "Sends of a notification tried again after a failure, per notifier",
            labels=["notifier"],
        )
        for name, counts in sorted(self.counts.items()):
            for result in RESULTS:
                results.add_metric([name, result], getattr(counts, result))
            retries.add_metric([name], counts.retries)
        yield results
        yield retries


# The round-trip check's facts ``<step>_seconds`` (monitor.checks.round_trip).
ROUND_TRIP_STEPS = ("accepted", "delivered", "arrived")


class MonitorMetrics:
    """A registry of its own (several monitors in one test process must not share one)."""

    def __init__(
        self, checks: Sequence[Check], notifications: Mapping[str, NotifierCounts] | None = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_NotificationCollector(notifications or {}))
        self.incidents_open = Gauge(
            "hamta_monitor_incidents_open",
            "Open incidents by severity (critical, warning), as the incident store holds them",
            ["severity"],
            registry=self.registry,
        )
        for severity in Severity:
            self.incidents_open.labels(severity.value).set(0)
        labels = ["check", "kind"]
        self.up = Gauge(
            "hamta_monitor_check_up",
            "1 while the check's state is up, degraded or warning; 0 when down or expired",
            labels,
            registry=self.registry,
        )
        self.state = Gauge(
            "hamta_monitor_check_state",
            "1 for the check's current state, 0 for the others",
            [*labels, "state"],
            registry=self.registry,
        )
        self.latency = Gauge(
            "hamta_monitor_check_latency_seconds",
            "How long the check's last run took",
            labels,
            registry=self.registry,
        )
        self.expiry = Gauge(
            "hamta_monitor_certificate_expiry_days",
            "Days until the certificate seen by the check expires (negative: past)",
            labels,
            registry=self.registry,
        )
        self.round_trip = Gauge(
            "hamta_monitor_round_trip_seconds",
            "The last round-trip probe's time from sending to each step it reached"
            " (accepted, delivered, arrived)",
            [*labels, "step"],
            registry=self.registry,
        )
        self.runs = Counter(
            "hamta_monitor_check_runs",
            "Runs of the check by outcome",
            [*labels, "outcome"],
            registry=self.registry,
        )
        for check in checks:
            self._set_state(check, State.UNKNOWN)

    def _set_state(self, check: Check, current: State) -> None:
        for state in STATES:
            self.state.labels(check.name, check.kind, state.value).set(int(state is current))

    def observe(self, check: Check, observation: Observation, state: CheckState) -> None:
        labels = (check.name, check.kind)
        self._set_state(check, state.state)
        if state.state is not State.UNKNOWN:
            self.up.labels(*labels).set(int(state.state in SERVING))
        self.latency.labels(*labels).set(observation.seconds)
        self.runs.labels(*labels, observation.outcome.value).inc()
        days = observation.facts.get("days_to_expiry")
        if isinstance(days, int | float) and not isinstance(days, bool):
            self.expiry.labels(*labels).set(days)
        for step in ROUND_TRIP_STEPS:
            seconds = observation.facts.get(f"{step}_seconds")
            if isinstance(seconds, int | float) and not isinstance(seconds, bool):
                self.round_trip.labels(*labels, step).set(seconds)

    def open_incidents(self, by_severity: Mapping[Severity, int]) -> None:
        """The store's open incidents, counted at a scrape (an ack or a resolve by another
        process shows at the next one)."""
        for severity in Severity:
            self.incidents_open.labels(severity.value).set(by_severity.get(severity, 0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
