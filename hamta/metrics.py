"""Prometheus metrics and the short-term rates shown by ``/api/queue``.

One registry per relay (not the process-global default), so that tests can run several relays in
one process and a warm standby that is activated twice does not register twice.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


class RateWindow:
    """Events per second over a sliding window, kept as per-second buckets."""

    def __init__(self, seconds: int = 60, clock: Callable[[], float] = time.monotonic) -> None:
        self._seconds = seconds
        self._clock = clock
        self._buckets: deque[list[float]] = deque()  # [second, count]

    def add(self, count: int = 1) -> None:
        """Record ``count`` events now."""
        second = float(int(self._clock()))
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([second, float(count)])
            self._trim(second)

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self._seconds:
            self._buckets.popleft()

    def total(self) -> float:
        """Events within the window."""
        self._trim(float(int(self._clock())))
        return sum(count for _, count in self._buckets)

    def per_second(self) -> float:
        """Average events per second over the window."""
        return self.total() / self._seconds


class RelayMetrics:
    """The relay's Prometheus metrics and rate windows."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "hamta_messages_received", "Messages accepted (250 after fsync)", registry=r
        )
        self.received_bytes = Counter(
            "hamta_received_bytes", "Bytes of accepted messages as spooled", registry=r
        )
        self.rejected = Counter(
            "hamta_smtp_rejections", "SMTP commands refused, by reply code", ["code"], registry=r
        )
        self.deliveries = Counter(
            "hamta_deliveries",
            "Recipient delivery outcomes",
            ["outcome"],  # delivered, deferred, bounced, expired
            registry=r,
        )
        self.egress_deliveries = Counter(
            "hamta_egress_deliveries",
            "Recipient delivery outcomes per egress source ([delivery.egress], hamta/egress.py)",
            ["source", "outcome"],  # outcome: delivery, bounce, expiration, deferred
            registry=r,
        )
        self.tls_sessions = Counter(
            "hamta_tls_policy_sessions",
            "Delivery connections by the TLS policy that applied (docs/tls-policy.md) and "
            "outcome: met, or the RFC 8460 failure type (the connection was not used)",
            ["policy", "outcome"],  # policy: tlsa, sts, no-policy-found
            registry=r,
        )
        self.dsns = Counter(
            "hamta_dsns",
            "DSNs to senders, one per message: queued, rate_limited (per sender domain), "
            "suppressed (null sender, bounce of a bounce)",
            ["outcome"],
            registry=r,
        )
        self.bounces = Counter(
            "hamta_bounces",
            "Failed recipient attempts by bounce class (hamta/bounce_classes.py)",
            ["class", "kind"],  # kind: hard (permanent), soft (temporary)
            registry=r,
        )
        self.bounce_replies = Counter(
            "hamta_bounce_replies",
            "Failed recipient attempts by reply code (none: no reply, the connection failed)",
            ["code"],  # three digits: at most a few hundred values
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "hamta_delivery_duration_seconds",
            "Time of one SMTP transaction to a destination",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "hamta_spool_commit_duration_seconds",
            "Time of one group commit (writes and fsyncs)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
            registry=r,
        )
        self.commit_messages = Histogram(
            "hamta_spool_commit_messages",
            "Messages made durable by one group commit",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.queue_depth = Gauge("hamta_queue_messages", "Messages in the spool", registry=r)
        self.queue_ready = Gauge("hamta_queue_ready_jobs", "Jobs ready to deliver", registry=r)
        self.queue_deferred = Gauge(
            "hamta_queue_deferred_jobs", "Jobs waiting to retry", registry=r
        )
        self.in_flight = Gauge("hamta_delivery_in_flight", "Jobs being delivered", registry=r)
        self.connections = Gauge(
            "hamta_delivery_connections", "Open outbound SMTP connections", registry=r
        )
        self.smtp_sessions = Gauge("hamta_smtp_sessions", "Open inbound sessions", registry=r)
        self.smtp_refused = Counter(
            "hamta_smtp_connections_refused",
            "Inbound connections refused with 421 4.7.0, by limit",
            ["reason"],  # max_connections, max_connections_per_client
            registry=r,
        )
        self.smtp_cut = Counter(
            "hamta_smtp_sessions_cut",
            "Inbound sessions ended by the relay with 421 4.4.2, by limit",
            ["reason"],  # idle, session_time, data_rate
            registry=r,
        )
        self.smtp_auth = Counter(
            "hamta_smtp_auth",
            "SMTP AUTH attempts, by listener (its address) and outcome",
            # success, failure (535), locked (454 lockout), unavailable (454 backend), no_tls
            ["listener", "outcome"],
            registry=r,
        )
        self.submission_refused = Counter(
            "hamta_submission_refused",
            "Authenticated mail refused by the user's policy, by reason",
            ["reason"],  # sender, from, rate
            registry=r,
        )
        self.backpressure = Counter(
            "hamta_smtp_backpressure",
            "MAIL refused with 452 4.3.1 for the relay's own resources, by resource",
            ["reason"],  # queue, memory
            registry=r,
        )
        self.ready = Gauge("hamta_ready", "1 when listening with a writable spool", registry=r)
        self.fenced = Gauge(
            "hamta_fenced", "1 when a newer term's fencing token stopped this relay", registry=r
        )
        # Tells the active node from a warm standby, which is never ready by design.
        self.active = Gauge(
            "hamta_active", "1 from activation until back in standby (holds the spool)", registry=r
        )
        self.recovery_seconds = Gauge(
            "hamta_recovery_duration_seconds", "Time of the last queue recovery", registry=r
        )
        self.dkim_signatures = Counter(
            "hamta_dkim_signatures",
            "DKIM signatures added at reception",
            ["algorithm"],
            registry=r,
        )
        self.dkim_failures = Counter(
            "hamta_dkim_failures", "Messages passed unsigned because signing failed", registry=r
        )
        # domain: the complaining recipient's, for the top 20 domains by complaints, else "other".
        self.async_bounces = Counter(
            "hamta_async_bounces",
            "Recipients of DSNs received at the bounces address, by bounce class",
            ["class", "kind"],
            registry=r,
        )
        self.async_bounces_unverified = Counter(
            "hamta_async_bounces_unverified",
            "Mail to the bounces address whose return path did not verify (ignored), by reason",
            ["reason"],
            registry=r,
        )
        self.async_bounces_unparsed = Counter(
            "hamta_async_bounces_unparsed",
            "Mail to the bounces address that was no readable DSN (kept in quarantine/)",
            registry=r,
        )
        self.complaints = Counter(
            "hamta_complaints",
            "Complaints (ARF feedback reports) recorded",
            ["domain"],
            registry=r,
        )
        self.complaints_unparsed = Counter(
            "hamta_complaints_unparsed", "Feedback reports kept in quarantine unread", registry=r
        )
        # What recovery found on damaged storage (hamta/spool.py: Damage); the SpoolDamaged,
        # SpoolMessageRebuilt and SpoolMessageLost events name the queue ids.
        self.spool_damaged_messages = Counter(
            "hamta_spool_damaged_messages",
            "Messages recovery rebuilt from their segment or lost to damaged spool storage",
            ["outcome"],
            registry=r,
        )
        self.spool_damaged_files = Counter(
            "hamta_spool_damaged_files",
            "Spool files recovery found damaged (kept in damaged/ on the spool volume)",
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "hamta_spool_checkpoint_failures", "Spool checkpoints that failed", registry=r
        )
        self.checkpoint_failing = Gauge(
            "hamta_spool_checkpoint_failing",
            "1 while the last spool checkpoint failed (journals keep growing)",
            registry=r,
        )
        self.complaints_untrusted = Counter(
            "hamta_complaints_untrusted",
            "Feedback reports from no complaint network and with no reporter's DKIM (ignored)",
            registry=r,
        )
        self.delivered_rate = RateWindow()
        self.bounced_rate = RateWindow()

    def sample(self, name: str, **labels: str) -> int:
        """The current value of a counter sample, as an integer (0 before its first event)."""
        return int(self.registry.get_sample_value(name, labels) or 0)


# Node-wide value of a sample across workers: added up, except where that makes no sense.
_MERGE = {"hamta_ready": min, "hamta_active": max, "hamta_recovery_duration_seconds": max}


class _Families:
    """Ready-made metric families, for ``generate_latest`` to render as it renders a relay's."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_expositions(texts: list[str]) -> str:
    """Add up the Prometheus expositions of several workers into one for the node."""
    families: dict[str, Metric] = {}
    samples: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                samples.setdefault(key, []).append(sample.value)
    for (family_name, sample_name, labels), values in samples.items():
        merge = _MERGE.get(sample_name, min if sample_name.endswith("_created") else sum)
        families[family_name].add_sample(sample_name, dict(labels), merge(values))
    # Rendered by the library, so names, types and escaping are exactly those of one relay's.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry).decode()
