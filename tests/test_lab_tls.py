"""The lab shows outbound TLS policy: DANE delivered, a wrong TLSA deferred, MTA-STS enforced.

The lab (prefix ``ht``, subnet 198.19.175.0/24) runs its internet host's validating resolver
(unbound: ``dane.lab.test`` and ``badtlsa.lab.test`` signed), the MTA-STS policy host and the
sink with STARTTLS; the pair's relays resolve through the resolver (cluster.lab.tls_site).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cluster.lab.lab import Lab
from tests.support.labs import module_lab
from tests.support.relay import read_events

PREFIX = "ht"
SUBNET = "198.19.175.0/24"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with module_lab(tmp_path_factory.mktemp("labtls"), PREFIX, SUBNET) as built:
        yield built


def _events(lab: Lab, name: str, timeout: float = 20.0, **match: Any) -> list[dict[str, Any]]:
    """The active relay's events called ``name`` whose fields match, once there are some."""
    node = lab.wait_active()
    deadline = time.monotonic() + timeout
    while True:
        found = [
            e
            for e in read_events(lab.node_dir(node) / "relay.log", name)
            if all(e.get(k) == v for k, v in match.items())
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)  # another process writes the log: nothing to await


def test_dane_domain_is_delivered_over_dane(lab: Lab) -> None:
    result = lab.send(2, domain="dane.lab.test")
    assert result.all_acked, result.summary()
    met = _events(lab, "TlsPolicyMet", mx_host="mx.dane.lab.test")
    assert met and met[0]["policy"] == "DANE" and met[0]["policy_type"] == "tlsa"
    assert len(_events(lab, "Delivery", domain="dane.lab.test")) == 2
    assert sum(d["rcpt"].endswith("@dane.lab.test") for d in lab.deliveries()) == 2


def test_wrong_tlsa_is_deferred_with_the_reason(lab: Lab) -> None:
    result = lab.send(1, domain="badtlsa.lab.test")
    assert result.all_acked, result.summary()
    (failure, *_) = _events(lab, "TransientFailure", domain="badtlsa.lab.test")
    assert failure["enhanced_code"] == "4.7.5"
    assert "no TLSA record matches" in failure["response"]
    assert not [d for d in lab.deliveries() if d["rcpt"].endswith("@badtlsa.lab.test")]
    # The operator's view: `hamta queue` on the active node holds it, deferred.
    node = lab.wait_active()
    config = str(lab.node_dir(node) / "relay.toml")
    queue = lab.run_module(node, "hamtactl", ["queue", "--json", "--config", config], timeout=30)
    assert queue.returncode == 0, queue.stderr
    assert json.loads(queue.stdout)["domains"]["badtlsa.lab.test"]["deferred"] == 1


def test_mta_sts_enforce_domain_is_delivered_verified(lab: Lab) -> None:
    result = lab.send(1, domain="sts.lab.test")
    assert result.all_acked, result.summary()
    met = _events(lab, "TlsPolicyMet", mx_host="mx.sts.lab.test")
    assert met and met[0]["policy"] == "MTA-STS enforce"
    assert _events(lab, "Delivery", domain="sts.lab.test")
