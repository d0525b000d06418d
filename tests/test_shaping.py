"""Per-destination isolation and traffic shaping, against real relays and real MX servers.

The MX servers here are :class:`ScriptedMX`, a small SMTP server of this file's own: it counts
the connections open at once, times every message's arrival, and answers as scripted (accept,
never answer DATA, answer every command slowly, refuse with 421 at the greeting, or throttle).
Destinations get their own MX address or port, so that what one MX sees is one destination.
"""

from __future__ import annotations

import itertools
import smtplib
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from hamta.config import ConfigError, DeliveryConfig, RetryConfig, parse_config
from hamta.shaping import DECREASE_HOLD, Limits, Shaper, is_throttle_reply, limits_for
from hamta.suspensions import SUSPENDED_FILE, read_suspended
from hamta.workers import shard_path
from tests.conftest import MX_HOST, TLS_MX_HOST, RelayFactory
from tests.support import RecordingSink, free_port
from tests.support.relay import HAMTA

THROTTLED = "DestinationThrottled"

# ---------------------------------------------------------------- a scripted MX


@dataclass(frozen=True, slots=True)
class Arrival:
    """One message an MX accepted: when (monotonic), for which domain, on which connection."""

    at: float
    domain: str
    connection: int


class _Session(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        mx = self.server.mx
        number = mx._opened(self.connection)
        try:
            self._converse(mx, number)
        except OSError:
            pass
        finally:
            mx._closed(self.connection)

    def _reply(self, mx: ScriptedMX, line: str) -> None:
        if mx.command_delay:
            # The simulated latency of a slow MX (ends early when the MX stops).
            mx.stopping.wait(mx.command_delay)
        self.wfile.write(line.encode() + b"\r\n")

    def _converse(self, mx: ScriptedMX, number: int) -> None:
        self.wfile.write(mx.greeting.encode() + b"\r\n")
        if not mx.greeting.startswith("220"):
            return
        domain = ""
        while line := self.rfile.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self._reply(mx, "250 scripted.test")
            elif verb == b"MAIL":
                self._reply(mx, "250 2.1.0 Ok")
            elif verb == b"RCPT":
                domain = line.decode().rpartition("@")[2].strip().rstrip(">").lower()
                self._reply(mx, "250 2.1.5 Ok")
            elif verb == b"DATA":
                if mx.stall:
                    mx.stopping.wait()  # never answers
                    return
                self._reply(mx, "354 End data with <CR><LF>.<CR><LF>")
                while self.rfile.readline() not in (b".\r\n", b""):
                    pass
                self._reply(mx, mx._data_reply(domain, number))
            elif verb == b"QUIT":
                self._reply(mx, "221 2.0.0 Bye")
                return
            else:  # RSET, NOOP
                self._reply(mx, "250 2.0.0 Ok")


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, mx: ScriptedMX) -> None:
        self.mx = mx
        super().__init__((mx.host, mx.port), _Session)


class ScriptedMX:
    """An SMTP server on ``host:port`` answering as scripted, counting and timing everything.

    ``reply`` gives the answer to a message's final dot from its recipient domain and the
    number of messages accepted so far (default: 250). ``stall``: never answer DATA.
    ``command_delay``: answer every command that late. ``greeting``: e.g. a 421 that refuses.
    """

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        stall: bool = False,
        command_delay: float = 0.0,
        greeting: str = "220 scripted.test ESMTP",
        reply: Callable[[str, int], str] | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.stall = stall
        self.command_delay = command_delay
        self.greeting = greeting
        self.reply = reply
        self.stopping = threading.Event()
        self._cond = threading.Condition()
        self._sockets: set[socket.socket] = set()
        self.connections = 0
        self.open_now = 0
        self.max_open = 0
        self.arrivals: list[Arrival] = []
        self.refusals = 0
        self._server: _Server | None = None

    def _opened(self, sock: socket.socket) -> int:
        with self._cond:
            self._sockets.add(sock)
            self.connections += 1
            self.open_now += 1
            self.max_open = max(self.max_open, self.open_now)
            self._cond.notify_all()
            return self.connections

    def _closed(self, sock: socket.socket) -> None:
        with self._cond:
            self._sockets.discard(sock)
            self.open_now -= 1
            self._cond.notify_all()

    def _data_reply(self, domain: str, connection: int) -> str:
        with self._cond:
            answer = self.reply(domain, len(self.arrivals)) if self.reply else "250 2.0.0 Ok"
            if answer.startswith("250"):
                self.arrivals.append(Arrival(time.monotonic(), domain, connection))
            else:
                self.refusals += 1
            self._cond.notify_all()
            return answer

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate`` (called under the lock) holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def delivered(self, domain: str | None = None) -> list[Arrival]:
        """Messages accepted so far, for one domain or all."""
        with self._cond:
            return [a for a in self.arrivals if domain is None or a.domain == domain]

    def __enter__(self) -> Self:
        self._server = _Server(self)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            with self._cond:
                for sock in list(self._sockets):
                    sock.close()
            self._server.server_close()


# ------------------------------------------------------------------- helpers


def send(port: int, recipients: list[str], *, per_connection: int = 50) -> None:
    """Submit one message per recipient through the relay, ``per_connection`` a connection."""
    for start in range(0, len(recipients), per_connection):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            for rcpt in recipients[start : start + per_connection]:
                refused = client.sendmail("a@origin.test", [rcpt], b"Subject: t\r\n\r\nbody\r\n")
                assert not refused


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll an external process's state until ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def route(mx: ScriptedMX) -> str:
    return f"[{mx.host}]:{mx.port}"


# ------------------------------------------------------------- pure shaping


def test_rate_limit_spaces_messages_after_a_burst() -> None:
    shaper = Shaper(Limits(messages_per_second=4, burst=2), share=1)
    # Two back to back, then one every quarter second, reserved ahead by concurrent sessions.
    assert [shaper.reserve(10.0) for _ in range(4)] == [0.0, 0.0, 0.25, 0.5]
    assert shaper.reserve(12.0) == 0.0  # idle long enough: the burst is back
    unlimited = Shaper(Limits(), share=4)
    assert unlimited.reserve(0.0) == 0.0 and unlimited.rate is None
    assert Shaper(Limits(max_connections=5, messages_per_second=10), share=2).concurrency == 3
    assert Shaper(Limits(max_connections=5, messages_per_second=10), share=2).rate == 5


def test_throttle_halves_to_a_floor_and_recovers_additively() -> None:
    limits = Limits(max_connections=8, messages_per_second=16, throttle_quiet_period=5.0)
    shaper = Shaper(limits, share=1)
    assert shaper.throttle(0.0) and (shaper.rate, shaper.concurrency) == (8, 4)
    assert not shaper.throttle(DECREASE_HOLD / 2)  # the same burst of replies
    for step in range(1, 10):
        shaper.throttle(step * DECREASE_HOLD * 1.5)
    assert shaper.rate == limits.min_messages_per_second and shaper.concurrency == 1
    assert not shaper.recover(15.0)  # not quiet for long enough yet
    last = 9 * DECREASE_HOLD * 1.5
    rates = []
    now = last
    while shaper.throttled:
        now += limits.throttle_quiet_period
        assert shaper.recover(now)
        rates.append(shaper.rate)
    assert rates[:3] == [5.0, 9.0, 13.0]  # a quarter of 16 a step
    assert (shaper.rate, shaper.concurrency) == (16, 8)


def test_unlimited_destination_recovers_to_its_observed_pace() -> None:
    shaper = Shaper(Limits(throttle_quiet_period=1.0), share=1)
    for n in range(50):
        shaper.reserve(n * 0.1)  # 10 a second
    assert shaper.throttle(5.0)
    assert shaper.rate is not None and 4.0 <= shaper.rate <= 6.0
    now = 5.0
    while shaper.throttled:
        now += 1.0
        shaper.recover(now)
    assert shaper.rate is None


def test_throttle_replies_are_recognised() -> None:
    assert is_throttle_reply(451, "4.7.1 Rate limited, slow down")
    assert is_throttle_reply(421, "4.7.0 Try again later, closing connection")
    assert is_throttle_reply(421, "Too many connections from your address")
    assert not is_throttle_reply(451, "4.3.0 Try again later")  # a plain temporary failure
    assert not is_throttle_reply(550, "5.7.1 rate limited")  # permanent: bounced, not shaped
    assert not is_throttle_reply(0, "connection refused")


def test_limits_layer_domain_over_default_over_older_keys() -> None:
    config = parse_config(
        """
[delivery]
max_connections_per_destination = 7
[delivery.limits]
messages_per_second = 3
retry_first_delay = "10s"
[delivery.domains."Slow.Example"]
max_connections = 2
retry_factor = 3
[retry]
first_delay = "1m"
max_delay = "5s"
"""
    )
    slow = limits_for(config.delivery, config.retry, "slow.example")
    other = limits_for(config.delivery, config.retry, "other.example")
    assert (slow.max_connections, slow.messages_per_second) == (2, 3.0)
    assert (other.max_connections, other.max_messages_per_connection) == (7, 100)
    assert (slow.retry.first_delay, slow.retry.factor, slow.retry.max_delay) == (10, 3, 10)
    default = limits_for(DeliveryConfig(), RetryConfig(), "x.test")
    assert default.messages_per_second is None and default.max_connections == 20


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[delivery.domains."x.test"]\nmax_connections = 0',
            "delivery.domains.x.test.max_connections: Input should be greater than 0",
        ),
        ("[delivery.limits]\nmessages_per_second = -1", "delivery.limits.messages_per_second"),
        ('[delivery.limits]\nmessages_per_second = "fast"', "delivery.limits.messages_per_second"),
        ('[delivery.domains."x.test"]\nmax_conections = 2', "max_conections: unknown key"),
        (
            '[delivery.domains."x.test"]\nretry_first_delay = "2h"\nretry_max_delay = "1h"',
            "retry_first_delay (7200s) exceeds retry_max_delay (3600s)",
        ),
        ('[delivery.limits]\nthrottle_quiet_period = "soon"', "not a duration: 'soon'"),
    ],
)
def test_bad_limit_config_is_a_clear_error(toml: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(toml)
    assert expected in str(error.value)
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    checked = subprocess.run(
        [*HAMTA, "config", "check", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 2 and expected in checked.stderr, checked.stderr


# ------------------------------------------------------------------- isolation


@pytest.mark.parametrize("trouble", ["stalls-at-data", "answers-slowly", "refuses-421"])
def test_troubled_destination_does_not_slow_the_others(
    make_relay: RelayFactory, trouble: str
) -> None:
    scripts: dict[str, dict[str, Any]] = {
        "stalls-at-data": {"stall": True},
        "answers-slowly": {"command_delay": 3.0},
        "refuses-421": {"greeting": "421 4.7.0 Too many connections, try again later"},
    }
    with (
        ScriptedMX(MX_HOST, **scripts[trouble]) as bad,
        ScriptedMX(MX_HOST) as good,
    ):
        relay = make_relay(
            {
                "delivery": {
                    "command_timeout": "60s",
                    "routes": {"bad.test": route(bad), "good.test": route(good)},
                },
            }
        )
        send(relay.port, [f"u{n}@bad.test" for n in range(10)])
        started = time.monotonic()
        send(relay.port, [f"u{n}@good.test" for n in range(100)], per_connection=10)
        assert good.wait(lambda: len(good.arrivals) >= 100, timeout=10), len(good.arrivals)
        elapsed = time.monotonic() - started
        assert elapsed < 8, elapsed
        assert bad.delivered() == []
        if trouble != "refuses-421":
            # The troubled MX still holds the relay's sessions: their mail is still in them.
            assert bad.open_now >= 1
        # All that is left in the spool is the troubled destination's mail.
        wait_until(lambda: relay.queue()["depth"] == 10, timeout=5, what="good.test done")


# ----------------------------------------------------------------- limits


def test_connection_and_rate_limits_are_respected(make_relay: RelayFactory, mx_port: int) -> None:
    # sink.test's MX is 127.0.0.5, tls.test's 127.0.0.7 (tests/conftest.py): one MX each.
    with (
        ScriptedMX(MX_HOST, mx_port, command_delay=0.05) as capped,
        ScriptedMX(TLS_MX_HOST, mx_port) as paced,
    ):
        relay = make_relay(
            {
                "delivery": {
                    "max_connections_per_destination": 10,
                    "domains": {
                        "sink.test": {"max_connections": 3, "max_messages_per_connection": 2},
                        "tls.test": {"messages_per_second": 5, "burst": 1},
                    },
                }
            }
        )
        send(relay.port, [f"c{n}@sink.test" for n in range(24)])
        send(relay.port, [f"r{n}@tls.test" for n in range(16)])
        assert capped.wait(lambda: len(capped.arrivals) >= 24, timeout=30)
        assert paced.wait(lambda: len(paced.arrivals) >= 16, timeout=30)
    assert capped.max_open == 3, capped.max_open
    per_connection: dict[int, int] = {}
    for arrival in capped.arrivals:
        per_connection[arrival.connection] = per_connection.get(arrival.connection, 0) + 1
    assert max(per_connection.values()) <= 2 and capped.connections >= 12
    times = [a.at for a in paced.arrivals]
    # 16 messages at 5 a second, one at a time after the first: 3 s, not much less or more.
    assert 2.7 <= times[-1] - times[0] <= 6, times[-1] - times[0]
    for i, at in enumerate(times):
        in_a_second = sum(1 for other in times[i:] if other < at + 1.0)
        assert in_a_second <= 6, in_a_second


def test_per_domain_retry_schedule_and_retry_command(
    make_relay: RelayFactory, mx_port: int
) -> None:
    relay = make_relay(
        {
            "retry": {"first_delay": "300ms", "jitter": 0.0},
            "delivery": {"domains": {"sink.test": {"retry_first_delay": "1h"}}},
        }
    )
    with RecordingSink(host=MX_HOST, port=mx_port, data_reply="451 4.3.0 busy") as busy:
        send(relay.port, ["a@sink.test", "b@sink.test", "c@amx.test"])
        relay.wait_events("TransientFailure", 3)
        assert busy.count == 0
    with RecordingSink(host=MX_HOST, port=mx_port) as healthy:
        # amx.test keeps the global 300 ms schedule; sink.test waits its hour.
        assert healthy.wait_for(1, timeout=10)
        assert healthy.messages[0].rcpt_tos == ("c@amx.test",)
        assert not healthy.wait_for(2, timeout=1.5)
        result = relay.cli("queue", "retry", "sink.test", "--config", str(relay.config_path))
        assert result.returncode == 0, result.stderr
        assert "sink.test retried in 1 worker(s): 2 deferred jobs due now" in result.stdout
        assert healthy.wait_for(3, timeout=10)
    relay.wait_queue_empty()


# -------------------------------------------------------------- throttling


def test_throttling_destination_slows_down_and_recovers(
    make_relay: RelayFactory, mx_port: int
) -> None:
    throttling = {"on": True}

    def reply(domain: str, accepted: int) -> str:
        return "451 4.7.1 Rate limited, slow down" if throttling["on"] else "250 2.0.0 Ok"

    with ScriptedMX(MX_HOST, mx_port, reply=reply) as mx:
        relay = make_relay(
            {
                # Retries come back faster than the quiet period: each burst of throttle
                # replies finds the destination still throttled and halves it again.
                "retry": {"first_delay": "200ms", "max_delay": "500ms", "jitter": 0.0},
                "delivery": {
                    "domains": {
                        "sink.test": {
                            "max_connections": 4,
                            "messages_per_second": 40,
                            "min_messages_per_second": 2,
                            "throttle_quiet_period": "2s",
                        }
                    }
                },
            }
        )
        send(relay.port, [f"t{n}@sink.test" for n in range(20)])
        first = relay.wait_events("DestinationThrottled")[0]
        assert first["destination"] == "sink.test" and first["throttled"] is True
        assert first["concurrency"] == 2 and first["messages_per_second"] == 20
        halvings = [e["messages_per_second"] for e in relay.wait_events(THROTTLED, 4)]
        assert halvings[:4] == [20, 10, 5, 2.5]
        assert first["code"] == 451 and "Rate limited" in first["response"]
        wait_until(
            lambda: any(e["messages_per_second"] == 2 for e in relay.events(THROTTLED)),
            timeout=15,
            what="the rate down to its floor",
        )
        throttling["on"] = False
        assert mx.wait(lambda: len(mx.arrivals) >= 20, timeout=30)
        # At the floor, 2 a second: the queued mail trickles, it does not rush.
        spread = mx.arrivals[-1].at - mx.arrivals[0].at
        assert spread >= 2.0, spread
        wait_until(
            lambda: any(e["throttled"] is False for e in relay.events("DestinationRecovered")),
            timeout=30,
            what="full recovery",
        )
        recovered = relay.events("DestinationRecovered")
        assert recovered[-1]["messages_per_second"] == 40 and recovered[-1]["concurrency"] == 4
        assert all(e["throttled"] for e in recovered[:-1])
        # Additive: a step a quiet period, from the floor (2) by a quarter of 40 to 40.
        assert [e["messages_per_second"] for e in recovered] == [12, 22, 32, 40]
        steps = [datetime.fromisoformat(e["ts"]).timestamp() for e in recovered]
        assert all(later - earlier >= 1.9 for earlier, later in itertools.pairwise(steps))
    relay.wait_queue_empty()


# ---------------------------------------------------------- suspend / resume


def test_suspend_resume_retry_through_the_cli_in_every_worker(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay({"node": {"workers": 2}})
    config = ["--config", str(relay.config_path)]
    held = relay.cli("queue", "suspend", "Sink.Test", *config)
    assert held.returncode == 0, held.stderr
    assert held.stdout.strip() == "sink.test suspended in 2 worker(s)"
    for shard in (shard_path(relay.spool, 0), shard_path(relay.spool, 1)):
        assert read_suspended(shard) == {"sink.test"}, shard / SUSPENDED_FILE
    # One message a connection, so that both workers get some (SO_REUSEPORT hashing).
    for n in range(20):
        send(relay.port, [f"held{n}@sink.test"])
    send(relay.port, ["free@other.test"])  # same MX, another destination
    assert sink.wait_for(1, timeout=10)
    assert not sink.wait_for(2, timeout=1.0)
    assert sink.messages[0].rcpt_tos == ("free@other.test",)
    assert relay.queue()["domains"]["sink.test"]["ready"] == 20

    # The hold lives on the spool volume: a restarted relay keeps it.
    relay.stop()
    relay.start()
    assert not sink.wait_for(2, timeout=1.5)
    assert relay.queue()["domains"]["sink.test"]["ready"] == 20

    retried = relay.cli("queue", "--json", "retry", "sink.test", *config)
    assert retried.returncode == 0, retried.stderr
    assert '"moved": 0' in retried.stdout  # nothing deferred; and held mail stays held
    resumed = relay.cli("queue", "resume", "sink.test", *config)
    assert resumed.returncode == 0, resumed.stderr
    assert sink.wait_for(21, timeout=15)
    relay.wait_queue_empty()
    assert read_suspended(relay.spool) == set()
    assert relay.cli("queue", *config).returncode == 0  # the plain view still works
    assert [e["destination"] for e in relay.events("DestinationSuspended")] == ["sink.test"] * 2


def test_destination_commands_need_a_running_relay(tmp_path: Path) -> None:
    result = subprocess.run(
        [*HAMTA, "queue", "suspend", "x.test", "--socket", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1 and "no relay control socket" in result.stderr
