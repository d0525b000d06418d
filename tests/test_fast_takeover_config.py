"""``[agent] fast_takeover`` and ``peer_timeout``: defaults, validation, and when the policy
may take the fast path at all (a peer channel and a fence to confirm)."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, parse_agent_config
from tests.test_agent_config import GOOD

CHANNEL = """
peer_address = "198.18.0.1:7405"
peers = { mx2 = "198.18.0.2:7405" }
peer_secret_file = "/etc/hamta/peer.secret"
"""


def with_agent(extra: str, base: str = GOOD) -> str:
    return base.replace('min_failover_interval = "5s"\n', f'min_failover_interval = "5s"\n{extra}')


def test_the_defaults_take_the_fast_path_with_a_channel_and_a_fence() -> None:
    policy = parse_agent_config(with_agent(CHANNEL)).policy()
    assert policy.fast_takeover and policy.peer_timeout == 1.0


def test_without_a_channel_or_a_fence_the_fast_path_is_off() -> None:
    assert not parse_agent_config(GOOD).policy().fast_takeover  # nobody to hear
    unfenced = with_agent(CHANNEL).replace(
        'commands = [["fence_ipmilan", "--ip", "bmc-{peer}", "--action", "off"]]', ""
    )
    assert not parse_agent_config(unfenced).policy().fast_takeover  # nothing to confirm
    off = parse_agent_config(with_agent(CHANNEL + "fast_takeover = false\n")).policy()
    assert not off.fast_takeover


def test_peer_timeout_is_read() -> None:
    policy = parse_agent_config(with_agent(CHANNEL + 'peer_timeout = "1.5s"\n')).policy()
    assert policy.peer_timeout == 1.5


@pytest.mark.parametrize("text", ['peer_timeout = "0.4s"', 'heartbeat_interval = "0.3s"'])
def test_a_peer_timeout_of_a_few_heartbeats_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"agent.peer_timeout .* at least 5 heartbeat_interval"):
        parse_agent_config(with_agent(CHANNEL + text + "\n"))
