"""A VipSet adds every address before it announces any, and announces them side by side.

One network namespace of its own (``hr-vip-<random>``, prefix ``hr``) with a veth pair whose
both ends are inside it: nothing leaves it. The members' pacing pause (``VirtualIp``'s injected
``sleep``) is where the test looks: at each member's first pause, every address must already be
on the interface (the relay, the next step, sends from the egress addresses at once), and all
members must be in that pause together (a barrier they all reach: announced one after the
other, the first would wait there alone and the barrier would break).
"""

from __future__ import annotations

import secrets
import subprocess
import threading
from collections.abc import Iterator

import pytest

from cluster.vip import VipSet, VirtualIp
from tests.test_vip import addresses, ip

ADDRESSES = ["198.19.207.100/24", "198.19.207.111/32", "198.19.207.112/32"]
IFACE = "hrv0"


@pytest.fixture
def namespace() -> Iterator[str]:
    ns = f"hr-vip-{secrets.token_hex(2)}"
    ip("netns", "add", ns)
    try:
        ip("-n", ns, "link", "add", IFACE, "type", "veth", "peer", "name", "hrv1")
        for end in (IFACE, "hrv1"):
            ip("-n", ns, "link", "set", end, "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)


def test_every_address_is_added_before_the_announcements_which_overlap(namespace: str) -> None:
    together = threading.Barrier(len(ADDRESSES), timeout=10)
    seen: list[set[str]] = []
    lock = threading.Lock()

    def pause(_seconds: float) -> None:
        with lock:
            seen.append(set(addresses(namespace, IFACE)))
        together.wait()  # BrokenBarrierError (a failed add) if the members took turns

    vips = VipSet(
        [VirtualIp(a, IFACE, netns=namespace, arp_count=2, sleep=pause) for a in ADDRESSES]
    )
    vips.add()
    wanted = {a.split("/")[0] for a in ADDRESSES}
    assert len(seen) == len(ADDRESSES)  # one pause each (two rounds)
    assert all(wanted <= found for found in seen)
    assert set(addresses(namespace, IFACE)) >= wanted
    vips.remove()
    assert not vips.held()
