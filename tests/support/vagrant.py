"""What the Vagrant suites share: the cluster's fixture, a load through a pair's VIP, its verdict.

``tests/test_vagrant_cluster.py`` (one pair) and ``tests/test_vagrant_fleet.py`` (two pairs,
``HAMTA_PAIRS=2``) bring their cluster up and down with :func:`vagrant_cluster`, and judge
every load with :func:`drained`: every acknowledged message reached the arbiter's sink.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.lab.history import LoadRun, Verdict, check
from cluster.lab.vagrant import MAIL_DOMAIN, VagrantCluster, VagrantError, wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
# Under TCG an agent restart (a Python import of hamta takes 20-30 s), a reboot (about a
# minute to ssh) and a takeover's steps are all slow: generous bounds, not goals.
TAKEOVER_TIMEOUT = 300.0
REJOIN_TIMEOUT = 900.0
DRAIN_TIMEOUT = 600.0
# `vagrant up` per pair: one pair took 13 min under TCG; two pairs (five machines) were still
# provisioning the arbiter when an hour ran out (load average 7-15 beside other work).
UP_TIMEOUT_PER_PAIR = 3600.0


def _missing_tools() -> list[str]:
    return [
        t for t in ("vagrant", "virsh", "libvirtd", "virtlogd", "nsenter") if not shutil.which(t)
    ]


def vagrant_cluster(
    tmp_path_factory: pytest.TempPathFactory, *, pairs: int
) -> Iterator[VagrantCluster]:
    """The cluster of ``pairs`` pairs, up and provisioned; destroyed and its host side removed.

    ``HAMTA_VAGRANT_WORKDIR=DIR`` keeps the harness's files in DIR and reuses a cluster an
    earlier run left there; ``HAMTA_VAGRANT_KEEP=1`` leaves it up at the end.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root: a network namespace, libvirtd")
    missing = _missing_tools()
    if missing:
        pytest.skip(
            f"missing {missing}: apt-get install vagrant vagrant-libvirt libvirt-daemon-system"
        )
    reuse = os.environ.get("HAMTA_VAGRANT_WORKDIR")
    workdir = Path(reuse) if reuse else tmp_path_factory.mktemp("vagrant")
    machine = VagrantCluster(ROOT, workdir, pairs=pairs)
    machine.ensure_box()
    keep = os.environ.get("HAMTA_VAGRANT_KEEP") == "1"
    try:
        if not machine.attach():
            machine.start_host()
        if not all(machine.running(m) for m in machine.machines):
            started = time.monotonic()
            machine.up(timeout=UP_TIMEOUT_PER_PAIR * pairs)
            print(f"vagrant up ({pairs} pair(s)): {time.monotonic() - started:.0f}s")
        yield machine
    finally:
        if not keep:
            with contextlib.suppress(VagrantError):
                machine.destroy()
            problems = machine.stop_host()
            assert not problems, problems


def start_load(cluster: VagrantCluster, name: str, rate: float = 4.0) -> LoadRun:
    """A load through the virtual IP of ``cluster``'s pair, its history in the work directory."""
    return LoadRun(
        cluster,
        cluster.workdir / f"{name}.jsonl",
        rate=rate,
        connections=4,
        domain=MAIL_DOMAIN,
    )


def wait_acked(load: LoadRun, timeout: float) -> None:
    """Until the load has had a 250 (it must still run)."""

    def acked() -> bool | None:
        assert load.process.poll() is None, "the load exited"
        return True if any(a.outcome == "acked" for a in load.attempts()) else None

    assert wait_for(acked, timeout, 0.5), f"no 250 through the VIP: {load.attempts()[-3:]}"


def drained(load: LoadRun) -> Verdict:
    """Wait until every acknowledged message reached the sink; fail if one never did."""
    attempts = load.attempts()
    acked = {a.id for a in attempts if a.outcome == "acked"}
    wait_for(lambda: True if acked <= set(load.delivered_ids()) else None, DRAIN_TIMEOUT, 5.0)
    verdict = check(attempts, load.delivered_ids())
    print(f"{load.run_id}: {verdict.acked} acknowledged, {len(verdict.lost)} lost")
    assert verdict.acked > 0
    assert not verdict.lost, f"acknowledged and never delivered: {verdict.lost[:10]}"
    return verdict


def assert_destroyed(cluster: VagrantCluster) -> None:
    """``vagrant destroy -f``: no domain, network or machine disk of the cluster is left."""
    cluster.destroy()
    left = [item for item in cluster.leftovers() if "VAGRANTSLASH" not in item]
    assert left == [], left
