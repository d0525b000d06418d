"""The domain API (/api/domains, /api/domain/{d}), the per-destination metrics and their merge.

Real relays deliver to a real MX sink; :class:`DomainStats` and the snapshot merge are also
exercised directly, with a clock the test moves.
"""

from __future__ import annotations

import json
import re
import smtplib
import time
from typing import Any

from hamta.domain_stats import (
    DomainStats,
    destination_metrics,
    domain_view,
    domains_view,
    merge_snapshots,
)
from tests.conftest import MX_HOST, RelayFactory
from tests.support import RecordingSink

QUIET_RETRIES = {"first_delay": "60s", "max_delay": "60s", "jitter": 0.0}


def send_each(port: int, recipients: list[str]) -> None:
    """One message per recipient, from the null sender (so that no DSN adds to the counts)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        for rcpt in recipients:
            client.sendmail("", [rcpt], f"Subject: to {rcpt}\r\n\r\nhello\r\n".encode())


def get_json(relay: Any, path: str) -> tuple[int, dict[str, Any]]:
    status, body = relay.get(path)
    data: dict[str, Any] = json.loads(body)
    return status, data


def destination_samples(text: str) -> dict[str, dict[tuple[str, ...], float]]:
    """The per-destination samples of an exposition: family → label values → value."""
    found: dict[str, dict[tuple[str, ...], float]] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(hamta_destination_\w+)\{(.*)\} (\S+)", line)
        if match and not match.group(1).endswith("_created"):
            values = tuple(v for _, v in re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            found.setdefault(match.group(1), {})[values] = float(match.group(3))
    return found


def wait_until_metrics(relay: Any, check: Any, timeout: float = 15.0) -> dict[str, Any]:
    """Poll /metrics until ``check(samples)`` holds; return the samples."""
    deadline = time.monotonic() + timeout
    while True:
        _, body = relay.get("/metrics")
        samples = destination_samples(body.decode())
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise TimeoutError(f"metrics never matched: {samples}")
        time.sleep(0.05)


def test_domain_api_counts_deliveries_and_bounces(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay({"retry": QUIET_RETRIES})
    delivered = [f"ok{i}@sink.test" for i in range(4)]
    bounced = ["reject1@sink.test", "reject2@sink.test", "full1@sink.test"]
    send_each(relay.port, [*delivered, *bounced, "defer1@sink.test", "other1@other.test"])
    relay.wait_events("Delivery", 5)
    relay.wait_events("Bounce", 3)
    relay.wait_events("TransientFailure", 1)

    status, view = get_json(relay, "/api/domain/sink.test")
    assert status == 200
    assert view["domain"] == "sink.test" and view["window_seconds"] == 3600
    assert view["attempts"] == 8
    assert (view["delivered"], view["hard_bounces"], view["deferred"]) == (4, 3, 1)
    assert view["soft_bounces"] == 1 and view["expired"] == 0
    assert view["hard_bounce_rate"] == round(3 / 8, 4)
    assert view["soft_bounce_rate"] == round(1 / 8, 4)
    assert view["complaints"] == 0 and view["complaint_rate"] == 0.0
    assert (view["queued"], view["queued_deferred"], view["in_flight"]) == (1, 1, 0)
    assert view["bounce_classes"] == {
        "InvalidRecipient": 2,
        "QuotaIssues": 1,
        "ServiceUnavailable": 1,
    }
    assert view["avg_latency_ms"] is not None and view["avg_latency_ms"] > 0
    assert view["suspended"] is False and view["throttled"] is False
    assert view["totals"] == {
        "delivered": 4,
        "deferred": 1,
        "bounced": 3,
        "expired": 0,
        "complaints": 0,
    }
    assert isinstance(view["connections"], int)

    status, listing = get_json(relay, "/api/domains")
    assert status == 200 and listing["window_seconds"] == 3600 and listing["count"] == 2
    assert [d["domain"] for d in listing["domains"]] == ["sink.test", "other.test"]
    assert listing["domains"][1]["delivered"] == 1
    assert get_json(relay, "/api/domains?limit=1")[1]["domains"][0]["domain"] == "sink.test"
    assert relay.get("/api/domains?limit=x")[0] == 400
    # Names are case-insensitive; a domain never seen is a 404.
    assert get_json(relay, "/api/domain/SINK.test.")[1]["delivered"] == 4
    status, missing = get_json(relay, "/api/domain/never.test")
    assert status == 404 and missing["domain"] == "never.test"
    # /api/queue as before, with the recipients a session holds beside them.
    assert relay.queue()["domains"]["sink.test"] == {"ready": 0, "deferred": 1, "in_flight": 0}


def test_top_n_destinations_and_other(make_relay: RelayFactory, sink: RecordingSink) -> None:
    domains = [f"d{i}.test" for i in range(1, 6)]
    routes = {d: f"[{MX_HOST}]:{sink.port}" for d in domains}
    relay = make_relay(
        {"admin": {"top_destinations": 2}, "delivery": {"routes": routes}, "retry": QUIET_RETRIES}
    )
    deferred = {"d1.test": 1, "d2.test": 4, "d3.test": 2, "d4.test": 3, "d5.test": 1}
    send_each(relay.port, [f"defer{i}@{d}" for d, n in deferred.items() for i in range(n)])
    send_each(relay.port, ["ok1@d1.test", "reject1@d3.test"])

    def settled(samples: dict[str, Any]) -> bool:
        queue = samples.get("hamta_destination_queue_messages", {})
        return sum(queue.values()) == 11 and len(relay.events("TransientFailure")) == 11

    samples = wait_until_metrics(relay, settled)
    assert samples["hamta_destination_queue_messages"] == {
        ("d2.test",): 4.0,
        ("d4.test",): 3.0,
        ("other",): 4.0,
    }
    relay.wait_events("Bounce")
    samples = wait_until_metrics(
        relay,
        lambda s: s["hamta_destination_deliveries_total"].get(("other", "bounced")) == 1.0,
    )
    assert samples["hamta_destination_deliveries_total"] == {
        ("d2.test", "delivered"): 0.0,
        ("d2.test", "deferred"): 4.0,
        ("d2.test", "bounced"): 0.0,
        ("d4.test", "delivered"): 0.0,
        ("d4.test", "deferred"): 3.0,
        ("d4.test", "bounced"): 0.0,
        ("other", "delivered"): 1.0,
        ("other", "deferred"): 4.0,
        ("other", "bounced"): 1.0,
    }

    # d5 overtakes both: d4's labels are gone from the next scrape, not left to linger.
    send_each(relay.port, [f"defer{i}@d5.test" for i in range(1, 6)])
    # A recipient being tried is in neither column: wait until each has been refused once.
    samples = wait_until_metrics(
        relay,
        lambda s: (
            s["hamta_destination_queue_messages"].get(("d5.test",)) == 6.0
            and len(relay.events("TransientFailure")) == 16
        ),
    )
    assert samples["hamta_destination_queue_messages"] == {
        ("d5.test",): 6.0,
        ("d2.test",): 4.0,
        ("other",): 6.0,
    }
    assert not any("d4.test" in key for key in samples["hamta_destination_deliveries_total"])


def test_node_with_two_workers_merges_domain_answers(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay({"node": {"workers": 2}, "retry": QUIET_RETRIES})
    # Each message on a new connection, so that the kernel spreads them over both workers.
    recipients = [f"ok{i}@sink.test" for i in range(12)] + ["reject1@sink.test", "defer1@sink.test"]
    for rcpt in recipients:
        send_each(relay.port, [rcpt])
    relay.wait_events("Delivery", 12)
    relay.wait_events("Bounce", 1)
    relay.wait_events("TransientFailure", 1)
    workers = {e.get("worker") for e in relay.events("Delivery")}
    status, view = get_json(relay, "/api/domain/sink.test")
    assert status == 200
    assert (view["delivered"], view["hard_bounces"], view["deferred"]) == (12, 1, 1)
    assert view["queued"] == 1
    samples = wait_until_metrics(relay, bool)
    assert samples["hamta_destination_deliveries_total"][("sink.test", "delivered")] == 12.0
    assert samples["hamta_destination_queue_messages"][("sink.test",)] == 1.0
    assert len(workers) == 2, "the kernel gave every connection to one worker"


# ------------------------------------------------------- the statistics alone


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


def test_window_slides_and_totals_stay() -> None:
    clock = FakeClock()
    stats = DomainStats(window=3600, clock=clock)
    stats.record("a.test", "delivered", 3, latency_ms=20.0)
    stats.record("a.test", "bounced", bounce_class="InvalidRecipient")
    stats.record_complaint("a.test")
    view = domain_view("a.test", stats.snapshot()["domains"]["a.test"], 3600)
    assert (view["delivered"], view["hard_bounces"], view["complaints"]) == (3, 1, 1)
    assert view["avg_latency_ms"] == 20.0 and view["complaint_rate"] == round(1 / 3, 4)
    clock.now += 1800
    stats.record("a.test", "deferred", bounce_class="RateLimited")
    clock.now += 1900  # the first bucket is now more than an hour old
    view = domain_view("a.test", stats.snapshot()["domains"]["a.test"], 3600)
    assert (view["delivered"], view["hard_bounces"], view["deferred"]) == (0, 0, 1)
    assert view["bounce_classes"] == {"RateLimited": 1} and view["avg_latency_ms"] is None
    assert view["totals"]["delivered"] == 3 and view["totals"]["complaints"] == 1


def test_least_recently_active_domain_is_forgotten() -> None:
    clock = FakeClock()
    stats = DomainStats(max_domains=2, clock=clock)
    stats.record("a.test", "delivered", 5)
    stats.record("b.test", "delivered")
    stats.record("a.test", "delivered")  # a is now more recent than b
    stats.record("c.test", "bounced")
    assert len(stats) == 2 and "b.test" not in stats and "a.test" in stats
    snapshot = stats.snapshot()
    assert snapshot["evicted"]["delivered"] == 1
    # The forgotten domain's totals stay in `other`, which never goes down.
    text = destination_metrics(snapshot, top=1)
    assert (
        'hamta_destination_deliveries_total{destination="a.test",outcome="delivered"} 6.0' in text
    )
    assert 'hamta_destination_deliveries_total{destination="other",outcome="delivered"} 1.0' in text
    assert 'hamta_destination_deliveries_total{destination="other",outcome="bounced"} 1.0' in text


def test_snapshots_of_workers_add_up() -> None:
    first, second = DomainStats(clock=FakeClock()), DomainStats(clock=FakeClock())
    first.record("a.test", "delivered", 2, latency_ms=10.0)
    second.record("a.test", "delivered", 2, latency_ms=30.0)
    second.record("b.test", "bounced", bounce_class="BadDomain")
    one, two = first.snapshot(), second.snapshot()
    two["domains"]["a.test"].update(queued_deferred=3, throttled=True)
    merged = merge_snapshots([one, two])
    view = domain_view("a.test", merged["domains"]["a.test"], merged["window_seconds"])
    assert view["delivered"] == 4 and view["avg_latency_ms"] == 20.0
    assert view["queued"] == 3 and view["throttled"] is True
    listing = domains_view(merged)
    assert [d["domain"] for d in listing["domains"]] == ["a.test", "b.test"]
    assert listing["domains"][1]["bounce_classes"] == {"BadDomain": 1}
