"""Uptime, outages and series: the pure arithmetic (a table and hypothesis), then the API's
routes over a real SQLite store with a history written at known times."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from hamta import eventlog
from monitor.api import build_app
from monitor.config import Check, parse_monitor_config
from monitor.engine import Engine
from monitor.maintenance import Window, spans
from monitor.metrics import MonitorMetrics
from monitor.observation import CheckContext, Clock, Observation, SystemClock
from monitor.store import Store
from monitor.uptime import (
    DAY,
    Bucket,
    RangeError,
    grid,
    outages,
    series,
    span,
    timeline,
    uptime,
)
from monitor.verdicts import CheckState, Outcome, State, StateChange

U, D, W, X, K, G = (
    State.UP,
    State.DOWN,
    State.WARNING,
    State.EXPIRED,
    State.UNKNOWN,
    State.DEGRADED,
)


def changes(*steps: tuple[float, State]) -> list[StateChange]:
    found, previous = [], K
    for at, state in steps:
        found.append(StateChange("mx", previous, state, at, f"to {state}"))
        previous = state
    return found


@pytest.mark.parametrize(
    ("steps", "start", "end", "expected"),
    [
        # No history at all: nothing known, no ratio.
        ((), 0, 100, (0, 0, 100, None)),
        # Up from the start of the range: 100 %.
        (((0, U),), 0, 100, (100, 0, 0, 1.0)),
        # The monitor started half-way: the first half is unknown, not down.
        (((50, U),), 0, 100, (50, 0, 50, 1.0)),
        # Down a quarter of the time.
        (((0, U), (25, D), (50, U)), 0, 100, (75, 25, 0, 0.75)),
        # A change before the range says where the check stood when it began.
        (((-500, D), (20, U)), 0, 100, (80, 20, 0, 0.8)),
        # Degraded and warning serve; expired does not.
        (((0, G), (10, W), (20, X), (30, U)), 0, 100, (90, 10, 0, 0.9)),
        # Changes after the end are not counted.
        (((0, U), (100, D), (150, U)), 0, 100, (100, 0, 0, 1.0)),
        # Back to unknown (a check's first failures before a verdict) is excluded again.
        (((0, U), (40, K), (60, U)), 0, 100, (80, 0, 20, 1.0)),
    ],
)
def test_uptime_table(
    steps: tuple[tuple[float, State], ...],
    start: float,
    end: float,
    expected: tuple[float, float, float, float | None],
) -> None:
    result = uptime(changes(*steps), start, end)
    assert (result.serving, result.failing, result.unknown, result.ratio) == expected


@pytest.mark.parametrize(
    ("steps", "gaps", "expected"),
    [
        # The monitor stopped from 20 to 50: the check's up state is not known then.
        (((0, U),), ((20, 50),), (70, 0, 30, 1.0)),
        # Down when it stopped: the gap is not counted as down either.
        (((0, U), (10, D), (90, U)), ((20, 50),), (20, 50, 30, 20 / 70)),
        # Gaps outside the range, overlapping ones and one across its start.
        (((0, U),), ((-50, 10), (5, 15), (200, 300)), (85, 0, 15, 1.0)),
    ],
)
def test_the_time_the_monitor_did_not_run_is_unknown(
    steps: tuple[tuple[float, State], ...],
    gaps: tuple[tuple[float, float], ...],
    expected: tuple[float, float, float, float | None],
) -> None:
    result = uptime(changes(*steps), 0, 100, gaps)
    assert (result.serving, result.failing, result.unknown, result.ratio) == expected


@pytest.mark.parametrize(
    ("steps", "gaps", "windows", "expected"),
    [
        # Down for 20 s, all of it inside a window: planned, not downtime; the ratio is 1.
        (((0, U), (40, D), (60, U)), (), ((40, 60),), (80, 0, 0, 20, 1.0)),
        # A window over up time is not counted as up either: shown, left out of both.
        (((0, U),), (), ((10, 30),), (80, 0, 0, 20, 1.0)),
        # A window over part of an outage: only the rest is failing.
        (((0, U), (40, D), (60, U)), (), ((50, 70),), (70, 10, 0, 20, 70 / 80)),
        # Overlapping windows are not counted twice; one beyond the range is not counted.
        (((0, U),), (), ((10, 30), (20, 40), (150, 200)), (70, 0, 0, 30, 1.0)),
        # Over time the monitor did not run, unknown stays unknown (nobody looked).
        (((0, U),), ((20, 50),), ((10, 40),), (60, 0, 30, 10, 1.0)),
        # All of the known time in maintenance: no ratio, as with nothing known.
        (((0, D),), (), ((0, 100),), (0, 0, 0, 100, None)),
    ],
)
def test_time_in_maintenance_is_shown_and_left_out_of_the_uptime(
    steps: tuple[tuple[float, State], ...],
    gaps: tuple[tuple[float, float], ...],
    windows: tuple[tuple[float, float], ...],
    expected: tuple[float, float, float, float, float | None],
) -> None:
    result = uptime(changes(*steps), 0, 100, gaps, windows)
    got = (result.serving, result.failing, result.unknown, result.maintenance, result.ratio)
    assert got == pytest.approx(expected)
    assert result.as_json()["maintenance_s"] == expected[3]


def test_the_windows_of_a_range_are_every_occurrence_in_it() -> None:
    weekly = Window(
        "weekly reboot",
        ("mx",),
        days=(6,),
        at=dt.time(1, 0),
        duration=7200,
        zone="Europe/Stockholm",
    )
    once = Window("upgrade", (), start=1000.0, end=5000.0)
    other = Window("dns work", ("dns",), start=0.0, end=1e12)
    # 2026-12-07 (a Monday) back 30 days: the Sundays 8, 15, 22 and 29 November, 6 December.
    end = dt.datetime(2026, 12, 7, 12, tzinfo=dt.UTC).timestamp()
    start = end - 30 * DAY
    found = spans([weekly, once, other], "mx", start, end)
    sundays = [dt.datetime.fromtimestamp(s, ZoneInfo("Europe/Stockholm")) for s, _ in found]
    assert [(d.month, d.day, d.hour) for d in sundays] == [
        (11, 8, 1),
        (11, 15, 1),
        (11, 22, 1),
        (11, 29, 1),
        (12, 6, 1),
    ]
    assert all(e - s == 7200 for s, e in found)
    # Clipped to the range; a one-off window inside it as it is.
    assert spans([once], "mx", 3000.0, 9000.0) == [(3000.0, 5000.0)]
    assert spans([once], "mx", 6000.0, 9000.0) == []


def test_outages_have_start_end_and_duration_and_one_may_still_last() -> None:
    history = changes((-300, D), (-200, U), (-50, D), (10, U), (40, G), (60, D))
    found = outages(history, 0, 100)
    # The one that ended before the range is not in it; the one that began before it is,
    # with its real start.
    assert [(o.start, o.end, o.duration(100)) for o in found] == [(-50, 10, 60), (60, None, 40)]
    assert found[1].as_json(100)["ongoing"] is True and found[0].detail == "to down"


steps_strategy = st.lists(
    st.tuples(st.floats(-1000, 2000, allow_nan=False), st.sampled_from(list(State))),
    max_size=30,
).map(lambda steps: sorted(steps, key=lambda step: step[0]))


gaps_strategy = st.lists(
    st.tuples(st.floats(-500, 1500, allow_nan=False), st.floats(0, 300, allow_nan=False)).map(
        lambda gap: (gap[0], gap[0] + gap[1])
    ),
    max_size=4,
)


@given(
    steps_strategy,
    st.floats(0, 1000, allow_nan=False),
    st.floats(0, 1000, allow_nan=False),
    gaps_strategy,
)
def test_uptime_accounts_for_every_second_of_the_range(
    steps: list[tuple[float, State]],
    start: float,
    length: float,
    gaps: list[tuple[float, float]],
) -> None:
    history, end = changes(*steps), start + length
    result = uptime(history, start, end, gaps)
    assert result.serving + result.failing + result.unknown == pytest.approx(length, abs=1e-6)
    assert result.ratio is None or 0.0 <= result.ratio <= 1.0
    # A gap only ever takes known time away.
    assert result.unknown >= uptime(history, start, end).unknown - 1e-6
    intervals = timeline(history, start, end, gaps)
    for before, after in itertools.pairwise(intervals):
        assert before.end == after.start and before.start < before.end
        assert before.state is not after.state
    # The outages inside the range last no longer than the time not serving.
    inside = sum(
        min(o.end if o.end is not None else end, end) - max(o.start, start)
        for o in outages(history, start, end)
        if o.start < end
    )
    # (An outage runs from the change into down to the change out of it, across a gap of the
    # monitor's: it is compared with the failing time without the gaps.)
    assert inside <= uptime(history, start, end).failing + 1e-6


def test_ranges_and_grid() -> None:
    assert span("90d") == 90 * DAY
    with pytest.raises(RangeError, match=r"unknown range '1y' \(known: 24h, 7d, 30d, 90d\)"):
        span("1y")
    start, width, count = grid("24h", 1_000_000.0)
    assert width == 300 and count == 289 and start % 300 == 0
    assert start + (count - 1) * width <= 1_000_000 < start + count * width
    columns = series([Bucket(1, 3, 0.5, 0.9, 1)], 0.0, 10.0, 3)
    assert columns == {
        "t": [0.0, 10.0, 20.0],
        "mean_s": [None, 0.5, None],
        "max_s": [None, 0.9, None],
        "failures": [0, 1, 0],
        "runs": [0, 3, 0],
    }


# ------------------------------------------------------------------ the API


class FixedClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


NOW = 1_800_000_000.0


async def _write_history(store: Store) -> None:
    """mx: up from 10 days ago, down for an hour 2 days ago, a second minute-long run every
    10 minutes; tls: known only for the last 12 hours, all up."""
    state = CheckState()
    at = NOW - 10 * DAY
    down = (NOW - 2 * DAY, NOW - 2 * DAY + 3600)
    while at < NOW:
        failing = down[0] <= at < down[1]
        outcome = Outcome.FAILURE if failing else Outcome.SUCCESS
        target = D if failing else U
        change = None
        if target is not state.state:
            change = StateChange("mx", state.state, target, at, "refused" if failing else "ok")
            state = CheckState(target, at)
        obs = Observation("mx", "smtp", outcome, 0.2 if failing else 0.1, "", at)
        await store.record(obs, state, change)
        at += 600
    # The monitor was stopped for an hour 5 days ago (and it had run since 10 days ago).
    first_run = await store.start_run(NOW - 10 * DAY)
    await store.alive(first_run, NOW - 5 * DAY)
    await store.start_run(NOW - 5 * DAY + 3600)
    first = NOW - 12 * 3600
    await store.record(
        Observation("tls", "tls", Outcome.SUCCESS, 0.05, "", first),
        CheckState(U, first),
        StateChange("tls", K, U, first, "ok"),
    )


CONFIG = """
[[checks]]
name = "mx"
kind = "smtp"
host = "127.0.0.1"
[[checks]]
name = "tls"
kind = "tls"
endpoint = "tls://127.0.0.1:465"
"""


def test_the_history_routes_answer_from_the_store(tmp_path: Path) -> None:
    config = parse_monitor_config(CONFIG, str(tmp_path / "monitor.toml"))

    async def scenario() -> dict[str, Any]:
        store = Store(tmp_path / "m.sqlite")
        await _write_history(store)
        app = build_app(
            store,
            MonitorMetrics(config.checks),
            config.checks,
            "127.0.0.1:1",
            clock=FixedClock(NOW),
            # The tls check's last hour is planned work: shown, and left out of its uptime.
            windows=[Window("cert rollover", ("tls",), start=NOW - 3600, end=NOW + 3600)],
        )
        got: dict[str, Any] = {}
        async with TestClient(TestServer(app)) as client:
            for path in (
                "/api/uptime",
                "/api/outages?range=7d",
                "/api/outages?range=24h",
                "/api/checks/mx/history?range=7d",
                "/api/checks/mx/history",
                "/api/checks/tls/history",
                "/api/checks/mx/history?range=1y",
                "/api/checks/nope/history",
            ):
                response = await client.get(path, headers={"Host": "127.0.0.1"})
                got[path] = (response.status, json.loads(await response.text()))
        await store.close()
        return got

    got = asyncio.run(scenario())
    status, view = got["/api/uptime"]
    assert status == 200 and view["ranges"] == ["24h", "7d", "30d", "90d"]
    mx, tls = view["checks"]
    assert mx["ranges"]["24h"] == {
        "ratio": 1.0,
        "serving_s": DAY,
        "failing_s": 0.0,
        "unknown_s": 0.0,
        "maintenance_s": 0.0,
    }
    # Down an hour, and an hour when the monitor did not run: unknown, not up.
    assert mx["ranges"]["7d"]["unknown_s"] == 3600
    assert mx["ranges"]["7d"]["ratio"] == pytest.approx(1 - 3600 / (7 * DAY - 3600), abs=1e-6)
    # Ten days known out of thirty (less the hour): the rest is unknown, not down.
    assert mx["ranges"]["30d"]["unknown_s"] == 20 * DAY + 3600
    assert mx["ranges"]["30d"]["ratio"] == pytest.approx(1 - 3600 / (10 * DAY - 3600), abs=1e-6)
    assert tls["ranges"]["24h"] == {
        "ratio": 1.0,
        "serving_s": 11 * 3600,
        "failing_s": 0.0,
        "unknown_s": 12 * 3600,
        "maintenance_s": 3600,
    }
    tls_history = got["/api/checks/tls/history"][1]
    assert tls_history["maintenance"] == [{"start": NOW - 3600, "end": NOW}]
    assert tls_history["uptime"]["maintenance_s"] == 3600

    status, view = got["/api/outages?range=7d"]
    assert status == 200
    assert view["outages"] == [
        {
            "check": "mx",
            "start": NOW - 2 * DAY,
            "end": NOW - 2 * DAY + 3600,
            "duration_s": 3600.0,
            "ongoing": False,
            "detail": "refused",
        }
    ]
    assert got["/api/outages?range=24h"][1]["outages"] == []

    status, view = got["/api/checks/mx/history?range=7d"]
    assert status == 200 and view["bucket_s"] == 1800 and view["range"] == "7d"
    columns = view["series"]
    assert len(columns["t"]) == len(columns["mean_s"]) == 7 * 48 + 1
    assert sum(columns["runs"]) == 7 * 144  # every observation of the week, once
    assert sum(columns["failures"]) == 6 and max(v for v in columns["max_s"] if v) == 0.2
    assert [t["state"] for t in view["timeline"]] == ["up", "unknown", "up", "down", "up"]
    assert view["monitor_gaps"] == [{"start": NOW - 5 * DAY, "end": NOW - 5 * DAY + 3600}]
    assert view["maintenance"] == []  # the window is the tls check's only
    assert view["outages"][0]["duration_s"] == 3600.0
    assert got["/api/checks/mx/history"][1]["range"] == "24h"
    assert got["/api/checks/mx/history?range=1y"] == (
        400,
        {"error": "unknown range '1y' (known: 24h, 7d, 30d, 90d)"},
    )
    assert got["/api/checks/nope/history"] == (404, {"error": "no check named 'nope'"})


def test_the_engine_leaves_its_runs_in_the_store(tmp_path: Path) -> None:
    """Two runs of the engine: the time between them is a gap (nobody looked)."""
    config = parse_monitor_config(CONFIG)
    eventlog.configure("info", tmp_path / "monitor.log")

    async def one_run(store: Store) -> tuple[float, float]:
        ran = asyncio.Event()  # the engine has started its run and runs its checks

        async def check(definition: Check, context: CheckContext, clock: Clock) -> Observation:
            ran.set()
            return Observation(
                definition.name, definition.kind, Outcome.SUCCESS, 0.01, "", clock.time()
            )

        engine = Engine(
            config.checks,
            store,
            MonitorMetrics(config.checks),
            eventlog.get_logger(component="monitor"),
            SystemClock(),
            runner=check,
        )
        started = time.time()
        task = asyncio.create_task(engine.run())
        await ran.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return started, time.time()

    async def scenario() -> tuple[list[tuple[float, float]], tuple[float, float], float]:
        store = Store(tmp_path / "m.sqlite")
        first = await one_run(store)
        await asyncio.sleep(0.3)
        second = await one_run(store)
        gaps = await store.gaps(0.0)
        await store.close()
        return gaps, first, second[0]

    gaps, first, second_start = asyncio.run(scenario())
    assert len(gaps) == 1
    (gap_start, gap_end) = gaps[0]
    assert first[0] <= gap_start <= first[1] and first[1] < gap_end <= second_start + 1
    assert gap_end - gap_start >= 0.3


def test_pruning_forgets_runs_whose_gaps_are_past_the_retention(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        store = Store(tmp_path / "m.sqlite")
        for started, alive in ((10.0, 20.0), (30.0, 40.0), (50.0, 60.0)):
            await store.alive(await store.start_run(started), alive)
        before = await store.gaps(0.0)
        await store.prune(45.0)
        after = await store.gaps(0.0)
        await store.close()
        return before, after

    before, after = asyncio.run(scenario())
    assert before == [(20.0, 30.0), (40.0, 50.0)]
    assert after == [(40.0, 50.0)]  # the gap that ends inside the retention stays
