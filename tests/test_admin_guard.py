"""The admin endpoint's security headers and its ``Host`` check (DNS rebinding), on a real relay.

Requests go over a real socket to a real ``hamta serve`` with hand-written ``Host`` headers, as a
browser tricked by a rebinding page would send them.
"""

from __future__ import annotations

import http.client
import json

import pytest

from hamta.admin_guard import CONTENT_SECURITY_POLICY, HostCheck
from hamta.config import ConfigError, parse_config
from tests.conftest import RelayFactory
from tests.support.relay import RelayProcess


def get(relay: RelayProcess, path: str, host: str | None) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", relay.admin_port, timeout=5)
    connection.putrequest("GET", path, skip_host=True)
    if host is not None:
        connection.putheader("Host", host)
    connection.endheaders()
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def test_every_answer_carries_the_security_headers(make_relay: RelayFactory) -> None:
    relay = make_relay()
    own = f"127.0.0.1:{relay.admin_port}"
    for path, status in (("/", 200), ("/metrics", 200), ("/api/queue", 200), ("/nothing", 404)):
        response = get(relay, path, own)
        assert response.status == status, path
        assert response.getheader("Content-Security-Policy") == CONTENT_SECURITY_POLICY
        assert "default-src 'self'" in CONTENT_SECURITY_POLICY
        assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        assert response.getheader("X-Frame-Options") == "DENY"
        assert response.getheader("Referrer-Policy") == "no-referrer"


def test_only_the_listen_address_localhost_and_allowed_names_are_answered(
    make_relay: RelayFactory,
) -> None:
    relay = make_relay({"admin": {"allowed_hosts": ["mx1.example.test", "[::1]"]}})
    port = relay.admin_port
    answered = [
        f"127.0.0.1:{port}",
        "127.0.0.1",  # the lab's probe sends no port
        f"localhost:{port}",
        "LOCALHOST:9000",  # an SSH tunnel changes the port, not the name
        f"mx1.example.test:{port}",
        "mx1.example.test.",
        f"[::1]:{port}",
    ]
    for host in answered:
        assert get(relay, "/api/queue", host).status == 200, host
    refused = [
        f"rebind.attacker.example:{port}",  # DNS rebinding: the page's own name
        f"127.0.0.2:{port}",  # not the listen address
        f"localhost.attacker.example:{port}",
        "",
        "[::1",
    ]
    for host in refused:
        response = get(relay, "/api/queue", host)
        assert response.status == 421, host
        assert response.getheader("X-Frame-Options") == "DENY"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("GET", "/metrics", headers={"Host": "evil.example"})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    assert response.status == 421
    assert "'evil.example' is not answered" in text and "admin.allowed_hosts" in text
    # The relay serves on: what the agent and the tools read works.
    assert json.loads(relay.get("/api/queue")[1])["state"] == "active"
    assert relay.get("/health/ready")[0] == 200


def test_an_endpoint_on_every_address_answers_ip_literals_but_no_other_name() -> None:
    check = HostCheck("0.0.0.0:8025", [])
    assert check.allows("10.1.2.3:8025") and check.allows("[fd00::5]:8025")
    assert check.allows("localhost:8025")
    assert check.allows(None)  # no Host at all (HTTP/1.0 tools); a browser always sends one
    assert not check.allows("rebind.attacker.example:8025")
    named = HostCheck("[::1]:8025", ["Relay.Example.Test"])
    assert named.allows("[::1]:8025") and named.allows("relay.example.test")
    assert not named.allows("10.1.2.3:8025")


@pytest.mark.parametrize(
    "name", ["mx1:8025", "http://mx1", "a b", "*.example.test", "", "[::1]:8025", "fd00::zz"]
)
def test_an_allowed_host_with_a_port_or_a_pattern_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=r"admin\.allowed_hosts: not a host name"):
        parse_config(f'[admin]\nallowed_hosts = ["{name}"]\n')
