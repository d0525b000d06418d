"""The pure rules of alerting: severities, incidents, escalation steps, maintenance windows
(one across a real change of daylight saving time in Europe/Stockholm)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from monitor.incidents import (
    Action,
    Incident,
    Severity,
    Step,
    due_steps,
    on_change,
    resolve_targets,
    severity_of,
    step_targets,
)
from monitor.maintenance import Window, active_window
from monitor.verdicts import State, StateChange

STOCKHOLM = ZoneInfo("Europe/Stockholm")


def change(previous: State, current: State) -> StateChange:
    return StateChange("mx", previous, current, 100.0, "detail")


def test_severities() -> None:
    assert severity_of(State.DOWN) is Severity.CRITICAL
    assert severity_of(State.EXPIRED) is Severity.CRITICAL
    assert severity_of(State.DEGRADED) is Severity.WARNING
    assert severity_of(State.WARNING) is Severity.WARNING
    assert severity_of(State.UP) is None
    assert severity_of(State.UNKNOWN) is None


def test_an_incident_opens_follows_and_resolves() -> None:
    incident = Incident(1, "mx", Severity.WARNING, State.DEGRADED, 50.0)
    assert on_change(None, change(State.UP, State.DOWN)) is Action.OPEN
    assert on_change(None, change(State.UNKNOWN, State.UP)) is Action.NONE
    assert on_change(incident, change(State.DEGRADED, State.DOWN)) is Action.UPDATE
    assert on_change(incident, change(State.DOWN, State.UP)) is Action.RESOLVE
    # "unknown" is only the state before a first verdict: it decides nothing.
    assert on_change(incident, change(State.DOWN, State.UNKNOWN)) is Action.NONE


POLICY = (Step(0.0, ("webhook",)), Step(300.0, ("pagerduty",)), Step(900.0, ("email",)))


def test_steps_come_due_by_age_once_each() -> None:
    incident = Incident(1, "mx", Severity.CRITICAL, State.DOWN, 1000.0)
    assert due_steps(incident, POLICY, 1000.0, False) == [0]
    fired = Incident(1, "mx", Severity.CRITICAL, State.DOWN, 1000.0, steps_fired=frozenset({0}))
    assert due_steps(fired, POLICY, 1299.0, False) == []
    assert due_steps(fired, POLICY, 1300.0, False) == [1]
    # A tick that comes late fires every step that came due meanwhile, in order.
    assert due_steps(incident, POLICY, 2000.0, False) == [0, 1, 2]


def test_acknowledged_resolved_or_in_maintenance_fire_nothing() -> None:
    acked = Incident(1, "mx", Severity.CRITICAL, State.DOWN, 0.0, acked_by="ops")
    resolved = Incident(1, "mx", Severity.CRITICAL, State.DOWN, 0.0, resolved=5.0)
    fresh = Incident(1, "mx", Severity.CRITICAL, State.DOWN, 0.0)
    assert due_steps(acked, POLICY, 10_000.0, False) == []
    assert due_steps(resolved, POLICY, 10_000.0, False) == []
    assert due_steps(fresh, POLICY, 10_000.0, True) == []
    # Held, not spent: once the window is over the steps fire.
    assert due_steps(fresh, POLICY, 10_000.0, False) == [0, 1, 2]


def test_a_notifier_hears_one_trigger_per_incident() -> None:
    incident = Incident(1, "mx", Severity.CRITICAL, State.DOWN, 0.0, notified=frozenset({"pd"}))
    assert step_targets(incident, Step(300.0, ("pd", "email"))) == ("email",)


def test_resolve_goes_to_those_notified() -> None:
    incident = Incident(
        1, "mx", Severity.CRITICAL, State.DOWN, 0.0, notified=frozenset({"webhook", "slack"})
    )
    assert resolve_targets(incident) == ("slack", "webhook")


def ts(year: int, month: int, day: int, hour: int, minute: int) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=STOCKHOLM).timestamp()


def test_a_weekly_window_keeps_its_wall_clock_across_dst() -> None:
    # Sunday 01:00 for 3 hours, Stockholm. Daylight saving time began on Sunday 29 March
    # 2026 at 02:00 (clocks to 03:00): the window starts at 01:00 local on either side.
    window = Window(
        "sunday", at=dt.time(1, 0), days=(6,), duration=3 * 3600.0, zone="Europe/Stockholm"
    )
    before = window.upcoming(ts(2026, 3, 21, 12, 0))
    assert before == (ts(2026, 3, 22, 1, 0), ts(2026, 3, 22, 4, 0))
    assert dt.datetime.fromtimestamp(before[0], dt.UTC).hour == 0  # CET, UTC+1
    on_the_day = window.upcoming(ts(2026, 3, 28, 12, 0))
    assert on_the_day is not None
    # Three hours of elapsed time from 01:00 CET end at 05:00 CEST.
    assert dt.datetime.fromtimestamp(on_the_day[1], STOCKHOLM).hour == 5
    after = window.upcoming(ts(2026, 3, 30, 12, 0))
    assert after is not None
    assert dt.datetime.fromtimestamp(after[0], dt.UTC).hour == 23  # CEST, UTC+2, Saturday
    assert dt.datetime.fromtimestamp(after[0], STOCKHOLM).hour == 1
    # Active inside, not outside, and only for the checks it names.
    named = Window(
        "mx only",
        ("mx",),
        at=dt.time(1, 0),
        days=(6,),
        duration=3 * 3600.0,
        zone="Europe/Stockholm",
    )
    inside = ts(2026, 4, 5, 2, 0)
    assert active_window([named], "mx", inside) is named
    assert active_window([named], "dns", inside) is None
    assert active_window([named], "mx", ts(2026, 4, 5, 4, 1)) is None


def test_a_window_running_past_midnight_is_found_the_next_day() -> None:
    window = Window("night", at=dt.time(23, 0), days=(0,), duration=4 * 3600.0, zone="UTC")
    monday = dt.datetime(2026, 12, 7, 23, 0, tzinfo=dt.UTC).timestamp()
    assert window.current(monday + 3 * 3600) == (monday, monday + 4 * 3600)
    assert window.current(monday + 4 * 3600) is None


def test_a_one_off_window() -> None:
    window = Window("upgrade", start=100.0, end=200.0)
    assert active_window([window], "mx", 150.0) is window
    assert active_window([window], "mx", 200.0) is None
    assert window.upcoming(50.0) == (100.0, 200.0)
    assert window.upcoming(250.0) is None
