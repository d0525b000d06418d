"""Shared fixtures: a real DNS server for the test domains, MX sinks and relay processes.

Addresses: the relay under test listens on 127.0.0.1; MX sinks listen on 127.0.0.5 to 127.0.0.7,
all on one port (the relay's delivery port is a single setting, as port 25 is in production).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadGroupScheduling

from cluster.zookeeper import ZooKeeperEnsemble
from tests.support import DnsServer, RecordingSink, free_port
from tests.support import zookeeper as zookeeper_support
from tests.support.prometheus import Prometheus
from tests.support.relay import RelayProcess

# The decision tests' harness asserts on every step of a walk: pytest explains those failures too.
pytest.register_assert_rewrite("tests.support.decisions", "tests.support.random_walks")

# The files that build network namespaces, labs, chaos runs or benchmarks. Under pytest-xdist
# (the default: pyproject's addopts, -n 3 --dist loadgroup) each group's files run one after
# another on one worker: their timings are sensitive to load and some judge their lab's
# leftovers, while the other tests, independent (free ports, their own tmp_path), spread over
# the other workers. The two groups run side by side: their labs have their own prefixes and
# subnets (tests/test_ci_groups.py checks it), and a lab keeps its ports, nftables tables and
# processes inside its own namespaces. The chaos short profile alone is over a third of the
# suite's time: with every other lab in the same group, the group would be the whole run.
# tests/test_ci_groups.py finds files that should be here and are not.
SERIAL_GROUP = "namespaces"
CHAOS_GROUP = "chaos"
FIXED_ADDRESS_GROUP = "fixed-addresses"
SERIAL_GROUPS: Mapping[str, frozenset[str]] = {
    SERIAL_GROUP: frozenset(
        {
            "test_bench_failover.py",
            "test_bench_monitor.py",
            "test_failover.py",
            "test_failsafe_lab.py",
            "test_fast_takeover_lab.py",
            "test_fencing_lab.py",
            "test_fuzz.py",
            "test_lab.py",
            "test_lab_egress.py",
            "test_lab_haproxy.py",
            "test_lab_monitor.py",
            "test_lab_monitor_checks.py",
            "test_lab_pairs.py",
            "test_lab_submission.py",
            "test_lab_tls.py",
            "test_partition_baseline.py",
            "test_peer_channel_cut_lab.py",
            "test_vagrant_cluster.py",
            "test_vagrant_fleet.py",
            "test_vip.py",
            "test_vip_set.py",
            "test_vip_set_announce.py",
            "test_watchdog.py",
            "test_watchdog_egress.py",
            "test_zookeeper.py",
        }
    ),
    CHAOS_GROUP: frozenset(
        {
            "test_chaos.py",
            "test_chaos_alerts.py",
            "test_unix_paths.py",  # its lab and chaos run are refused; were they not: prefix hct
        }
    ),
    # Not namespaces: fixed loopback addresses and ports. test_tls_policy's module fixture (an
    # HTTPS policy host on 443, as MTA-STS requires): spread over workers, each built its own,
    # and all but the first failed with "address already in use". test_privileges' relays bind
    # the first free port below 1024: two tests on two workers found the same one free.
    FIXED_ADDRESS_GROUP: frozenset({"test_tls_policy.py", "test_privileges.py"}),
}
# The files that build namespaces, labs or benchmarks (tests/test_ci_groups.py finds them).
SERIAL_FILES = frozenset(
    name for group, files in SERIAL_GROUPS.items() if group != FIXED_ADDRESS_GROUP for name in files
)
_GROUP_OF = {name: group for group, files in SERIAL_GROUPS.items() for name in files}

MX_HOST = "127.0.0.5"
DEAD_MX_HOST = "127.0.0.6"
TLS_MX_HOST = "127.0.0.7"


# xdist ships no type information: its class is Any to mypy.
class SerialGroupScheduling(LoadGroupScheduling):  # type: ignore[misc]
    """xdist's loadgroup scheduling, the group of each test taken from SERIAL_GROUPS.

    Not an ``xdist_group`` mark: xdist 3.8 carries a mark's group in the test's id, which
    pytest 9.2 no longer lets it change, and the mark is then silently ignored
    (pytest-dev/pytest-xdist#1386). Every other test is a unit of its own, free to spread.
    """

    def _split_scope(self, nodeid: str) -> str:
        return scheduling_unit(nodeid)


def scheduling_unit(nodeid: str) -> str:
    """The unit of scheduling of the test ``nodeid``: its file's group, or the test alone."""
    return _GROUP_OF.get(nodeid.split("::", 1)[0].rsplit("/", 1)[-1], nodeid)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> SerialGroupScheduling | None:
    """With ``--dist loadgroup``, the serial groups of SERIAL_GROUPS."""
    if config.getvalue("dist") != "loadgroup":
        return None
    return SerialGroupScheduling(config, log)


# Whether a test's call failed, for fixtures that keep what a failure needs (short_tmp).
_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture
def short_tmp(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory with a short path (/tmp/hamta-t...), removed after a test that passed.

    For a lab built by a test: its nodes' unix sockets must fit in 107 bytes, and pytest-xdist's
    tmp_path (.../pytest-N/popen-gwN/<test name>/) leaves too little room for a chaos run's
    own directories below it (hamta.unix_paths). After a failure it stays, with the lab's logs,
    and its path is in the test's report.
    """
    path = Path(tempfile.mkdtemp(prefix="hamta-t", dir="/tmp"))
    yield path
    if request.node.stash.get(_CALL_FAILED, True):
        print(f"short_tmp kept for the failure: {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def mx_port() -> int:
    """The port every MX sink of the tests listens on."""
    return free_port(MX_HOST)


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DnsServer]:
    """dnsmasq answering for the test domains, and nothing else."""
    server = DnsServer(
        mx={
            "sink.test": [(10, "mx1.sink.test")],
            "other.test": [(10, "mx1.sink.test")],
            "pref.test": [(10, "dead.pref.test"), (20, "live.pref.test")],
            "tls.test": [(10, "mx.tls.test")],
            "deadmx.test": [(10, "dead.pref.test")],
        },
        a={
            "mx1.sink.test": [MX_HOST],
            "live.pref.test": [MX_HOST],
            "dead.pref.test": [DEAD_MX_HOST],
            "amx.test": [MX_HOST],
            "mx.tls.test": [TLS_MX_HOST],
        },
        null_mx=["nomail.test"],
    )
    with server:
        yield server


@pytest.fixture
def sink(mx_port: int) -> Iterator[RecordingSink]:
    """The main MX sink, on 127.0.0.5."""
    with RecordingSink(host=MX_HOST, port=mx_port) as recording:
        yield recording


RelayFactory = Callable[..., RelayProcess]


@pytest.fixture
def make_relay(tmp_path: Path, dns_server: DnsServer, mx_port: int) -> Iterator[RelayFactory]:
    """Build (and at the end stop) relay processes wired to the test DNS and MX port."""
    relays: list[RelayProcess] = []

    def factory(
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        start: bool = True,
        name: str = "relay",
        **kwargs: Any,
    ) -> RelayProcess:
        merged: dict[str, dict[str, Any]] = {
            "dns": {"nameservers": [dns_server.nameserver]},
            "delivery": {"port": mx_port},
        }
        for section, keys in (overrides or {}).items():
            merged.setdefault(section, {}).update(keys)
        relay = RelayProcess(tmp_path / f"{name}{len(relays)}", merged, **kwargs)
        relays.append(relay)
        if start:
            relay.start()
        return relay

    yield factory
    for relay in relays:
        relay.stop()


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperEnsemble]:
    """A standalone ZooKeeper server on 127.0.0.1 (200 ms ticks), shared by the session."""
    with zookeeper_support.standalone(tmp_path_factory.mktemp("zookeeper")) as ensemble:
        yield ensemble


@pytest.fixture(scope="session")
def zookeeper_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperEnsemble]:
    """Three ZooKeeper servers on 127.0.0.11 to .13 (200 ms ticks), shared by the session.

    A test that stops one of them starts it again before it ends.
    """
    with zookeeper_support.three_servers(tmp_path_factory.mktemp("ensemble")) as ensemble:
        yield ensemble


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[list[RelayProcess], Path], Prometheus]]:
    """Start (and at the end stop) a Prometheus scraping relays as job "hamta" with ``rules``."""
    started: list[Prometheus] = []

    def start(relays: list[RelayProcess], rules: Path) -> Prometheus:
        targets = [relay.admin_url.removeprefix("http://") for relay in relays]
        server = Prometheus(tmp_path / "prometheus", targets, rules)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a file system that really runs out of space."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        # Lazy, so that a test that failed with files still open does not leave the mount.
        subprocess.run(["umount", "--lazy", str(mount)], check=True)
