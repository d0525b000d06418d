"""When the agent arms, feeds or starves its watchdog: ``plan_watchdog`` over plain data."""

from __future__ import annotations

import pytest

from cluster.watchdog_policy import WatchdogLimits, WatchdogPlan, plan_watchdog

LIMITS = WatchdogLimits(progress_limit=6.0, release_deadline=3.0)
NOW = 1000.0


def plan(
    *,
    holds: bool = True,
    armed: bool = True,
    connected: bool = True,
    progress: float = NOW,
    unsafe_since: float | None = None,
    covered_until: float | None = None,
) -> WatchdogPlan:
    return plan_watchdog(
        covered_until=covered_until,
        holds=holds,
        armed=armed,
        connected=connected,
        now=NOW,
        progress=progress,
        unsafe_since=unsafe_since,
        limits=LIMITS,
    )


def test_the_limits_keep_the_firing_ahead_of_the_peers_takeover() -> None:
    limits = WatchdogLimits.for_agent(session_timeout=6.0, health_interval=0.5, lease_grace=2.0)
    assert limits == WatchdogLimits(progress_limit=6.5, release_deadline=3.0)


def test_armed_exactly_while_the_node_holds_something() -> None:
    assert plan(holds=True, armed=False) == WatchdogPlan(arm=True, feed=True)
    assert plan(holds=False, armed=True) == WatchdogPlan(disarm=True)
    assert plan(holds=False, armed=False) == WatchdogPlan()
    assert plan(holds=True, armed=True) == WatchdogPlan(feed=True)


def test_a_node_holding_nothing_forgets_when_it_lost_its_session() -> None:
    assert plan(holds=False, connected=False, unsafe_since=NOW - 100).unsafe_since is None


@pytest.mark.parametrize(
    ("progress", "fed"),
    [(NOW, True), (NOW - 5.99, True), (NOW - 6.0, False), (NOW - 60, False)],
)
def test_fed_only_while_the_decision_loop_turns(progress: float, fed: bool) -> None:
    result = plan(progress=progress)
    assert result.feed is fed
    assert not result.starve  # a stuck loop just stops feeding; nothing to say, it cannot


def test_holding_without_a_session_is_timed_from_the_first_sight() -> None:
    first = plan(connected=False)
    assert first == WatchdogPlan(feed=True, unsafe_since=NOW)
    assert plan(connected=False, unsafe_since=NOW - 1).unsafe_since == NOW - 1
    assert plan(connected=True, unsafe_since=NOW - 1).unsafe_since is None


@pytest.mark.parametrize(("since", "starved"), [(NOW - 3.0, False), (NOW - 3.01, True)])
def test_starved_past_the_release_deadline_without_a_session(since: float, starved: bool) -> None:
    result = plan(connected=False, unsafe_since=since)
    assert result.starve is starved
    assert result.feed is not starved
    assert result.unsafe_since == since


def test_serving_in_failsafe_is_fed_while_the_leases_cover_it_and_starved_after() -> None:
    # Suspended for long (past the release deadline), but every peer's lease covers it.
    covered = plan(connected=False, unsafe_since=NOW - 60, covered_until=NOW + 1)
    assert covered == WatchdogPlan(feed=True)
    # The leases ran out a moment ago: unsafe since their end, starved release_deadline later.
    lapsed = plan(connected=False, covered_until=NOW - 0.5)
    assert lapsed == WatchdogPlan(feed=True, unsafe_since=NOW - 0.5)
    stuck = plan(connected=False, unsafe_since=NOW - 3.01, covered_until=NOW - 3.01)
    assert stuck == WatchdogPlan(starve=True, unsafe_since=NOW - 3.01)
    # Connected again: the leases do not matter.
    assert plan(connected=True, covered_until=NOW - 10) == WatchdogPlan(feed=True)
