"""Capacity planning: the spool, log volume, throughput and connections a mail volume needs.

Pure arithmetic, for ``hamta capacity``: no I/O here. :func:`plan` turns a :class:`Workload`
(messages a day, average size, peak factor, the delivery outage to survive, log retention and
the average delivery latency) and the relay's :class:`Limits` into a :class:`Plan`;
:func:`measure` reads the figures of a running relay from two scrapes of its ``/metrics``.

The rules of thumb, each a constant below: a queued message costs its size plus 512 bytes of
envelope, journal and index; the event log costs about 2 KiB per message (a ``Reception`` and a
``Delivery`` line, with their JSON keys) for each day it is kept; a delivery outage of H hours
at peak queues H/24 * messages a day * peak factor messages; and by Little's law, deliveries at
R messages a second that take L seconds each keep R * L connections busy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from prometheus_client.parser import text_string_to_metric_families

from hamta.config import DeliveryConfig, SpoolConfig

#: Envelope, journal frames and in-memory index of one queued message, beyond its body.
ENVELOPE_BYTES = 512
#: Event log per message and day kept: a Reception and a Delivery line of about 1 KiB each.
LOG_BYTES_PER_MESSAGE = 2048
SECONDS_PER_DAY = 86400.0
KIB = 1024

DEFAULT_RETENTION_DAYS = 14.0
DEFAULT_OUTAGE_HOURS = 24.0
DEFAULT_PEAK_FACTOR = 3.0
#: One SMTP transaction to a large mailbox provider on a reused connection, order of magnitude.
DEFAULT_LATENCY_SECONDS = 0.5


#: Descriptors beyond the connections: listening and admin sockets, the spool's segments, journal
#: and lock, the suppression database, the log, DNS queries and admin requests.
DESCRIPTOR_MARGIN = 256


def descriptors_needed(max_connections: int, outbound_connections: int) -> int:
    """File descriptors one relay process may hold at once: one per inbound session
    (``smtp.max_connections``) and per outbound connection (one destination's, at least), plus
    :data:`DESCRIPTOR_MARGIN`. ``hamta serve`` raises its RLIMIT_NOFILE to this, or warns."""
    return max_connections + outbound_connections + DESCRIPTOR_MARGIN


class CapacityError(ValueError):
    """Figures that make no plan (negative, zero where a rate is needed, unmeasurable)."""


@dataclass(frozen=True, slots=True)
class Workload:
    """The mail to plan for."""

    messages_per_day: float
    avg_size_bytes: float
    retention_days: float = DEFAULT_RETENTION_DAYS
    outage_hours: float = DEFAULT_OUTAGE_HOURS
    peak_factor: float = DEFAULT_PEAK_FACTOR
    latency_seconds: float = DEFAULT_LATENCY_SECONDS

    def __post_init__(self) -> None:
        for name in ("messages_per_day", "avg_size_bytes", "retention_days", "outage_hours"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise CapacityError(f"{name} must be a finite number >= 0, not {value}")
        for name in ("peak_factor", "latency_seconds"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise CapacityError(f"{name} must be a finite number > 0, not {value}")
        if self.peak_factor < 1:
            raise CapacityError(
                f"peak_factor must be >= 1 (peak over average), not {self.peak_factor}"
            )


@dataclass(frozen=True, slots=True)
class Limits:
    """The relay settings the plan depends on."""

    max_connections_per_destination: int
    max_messages_per_connection: int
    min_free_bytes: int

    @classmethod
    def of(cls, delivery: DeliveryConfig, spool: SpoolConfig) -> Limits:
        """The limits of a configuration; of ``DeliveryConfig(), SpoolConfig()``: the defaults."""
        return cls(
            delivery.max_connections_per_destination,
            delivery.max_messages_per_connection,
            spool.min_free,
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """What to provision, with the inputs it came from."""

    workload: Workload
    limits: Limits
    average_rate_per_s: float
    peak_rate_per_s: float
    #: Messages queued at the end of an outage of ``workload.outage_hours`` at peak.
    peak_queued_messages: int
    bytes_per_queued_message: float
    spool_data_bytes: int
    #: What to provision: the queued mail plus ``spool.min_free``, below which mail is refused.
    spool_bytes: int
    log_bytes_per_day: int
    log_bytes: int
    #: Outbound connections busy at once at peak (Little's law), at least one.
    concurrent_connections: int
    #: Deliveries a second one destination can take within the per-destination connection cap.
    max_rate_per_destination: float
    #: Destinations the peak must be spread over to stay within that cap.
    destinations_at_cap: int
    #: New outbound connections a second at peak when every connection is used to its limit.
    new_connections_per_s: float


def plan(workload: Workload, limits: Limits) -> Plan:
    """The capacity ``workload`` needs on a relay with ``limits``."""
    average = workload.messages_per_day / SECONDS_PER_DAY
    peak = average * workload.peak_factor
    queued = math.ceil(
        workload.outage_hours / 24.0 * workload.messages_per_day * workload.peak_factor
    )
    per_message = workload.avg_size_bytes + ENVELOPE_BYTES
    data = math.ceil(queued * per_message)
    log_per_day = math.ceil(workload.messages_per_day * LOG_BYTES_PER_MESSAGE)
    connections = max(1, math.ceil(peak * workload.latency_seconds))
    per_destination = limits.max_connections_per_destination / workload.latency_seconds
    return Plan(
        workload=workload,
        limits=limits,
        average_rate_per_s=average,
        peak_rate_per_s=peak,
        peak_queued_messages=queued,
        bytes_per_queued_message=per_message,
        spool_data_bytes=data,
        spool_bytes=data + limits.min_free_bytes,
        log_bytes_per_day=log_per_day,
        log_bytes=math.ceil(log_per_day * workload.retention_days),
        concurrent_connections=connections,
        max_rate_per_destination=per_destination,
        destinations_at_cap=max(1, math.ceil(connections / limits.max_connections_per_destination)),
        new_connections_per_s=peak / limits.max_messages_per_connection,
    )


# ----------------------------------------------------------------- measuring


@dataclass(frozen=True, slots=True)
class Measured:
    """A running relay's figures, from its metrics."""

    #: Messages received per second, and how: ``window`` (between the two scrapes) or
    #: ``lifetime`` (the counter since the relay started, when nothing came in between).
    received_per_s: float
    rate_source: str
    #: Average size of a received message as spooled, if any was received.
    avg_size_bytes: float | None
    #: Average time of one outbound SMTP transaction, if any was made.
    latency_seconds: float | None
    received_total: int
    queue_messages: int

    @property
    def messages_per_day(self) -> float:
        """The received rate as messages a day."""
        return self.received_per_s * SECONDS_PER_DAY


def _samples(text: str) -> dict[str, float]:
    """Every sample of a Prometheus exposition by name, added up over its labels."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def measure(first: str, second: str, elapsed: float, now: float) -> Measured:
    """The figures of a relay from two expositions ``elapsed`` seconds apart.

    ``now`` is the Unix time of the second scrape: with no mail received between the two, the
    rate is the relay's received counter over its life (since ``hamta_messages_received_created``).
    """
    if elapsed <= 0:
        raise CapacityError("the two scrapes need some time between them")
    a, b = _samples(first), _samples(second)
    if "hamta_messages_received_total" not in b:
        raise CapacityError("not a hamta relay's metrics (no hamta_messages_received_total)")

    def delta(name: str) -> float:
        return b.get(name, 0.0) - a.get(name, 0.0)

    received = b["hamta_messages_received_total"]
    messages = delta("hamta_messages_received_total")
    if messages > 0:
        rate, source = messages / elapsed, "window"
        size_bytes, size_messages = delta("hamta_received_bytes_total"), messages
    else:
        created = b.get("hamta_messages_received_created")
        uptime = now - created if created else 0.0
        rate, source = (received / uptime if uptime > 0 else 0.0), "lifetime"
        size_bytes, size_messages = b.get("hamta_received_bytes_total", 0.0), received
    # A relay older than the received-bytes counter has none: then no size is measured.
    has_bytes = "hamta_received_bytes_total" in b and size_messages > 0
    count = delta("hamta_delivery_duration_seconds_count")
    total = delta("hamta_delivery_duration_seconds_sum")
    if count <= 0:
        count = b.get("hamta_delivery_duration_seconds_count", 0.0)
        total = b.get("hamta_delivery_duration_seconds_sum", 0.0)
    return Measured(
        received_per_s=rate,
        rate_source=source,
        avg_size_bytes=size_bytes / size_messages if has_bytes else None,
        latency_seconds=total / count if count > 0 else None,
        received_total=int(received),
        queue_messages=int(b.get("hamta_queue_messages", 0.0)),
    )


# ----------------------------------------------------------------- reporting


def human_bytes(value: float) -> str:
    """``value`` bytes in binary units, e.g. ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_plan(result: Plan) -> str:
    """The plan as lines for a terminal."""
    w, lim = result.workload, result.limits
    return "\n".join(
        [
            f"workload     {w.messages_per_day:,.0f} messages/day of "
            f"{human_bytes(w.avg_size_bytes)}, peak factor {w.peak_factor:g}",
            f"throughput   {result.average_rate_per_s:.2f} msg/s on average, "
            f"{result.peak_rate_per_s:.2f} msg/s at peak",
            f"spool        {human_bytes(result.spool_bytes)}: "
            f"{result.peak_queued_messages:,} messages queued by a {w.outage_hours:g} h outage "
            f"at peak, {human_bytes(result.bytes_per_queued_message)} each "
            f"(+ {human_bytes(lim.min_free_bytes)} spool.min_free)",
            f"logs         {human_bytes(result.log_bytes)}: "
            f"{human_bytes(result.log_bytes_per_day)}/day kept {w.retention_days:g} days",
            f"connections  {result.concurrent_connections:,} outbound at once at peak "
            f"({w.latency_seconds:g} s per delivery), {result.new_connections_per_s:.2f} new/s "
            f"({lim.max_messages_per_connection} messages each)",
            f"             one destination takes at most {result.max_rate_per_destination:.1f} "
            f"msg/s ({lim.max_connections_per_destination} connections): the peak needs "
            f"{result.destinations_at_cap} destination(s) at that cap",
        ]
    )


def format_measured(measured: Measured, source: str, seconds: float) -> str:
    """What was read from a running relay, as a line for a terminal."""
    how = f"over {seconds:.1f} s" if measured.rate_source == "window" else "since it started"
    size = human_bytes(measured.avg_size_bytes) if measured.avg_size_bytes is not None else "?"
    latency = f"{measured.latency_seconds:.3f} s" if measured.latency_seconds is not None else "?"
    return (
        f"measured     {source}: {measured.received_per_s:.2f} msg/s received {how} "
        f"({measured.received_total:,} in all), average size {size}, "
        f"delivery latency {latency}, {measured.queue_messages:,} queued"
    )


def to_dict(result: Plan, measured: Measured | None = None) -> dict[str, object]:
    """The plan (and what was measured) as one JSON-ready object."""
    data: dict[str, object] = asdict(result)
    data["measured"] = None
    if measured is not None:
        data["measured"] = {**asdict(measured), "messages_per_day": measured.messages_per_day}
    return data
