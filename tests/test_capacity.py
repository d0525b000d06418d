"""``hamta capacity``: the formulas of hamta/capacity.py, and the command against a real relay."""

from __future__ import annotations

import json
import math
import smtplib
import subprocess
import threading

import pytest
from prometheus_client import generate_latest

from hamta import capacity
from hamta.capacity import Limits, Workload, measure, plan
from hamta.config import DeliveryConfig, SmtpConfig, SpoolConfig
from hamta.metrics import RelayMetrics
from tests.conftest import RelayFactory
from tests.support import RecordingSink
from tests.support.relay import HAMTA

DEFAULTS = Limits.of(DeliveryConfig(), SpoolConfig())


def test_defaults_are_the_relays() -> None:
    assert Limits(20, 100, 32 * 1024 * 1024) == DEFAULTS


def test_plan_of_a_million_messages_a_day() -> None:
    workload = Workload(
        1_000_000, 50 * 1024, retention_days=14, outage_hours=24, peak_factor=3, latency_seconds=0.5
    )
    result = plan(workload, DEFAULTS)
    assert result.average_rate_per_s == pytest.approx(1_000_000 / 86400)
    assert result.peak_rate_per_s == pytest.approx(3 * 1_000_000 / 86400)
    # A day's outage at three times the average rate queues three days of mail.
    assert result.peak_queued_messages == 3_000_000
    assert result.bytes_per_queued_message == 50 * 1024 + 512
    assert result.spool_data_bytes == 3_000_000 * (50 * 1024 + 512)
    assert result.spool_bytes == result.spool_data_bytes + 32 * 1024 * 1024
    assert result.log_bytes_per_day == 1_000_000 * 2048
    assert result.log_bytes == 14 * 1_000_000 * 2048
    # Little's law: 34.7 msg/s x 0.5 s = 17.4 connections busy, so 18.
    assert result.concurrent_connections == 18
    assert result.max_rate_per_destination == pytest.approx(40.0)
    assert result.destinations_at_cap == 1
    assert result.new_connections_per_s == pytest.approx(result.peak_rate_per_s / 100)


def test_outage_scales_the_spool_linearly() -> None:
    base = Workload(240_000, 10 * 1024, outage_hours=1, peak_factor=2)
    one = plan(base, DEFAULTS)
    six = plan(Workload(240_000, 10 * 1024, outage_hours=6, peak_factor=2), DEFAULTS)
    assert one.peak_queued_messages == 20_000  # 1/24 x 240,000 x 2
    assert six.peak_queued_messages == 6 * one.peak_queued_messages
    assert six.spool_data_bytes == 6 * one.spool_data_bytes
    none = plan(Workload(240_000, 10 * 1024, outage_hours=0), DEFAULTS)
    assert none.peak_queued_messages == 0 and none.spool_bytes == DEFAULTS.min_free_bytes


def test_connections_beyond_one_destinations_cap() -> None:
    # 100 msg/s at peak, 2 s a delivery: 200 connections, ten destinations at 20 each.
    result = plan(Workload(100 * 86400, 1024, peak_factor=1, latency_seconds=2), DEFAULTS)
    assert result.peak_rate_per_s == pytest.approx(100)
    assert result.concurrent_connections == 200
    assert result.max_rate_per_destination == pytest.approx(10)
    assert result.destinations_at_cap == 10
    tight = Limits(
        max_connections_per_destination=50, max_messages_per_connection=10, min_free_bytes=0
    )
    other = plan(Workload(100 * 86400, 1024, peak_factor=1, latency_seconds=2), tight)
    assert other.destinations_at_cap == 4
    assert other.new_connections_per_s == pytest.approx(10)


def test_an_idle_relay_still_needs_a_connection() -> None:
    result = plan(Workload(0, 0), DEFAULTS)
    assert result.concurrent_connections == 1 and result.peak_rate_per_s == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"messages_per_day": -1},
        {"avg_size_bytes": math.inf},
        {"peak_factor": 0.5},
        {"latency_seconds": 0},
        {"outage_hours": math.nan},
    ],
)
def test_bad_figures_are_refused(kwargs: dict[str, float]) -> None:
    figures = {"messages_per_day": 1000.0, "avg_size_bytes": 1024.0, **kwargs}
    with pytest.raises(capacity.CapacityError):
        Workload(**figures)


def test_human_bytes() -> None:
    assert capacity.human_bytes(512) == "512 B"
    assert capacity.human_bytes(1536) == "1.5 KiB"
    assert capacity.human_bytes(3 * 1024**3) == "3.0 GiB"
    assert capacity.human_bytes(5 * 1024**5) == "5120.0 TiB"


def _exposition(metrics: RelayMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_measure_over_the_window_between_two_scrapes() -> None:
    metrics = RelayMetrics()  # the relay's own registry, rendered as /metrics renders it
    metrics.received.inc(10)
    metrics.received_bytes.inc(10 * 1000)
    metrics.delivery_seconds.observe(1.0)
    first = _exposition(metrics)
    metrics.received.inc(20)
    metrics.received_bytes.inc(20 * 4000)
    metrics.delivery_seconds.observe(0.2)
    metrics.delivery_seconds.observe(0.4)
    metrics.queue_depth.set(7)
    measured = measure(first, _exposition(metrics), elapsed=4.0, now=0.0)
    assert measured.rate_source == "window"
    assert measured.received_per_s == pytest.approx(5.0)
    assert measured.messages_per_day == pytest.approx(5.0 * 86400)
    assert measured.avg_size_bytes == pytest.approx(4000)  # of the window, not of all time
    assert measured.latency_seconds == pytest.approx(0.3)
    assert measured.received_total == 30 and measured.queue_messages == 7


def test_measure_falls_back_to_the_relays_lifetime() -> None:
    metrics = RelayMetrics()
    metrics.received.inc(100)
    metrics.received_bytes.inc(100 * 2048)
    text = _exposition(metrics)
    created = metrics.registry.get_sample_value("hamta_messages_received_created")
    assert created is not None
    measured = measure(text, text, elapsed=2.0, now=created + 50.0)
    assert measured.rate_source == "lifetime"
    assert measured.received_per_s == pytest.approx(2.0)
    assert measured.avg_size_bytes == pytest.approx(2048)
    assert measured.latency_seconds is None


def test_measure_refuses_what_is_not_a_relay() -> None:
    with pytest.raises(capacity.CapacityError, match="not a hamta relay"):
        measure("", "up 1\n", elapsed=1.0, now=0.0)


def _send(port: int, count: int, body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        for _ in range(count):
            refused = client.sendmail("a@origin.test", ["x@sink.test"], body)
            assert not refused


def _capacity(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HAMTA, "capacity", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_from_the_metrics_of_a_running_relay(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay()
    body = b"Subject: capacity\r\n\r\n" + b"x" * 70 * 3 + b"\r\n" + (b"y" * 98 + b"\r\n") * 30
    _send(relay.port, 5, body)
    assert sink.wait_for(5, timeout=20)

    # Nothing received while it measures: the rate is the relay's lifetime average.
    idle = _capacity(
        "--from-metrics",
        relay.admin_url,
        "--sample-seconds",
        "0.5",
        "--json",
        "--outage-hours",
        "12",
        "--peak-factor",
        "2",
    )
    assert idle.returncode == 0, idle.stderr
    result = json.loads(idle.stdout)
    measured = result["measured"]
    assert measured["rate_source"] == "lifetime" and measured["received_total"] == 5
    # The spooled size: the body plus the Received: header the relay put on top.
    assert len(body) < measured["avg_size_bytes"] < len(body) + 600
    assert 0 < measured["latency_seconds"] < 5
    assert result["workload"]["avg_size_bytes"] == measured["avg_size_bytes"]
    assert result["workload"]["latency_seconds"] == measured["latency_seconds"]
    assert result["workload"]["messages_per_day"] == pytest.approx(measured["messages_per_day"])
    per_day = measured["messages_per_day"]
    assert result["peak_queued_messages"] == math.ceil(12 / 24 * per_day * 2)

    # Mail flowing while it measures: the rate of that window; explicit figures still win.
    done = threading.Event()

    def keep_sending() -> None:
        while not done.wait(0.05):  # paced, so that mail arrives between the two scrapes
            _send(relay.port, 1, body)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        busy = _capacity(
            "--from-metrics",
            relay.admin_url + "/metrics",
            "--sample-seconds",
            "2",
            "--json",
            "--avg-size",
            "100",
        )
    finally:
        done.set()
        sender.join()
    assert busy.returncode == 0, busy.stderr
    result = json.loads(busy.stdout)
    assert result["measured"]["rate_source"] == "window"
    assert result["measured"]["received_per_s"] > 0
    assert result["workload"]["avg_size_bytes"] == 100 * 1024

    text = _capacity("--from-metrics", relay.admin_url, "--sample-seconds", "0.2")
    assert text.returncode == 0, text.stderr
    assert f"measured     {relay.admin_url} (active)" in text.stdout
    assert "spool" in text.stdout and "connections" in text.stdout


def test_cli_without_figures(make_relay: RelayFactory) -> None:
    given = _capacity(
        "--messages-per-day",
        "86400",
        "--avg-size",
        "10",
        "--peak-factor",
        "1",
        "--latency",
        "1",
        "--json",
    )
    assert given.returncode == 0, given.stderr
    result = json.loads(given.stdout)
    assert result["peak_rate_per_s"] == pytest.approx(1.0)
    assert result["concurrent_connections"] == 1 and result["measured"] is None
    assert _capacity("--avg-size", "10").returncode == 2
    assert _capacity("--messages-per-day", "10", "--avg-size", "-1").returncode == 2
    # A standby relay has received nothing to measure.
    standby = make_relay(standby=True)
    empty = _capacity("--from-metrics", standby.admin_url, "--sample-seconds", "0.1")
    assert empty.returncode == 2 and "--messages-per-day" in empty.stderr


def test_descriptors_needed_counts_sessions_connections_and_a_margin() -> None:
    assert capacity.descriptors_needed(1000, 20) == 1276
    # systemd's default soft limit does not hold the default limits: the units raise it.
    defaults = capacity.descriptors_needed(
        SmtpConfig().max_connections, DeliveryConfig().max_connections_per_destination
    )
    assert defaults > 1024
