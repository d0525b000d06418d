"""Gray failure: the active node hands over when a majority of check locations see its service
down while it thinks itself healthy, and only as an automatic failover may."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

from cluster.config import ConfigError, parse_agent_config
from cluster.decision_data import LocationVerdict, Member, Policy, Role, Step, Switchover, Trigger
from cluster.gray_failure import location_verdict
from tests.support.decisions import (
    NODE,
    PAUSE,
    PEER,
    POLICY,
    WALL,
    Walk,
    eligible,
    finish_demotion,
    promote,
    ready_peer,
)
from tests.test_agent_config import GOOD


def serving() -> Walk:
    """An active node, healthy by its own account, with a peer ready to take over; the term
    began at WALL, and the walk is a minute later."""
    walk = eligible()
    promote(walk)
    walk.world.members = ready_peer()
    walk.tick(60)
    assert walk.see().trigger is Trigger.NOTHING
    return walk


def seen(walk: Walk, location: str, *, down: bool = True, age: float = 1.0) -> LocationVerdict:
    """A location's verdict on the service check ``vip-smtp``, published ``age`` seconds ago,
    down since ten seconds ago (after the term began)."""
    down_since = (("vip-smtp", walk.wall - 10.0),) if down else ()
    return LocationVerdict(location, walk.wall - age, ("vip-smtp",), down_since)


def test_a_majority_of_locations_moves_the_service_to_the_passive_node() -> None:
    walk = serving()
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client"))
    decision = walk.see()
    assert decision.trigger is Trigger.GRAY_FAILURE
    assert decision.state.role is Role.DEMOTING
    # A planned handover: the graceful drain, then the whole demotion; a cooldown at its end.
    assert [(a.step, a.timeout) for a in decision.actions] == [(Step.DRAIN, POLICY.drain_timeout)]
    assert decision.state.give_up
    assert "2 of 2 check locations" in decision.note
    assert "inet/vip-smtp" in decision.note and "client/vip-smtp" in decision.note
    finish_demotion(walk)
    assert walk.state.role is Role.PASSIVE
    assert walk.state.cooldown_until == walk.now + POLICY.cooldown


def test_one_location_alone_never_moves_the_service() -> None:
    walk = serving()
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client", down=False))
    assert walk.see().trigger is Trigger.NOTHING
    walk.world.locations = (seen(walk, "inet"),)  # the only location known: still one
    assert walk.see().trigger is Trigger.NOTHING
    assert walk.state.role is Role.ACTIVE


@pytest.mark.parametrize(
    ("down", "known", "moves"), [(2, 3, True), (2, 4, False), (3, 4, True), (3, 5, True)]
)
def test_it_takes_a_majority_of_the_locations_known(down: int, known: int, moves: bool) -> None:
    walk = serving()
    walk.world.locations = tuple(
        seen(walk, f"loc{index}", down=index < down) for index in range(known)
    )
    expected = Trigger.GRAY_FAILURE if moves else Trigger.NOTHING
    assert walk.see().trigger is expected


def test_a_location_that_does_not_watch_the_service_is_not_counted() -> None:
    walk = serving()
    blind = LocationVerdict("arbiter", walk.wall, (), ())
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client"), blind)
    assert walk.see().trigger is Trigger.GRAY_FAILURE


def test_stale_verdicts_count_as_no_verdict() -> None:
    walk = serving()
    stale = POLICY.gray_verdict_max_age + 1
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client", age=stale))
    assert walk.see().trigger is Trigger.NOTHING
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client", age=stale - 2))
    assert walk.see().trigger is Trigger.GRAY_FAILURE


def test_a_check_down_since_before_this_term_does_not_count() -> None:
    """After a gray handover the new active node finds the checks still down from the old one:
    they saw the previous node, and must not send the service back."""
    walk = serving()
    old = LocationVerdict("inet", walk.wall, ("vip-smtp",), (("vip-smtp", WALL - 1.0),))
    walk.world.locations = (old, seen(walk, "client"))
    assert walk.see().trigger is Trigger.NOTHING


def test_an_unhealthy_node_is_the_relay_rules_business() -> None:
    walk = serving()
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client"))
    walk.world.relay_ready = False
    walk.world.relay_failures = 1
    assert walk.see().trigger is Trigger.NOTHING
    walk.world.relay_running = False
    assert walk.see().trigger is Trigger.RELAY_DOWN


def test_it_can_be_turned_off() -> None:
    walk = serving()
    walk.policy = Policy(node=NODE, gray_failure=False)
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client"))
    assert walk.see().trigger is Trigger.NOTHING


def test_paused_it_stays_and_says_why_once() -> None:
    walk = serving()
    walk.world.paused = PAUSE
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client"))
    first = walk.see()
    assert first.trigger is Trigger.GRAY_FAILURE_HELD
    assert first.state.role is Role.ACTIVE and first.actions == ()
    assert "not handing over: the cluster is paused by operator" in first.note
    walk.tick()
    again = walk.see()
    assert again.trigger is Trigger.GRAY_FAILURE_HELD and again.note == ""
    assert not again.changed
    walk.world.paused = None
    assert walk.see().trigger is Trigger.GRAY_FAILURE


def test_a_new_episode_while_held_is_said_again() -> None:
    walk = serving()
    walk.world.paused = PAUSE
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client"))
    assert walk.see().note != ""
    walk.world.locations = ()  # the service came back
    assert walk.see().trigger is Trigger.NOTHING
    walk.tick(600)
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client"))  # down again, later
    again = walk.see()
    assert again.trigger is Trigger.GRAY_FAILURE_HELD
    assert "not handing over: the cluster is paused" in again.note


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ({}, "no other node can take over (none is connected)"),
        (
            {PEER: Member(PEER, Role.PASSIVE, relay_running=False)},
            "its relay is not running",
        ),
        (
            {PEER: Member(PEER, Role.PASSIVE, relay_running=True, cooldown=True)},
            "it is cooling down after a failure",
        ),
    ],
)
def test_without_a_healthy_passive_node_it_stays(members: dict[str, Member], why: str) -> None:
    walk = serving()
    walk.world.members = members
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client"))
    decision = walk.see()
    assert decision.trigger is Trigger.GRAY_FAILURE_HELD
    assert decision.state.role is Role.ACTIVE
    assert why in decision.note


def test_within_the_minimum_interval_it_waits_for_it_to_pass() -> None:
    walk = serving()
    walk.world.last_served = walk.wall - 1.0
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client"))
    decision = walk.see()
    assert decision.trigger is Trigger.GRAY_FAILURE_HELD
    assert "less than 5s ago" in decision.note
    walk.tick(POLICY.min_failover_interval)
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client"))
    assert walk.see().trigger is Trigger.GRAY_FAILURE


def test_an_operator_switchover_comes_first() -> None:
    walk = serving()
    walk.world.locations = (seen(walk, "inet"), seen(walk, "client"))
    walk.world.switchover = Switchover(NODE, PEER, walk.wall)
    decision = walk.see()
    assert decision.trigger is Trigger.SWITCHOVER
    assert not decision.state.give_up


# ---------------------------------------- the monitors' znodes, and the configuration


def record(checks: Mapping[str, object], at: object = 1234.5) -> bytes:
    return json.dumps({"location": "inet", "at": at, "checks": checks}).encode()


def test_only_the_services_smtp_checks_are_read() -> None:
    checks = {
        "vip-smtp": {"kind": "smtp", "state": "down", "since": 1200.0, "service": True},
        "vip-smtps": {"kind": "tls", "state": "down", "since": 1200.0, "service": True},
        "alpha-smtp": {"kind": "smtp", "state": "down", "since": 1200.0, "target": "x"},
        "vip-smtp-2": {"kind": "smtp", "state": "up", "since": 1100.0, "service": True},
    }
    verdict = location_verdict("inet", record(checks))
    assert verdict == LocationVerdict(
        "inet", 1234.5, ("vip-smtp", "vip-smtp-2"), (("vip-smtp", 1200.0),)
    )


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[]", record({}, at="yesterday"), record({}, at=True), b'{"at": 1.0}'],
)
def test_an_unreadable_record_is_no_verdict(data: bytes) -> None:
    assert location_verdict("inet", data) is None


def test_the_configuration_carries_the_rule() -> None:
    policy = parse_agent_config(GOOD).policy()
    assert policy.gray_failure and policy.gray_failure_locations == 2
    assert policy.gray_verdict_max_age == 30.0
    text = GOOD.replace(
        'min_failover_interval = "5s"',
        'min_failover_interval = "5s"\ngray_failure = false\ngray_verdict_max_age = "12s"\n'
        "gray_failure_locations = 3",
    )
    policy = parse_agent_config(text).policy()
    assert not policy.gray_failure and policy.gray_failure_locations == 3
    assert policy.gray_verdict_max_age == 12.0
    with pytest.raises(ConfigError) as error:
        parse_agent_config(text.replace("locations = 3", "locations = 1"), "agent.toml")
    assert "agent.gray_failure_locations" in str(error.value)
    assert "one check location alone never moves the service" in str(error.value)
