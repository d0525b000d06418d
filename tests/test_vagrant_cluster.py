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

import time
from collections.abc import Iterator

import pytest

from cluster.lab.history import recovery_time
from cluster.lab.vagrant import VagrantCluster, wait_for
from tests.support.vagrant import (
    REJOIN_TIMEOUT,
    TAKEOVER_TIMEOUT,
    assert_destroyed,
    drained,
    start_load,
    vagrant_cluster,
    wait_acked,
)

pytestmark = [pytest.mark.vagrant, pytest.mark.root, pytest.mark.timeout(7200)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VagrantCluster]:
    """The one-pair cluster, up and provisioned; destroyed and its host side removed afterwards."""
    yield from vagrant_cluster(tmp_path_factory, pairs=1)


def test_up_serves_mail_through_the_vip(cluster: VagrantCluster) -> None:
    """One node is active (as a node's own CLI says), and mail to the VIP reaches the sink."""
    active = cluster.wait_active(TAKEOVER_TIMEOUT)
    on_node = cluster.ssh(cluster.mail_nodes[0], "sudo /opt/hamta/bin/hamta cluster status --json")
    assert on_node.returncode == 0, on_node.stderr
    assert f'"leader": "{active}"' in on_node.stdout
    load = start_load(cluster, "up")
    wait_acked(load, 120.0)
    time.sleep(10.0)  # ~40 attempts: a sample, not a benchmark
    load.stop()
    drained(load)


def test_power_off_active_machine_peer_takes_over_drbd(cluster: VagrantCluster) -> None:
    """``virsh destroy`` of the active machine under load: the peer promotes DRBD and serves."""
    source = cluster.wait_active(TAKEOVER_TIMEOUT)
    target = cluster.wait_ready_for_switchover(REJOIN_TIMEOUT)
    load = start_load(cluster, "power-off")
    try:
        wait_acked(load, 120.0)
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
    drained(load)
    cluster.power_on(source)
    cluster.wait_passive(source, REJOIN_TIMEOUT)


def test_switchover_playbook_hands_over(cluster: VagrantCluster) -> None:
    """``switchover.yml`` moves the active role to the peer, under load, losing nothing."""
    source = cluster.wait_active(TAKEOVER_TIMEOUT)
    cluster.wait_ready_for_switchover(REJOIN_TIMEOUT)
    load = start_load(cluster, "switchover")
    try:
        wait_acked(load, 120.0)
        run = cluster.playbook("switchover.yml")
        assert run.ok, run.output[-3000:]
        assert cluster.wait_active(TAKEOVER_TIMEOUT, other_than=source) != source
        time.sleep(5.0)
    finally:
        load.stop()
    drained(load)


def test_rolling_upgrade_keeps_serving(cluster: VagrantCluster) -> None:
    """``rolling-upgrade.yml``: passive first, switch over, then the other; mail keeps flowing."""
    cluster.wait_ready_for_switchover(REJOIN_TIMEOUT)
    load = start_load(cluster, "upgrade")
    try:
        wait_acked(load, 120.0)
        run = cluster.playbook("rolling-upgrade.yml")
        assert run.ok, run.output[-3000:]
        cluster.wait_active(TAKEOVER_TIMEOUT)
    finally:
        load.stop()
    drained(load)
    for node in cluster.mail_nodes:
        up = cluster.ssh(node, "systemctl is-active hamta-agent")
        assert up.stdout.strip() == "active", (node, up.stdout, up.stderr)


def test_site_again_changes_nothing(cluster: VagrantCluster) -> None:
    """A second ``site.yml`` on the provisioned cluster reports 0 changed on every host."""
    run = cluster.playbook("site.yml")
    assert run.ok, run.output[-3000:]
    assert set(run.changed) == set(cluster.machines), run.changed
    assert sum(run.changed.values()) == 0, (run.changed, run.output[-3000:])


def test_destroy_removes_every_machine_network_and_disk(cluster: VagrantCluster) -> None:
    """``vagrant destroy -f``: no domain, network or machine disk of the cluster is left."""
    assert_destroyed(cluster)
