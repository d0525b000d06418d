"""The Vagrant cluster end to end: real machines, real DRBD, the playbooks as users run them.

Marker ``vagrant``, left out of the default run (``addopts``); run it as root with::

    .venv/bin/pytest -m vagrant tests/test_vagrant_cluster.py

While working on it, ``HAMTA_VAGRANT_WORKDIR=DIR`` keeps the harness's files in DIR and reuses
a cluster an earlier run left there, and ``HAMTA_VAGRANT_KEEP=1`` leaves the cluster up at the
end (``vagrant destroy -f`` and :meth:`VagrantCluster.stop_host` remove it later).

It builds the box if Vagrant does not have it yet (``vagrant/build-box``), brings the cluster
up from a network namespace with a libvirtd of its own (``cluster.lab.vagrant``), provisioned by
``ansible/site.yml``, and then, in order: mail through the virtual IP reaches the arbiter's
sink and one node is active; the active machine's power is cut (``virsh destroy``) under load
and the peer takes over the DRBD spool, with every acknowledged message delivered;
``switchover.yml`` hands over; ``rolling-upgrade.yml`` goes through with the pair serving;
``site.yml`` run again changes nothing; ``vagrant destroy -f`` leaves nothing behind. Under
plain qemu (TCG) on two cores the whole takes about 40 minutes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.lab.history import LoadRun, check, recovery_time
from cluster.lab.vagrant import (
    MAIL_DOMAIN,
    MAIL_NODES,
    VagrantCluster,
    VagrantError,
    wait_for,
)

pytestmark = [pytest.mark.vagrant, pytest.mark.root, pytest.mark.timeout(7200)]

ROOT = Path(__file__).resolve().parent.parent
# Under TCG an agent restart (a Python import of hamta takes 20-30 s), a reboot (about a
# minute to ssh) and a takeover's steps are all slow: generous bounds, not goals.
TAKEOVER_TIMEOUT = 300.0
REJOIN_TIMEOUT = 900.0
DRAIN_TIMEOUT = 600.0


def _missing_tools() -> list[str]:
    return [
        t for t in ("vagrant", "virsh", "libvirtd", "virtlogd", "nsenter") if not shutil.which(t)
    ]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VagrantCluster]:
    """The cluster, up and provisioned; destroyed and its host side removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a network namespace, libvirtd")
    missing = _missing_tools()
    if missing:
        pytest.skip(
            f"missing {missing}: apt-get install vagrant vagrant-libvirt libvirt-daemon-system"
        )
    reuse = os.environ.get("HAMTA_VAGRANT_WORKDIR")
    machine = VagrantCluster(ROOT, Path(reuse) if reuse else tmp_path_factory.mktemp("vagrant"))
    machine.ensure_box()
    keep = os.environ.get("HAMTA_VAGRANT_KEEP") == "1"
    try:
        if not machine.attach():
            machine.start_host()
        if not all(machine.running(m) for m in (*MAIL_NODES, "arbiter")):
            started = time.monotonic()
            machine.up()
            print(f"vagrant up: {time.monotonic() - started:.0f}s")
        yield machine
    finally:
        if not keep:
            with contextlib.suppress(VagrantError):
                machine.destroy()
            problems = machine.stop_host()
            assert not problems, problems


def _load(cluster: VagrantCluster, name: str, rate: float = 4.0) -> LoadRun:
    return LoadRun(
        cluster,
        cluster.workdir / f"{name}.jsonl",
        rate=rate,
        connections=4,
        domain=MAIL_DOMAIN,
    )


def _wait_acked(load: LoadRun, timeout: float) -> None:
    def acked() -> bool | None:
        assert load.process.poll() is None, "the load exited"
        return True if any(a.outcome == "acked" for a in load.attempts()) else None

    assert wait_for(acked, timeout, 0.5), f"no 250 through the VIP: {load.attempts()[-3:]}"


def _drained(load: LoadRun) -> None:
    attempts = load.attempts()
    acked = {a.id for a in attempts if a.outcome == "acked"}
    wait_for(lambda: True if acked <= set(load.delivered_ids()) else None, DRAIN_TIMEOUT, 5.0)
    verdict = check(attempts, load.delivered_ids())
    print(f"{load.run_id}: {verdict.acked} acknowledged, {len(verdict.lost)} lost")
    assert verdict.acked > 0
    assert not verdict.lost, f"acknowledged and never delivered: {verdict.lost[:10]}"


def test_up_serves_mail_through_the_vip(cluster: VagrantCluster) -> None:
    """One node is active (as a node's own CLI says), and mail to the VIP reaches the sink."""
    active = cluster.wait_active(TAKEOVER_TIMEOUT)
    on_node = cluster.ssh(MAIL_NODES[0], "sudo /opt/hamta/bin/hamta cluster status --json")
    assert on_node.returncode == 0, on_node.stderr
    assert f'"leader": "{active}"' in on_node.stdout
    load = _load(cluster, "up")
    _wait_acked(load, 120.0)
    time.sleep(10.0)  # ~40 attempts: a sample, not a benchmark
    load.stop()
    _drained(load)


def test_power_off_active_machine_peer_takes_over_drbd(cluster: VagrantCluster) -> None:
    """``virsh destroy`` of the active machine under load: the peer promotes DRBD and serves."""
    source = cluster.wait_active(TAKEOVER_TIMEOUT)
    target = cluster.wait_ready_for_switchover(REJOIN_TIMEOUT)
    load = _load(cluster, "power-off")
    try:
        _wait_acked(load, 120.0)
        time.sleep(5.0)
        cut = time.monotonic()
        cluster.power_off(source)
        assert cluster.wait_active(TAKEOVER_TIMEOUT, other_than=source) == target
        rto = wait_for(lambda: recovery_time(load.attempts(), cut), TAKEOVER_TIMEOUT, 0.5)
        assert rto is not None, "no 250 through the VIP after the power-off"
        print(f"power-off of {source}: first 250 from {target} after {rto:.2f}s")
        time.sleep(5.0)
    finally:
        load.stop()
    role = cluster.ssh(target, "sudo drbdadm role all && findmnt -n -o SOURCE /var/spool/hamta")
    assert role.returncode == 0, role.stderr
    assert role.stdout.split()[0].startswith("Primary"), role.stdout
    assert "/dev/drbd" in role.stdout
    # Every message acknowledged before the cut is on the DRBD spool: the new node sends it.
    _drained(load)
    cluster.power_on(source)
    cluster.wait_passive(source, REJOIN_TIMEOUT)


def test_switchover_playbook_hands_over(cluster: VagrantCluster) -> None:
    """``switchover.yml`` moves the active role to the peer, under load, losing nothing."""
    source = cluster.wait_active(TAKEOVER_TIMEOUT)
    cluster.wait_ready_for_switchover(REJOIN_TIMEOUT)
    load = _load(cluster, "switchover")
    try:
        _wait_acked(load, 120.0)
        run = cluster.playbook("switchover.yml")
        assert run.ok, run.output[-3000:]
        assert cluster.wait_active(TAKEOVER_TIMEOUT, other_than=source) != source
        time.sleep(5.0)
    finally:
        load.stop()
    _drained(load)


def test_rolling_upgrade_keeps_serving(cluster: VagrantCluster) -> None:
    """``rolling-upgrade.yml``: passive first, switch over, then the other; mail keeps flowing."""
    cluster.wait_ready_for_switchover(REJOIN_TIMEOUT)
    load = _load(cluster, "upgrade")
    try:
        _wait_acked(load, 120.0)
        run = cluster.playbook("rolling-upgrade.yml")
        assert run.ok, run.output[-3000:]
        cluster.wait_active(TAKEOVER_TIMEOUT)
    finally:
        load.stop()
    _drained(load)
    for node in MAIL_NODES:
        up = cluster.ssh(node, "systemctl is-active hamta-agent")
        assert up.stdout.strip() == "active", (node, up.stdout, up.stderr)


def test_site_again_changes_nothing(cluster: VagrantCluster) -> None:
    """A second ``site.yml`` on the provisioned cluster reports 0 changed on every host."""
    run = cluster.playbook("site.yml")
    assert run.ok, run.output[-3000:]
    assert set(run.changed) == {"mx1", "mx2", "arbiter"}, run.changed
    assert sum(run.changed.values()) == 0, (run.changed, run.output[-3000:])


def test_destroy_removes_every_machine_network_and_disk(cluster: VagrantCluster) -> None:
    """``vagrant destroy -f``: no domain, network or machine disk of the cluster is left."""
    cluster.destroy()
    left = [item for item in cluster.leftovers() if "VAGRANTSLASH" not in item]
    assert left == [], left
