"""The fenced fast takeover in the lab: the active node frozen whole (SIGSTOP: its watchdog
cannot end its session either, as after a kill -9 it sometimes does before it dies), the peer
fences it and takes over before the session expires; with a fence that fails, it does not."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.lab.lab import Lab
from tests.support.lab_checks import Sampler, agent_decisions, drained
from tests.support.labs import module_lab
from tests.test_fencing_lab import restart_pair, start_load

pytestmark = pytest.mark.root

PREFIX = "hf2t"
SUBNET = "198.19.154.0/24"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with module_lab(tmp_path_factory.mktemp("fast-takeover"), PREFIX, SUBNET) as built:
        yield built


def acquisitions(lab: Lab, node: str) -> list[dict[str, object]]:
    """The coordinator's "leadership taken" lines of ``node``'s agent."""
    lines = (lab.node_dir(node) / "agent.log").read_text().splitlines()
    parsed = [json.loads(line) for line in lines if line.strip()]
    return [line for line in parsed if line.get("event") == "leadership taken"]


def kill_active(
    lab: Lab, tmp_path: Path, overrides: dict[str, Any], *, power_off: bool = False
) -> tuple[str, list[object]]:
    """The active node frozen under load with the sampler on; its peer, which must serve after,
    and the peer's triggers since. Nothing acknowledged is lost. ``power_off``: then powered
    off (its session left to expire), as a machine switched off that no fence agent can confirm
    (otherwise the frozen node would keep the address and the mount)."""
    active = restart_pair(lab, overrides)
    peer = "node2" if active == "node1" else "node1"
    seen = len(agent_decisions(lab, peer))
    with Sampler(lab):
        load = start_load(lab, tmp_path / "history.jsonl")
        try:
            lab.kill_node(active, signal.SIGSTOP)
            if power_off:
                lab.fence(active)
            assert lab.wait_active(30, other_than=active) == peer
        finally:
            attempts = load.stop()
    drained(lab, attempts)
    verdict = load.verdict(attempts)
    assert verdict.ok, verdict
    return peer, [d["trigger"] for d in agent_decisions(lab, peer)[seen:]]


def test_a_frozen_active_node_is_fenced_then_replaced_before_its_session_expires(
    lab: Lab, tmp_path: Path
) -> None:
    peer, triggers = kill_active(lab, tmp_path, {})
    # Fenced first, while passive; then the promotion, started by the confirmed fence.
    assert triggers[:2] == ["peer_silent", "peer_fenced"], triggers
    taken = acquisitions(lab, peer)[-1]
    killed = "node1" if peer == "node2" else "node2"
    assert taken["replaced"] == [killed, int(str(taken["epoch"])) - 1]  # its znode, replaced


def test_with_a_fence_that_fails_the_peer_waits_for_the_session_as_before(
    lab: Lab, tmp_path: Path
) -> None:
    failing = {"fencing": {"commands": [["false"]]}}
    peer, triggers = kill_active(lab, tmp_path, failing, power_off=True)
    assert triggers[:2] == ["peer_silent", "fence_failed"], triggers
    assert "peer_fenced" not in triggers
    assert "leader_vacant" in triggers  # the session expired: today's path, the lease rule
    assert acquisitions(lab, peer)[-1]["replaced"] is None
