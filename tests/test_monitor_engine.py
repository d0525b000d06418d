"""The engine with real peers: a closed port goes down after 3 and comes back after 2, a slow
peer is degraded, a hanging one is down without holding the other checks, and the store
keeps what happened (and forgets it after the retention)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from hamta import eventlog
from monitor.config import parse_monitor_config
from monitor.engine import Engine, next_due
from monitor.metrics import MonitorMetrics
from monitor.observation import Observation, SystemClock
from monitor.store import Store
from monitor.verdicts import CheckState, Outcome, State
from tests.support.monitor_peers import SmtpPeer, Tarpit, render_checks
from tests.support.ports import free_port
from tests.support.relay import read_events


def test_next_due_keeps_to_the_grid_and_skips_missed_slots() -> None:
    assert next_due(100.0, 60.0, 101.0) == 160.0
    assert next_due(100.0, 60.0, 159.9) == 160.0
    # A run that overran by two intervals does not make up for them back to back.
    assert next_due(100.0, 60.0, 250.0) == 280.0
    assert next_due(100.0, 60.0, 160.0) == 220.0


def smtp(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "smtp", "host": "127.0.0.1", "port": port, **extra}


def build(
    tmp_path: Path, checks: list[dict[str, Any]], store: Store | None = None
) -> tuple[Engine, Store]:
    config = parse_monitor_config(render_checks(checks))
    eventlog.configure("info", tmp_path / "monitor.log")
    store = store or Store(tmp_path / "monitor.sqlite")
    engine = Engine(
        config.checks,
        store,
        MonitorMetrics(config.checks),
        eventlog.get_logger(component="monitor"),
        SystemClock(),
    )
    return engine, store


async def wait_state(engine: Engine, name: str, state: State, limit: float) -> float:
    """Seconds until ``name`` is in ``state`` (polling the engine's own view)."""
    start = time.monotonic()
    while engine.states.get(name, CheckState()).state is not state:
        assert time.monotonic() - start < limit, (name, engine.states.get(name))
        await asyncio.sleep(0.01)
    return time.monotonic() - start


INTERVAL = 0.2


def test_closed_port_down_after_three_up_after_two(tmp_path: Path) -> None:
    port = free_port()
    engine, store = build(tmp_path, [smtp("mx", port, interval=INTERVAL, timeout=0.15)])

    async def scenario() -> tuple[float, float, list[Any], list[dict[str, Any]]]:
        task = asyncio.create_task(engine.run())
        try:
            down = await wait_state(engine, "mx", State.DOWN, 5)
            peer = SmtpPeer(port=port)
            await asyncio.to_thread(peer.__enter__)
            try:
                up = await wait_state(engine, "mx", State.UP, 5)
            finally:
                await asyncio.to_thread(peer.__exit__)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        changes, rows = await store.changes("mx"), await store.observations("mx")
        await store.close()
        return down, up, changes, rows

    down, up, changes, rows = asyncio.run(scenario())
    # Three failures: the first at once, the third two intervals later.
    assert 2 * INTERVAL * 0.9 < down < 3 * INTERVAL + 0.8, down
    assert up < 2 * INTERVAL + 0.8, (up, rows)
    assert [(c.previous, c.current) for c in changes] == [
        (State.UNKNOWN, State.DOWN),
        (State.DOWN, State.UP),
    ]
    outcomes = [row["outcome"] for row in rows]
    first_success = outcomes.index("success")
    assert outcomes[:first_success].count("failure") >= 3
    assert outcomes[first_success : first_success + 2] == ["success", "success"]
    logged = read_events(tmp_path / "monitor.log", "CheckStateChanged")
    assert [(e["previous"], e["current"]) for e in logged] == [("unknown", "down"), ("down", "up")]
    assert "ConnectionRefusedError" in logged[0]["detail"]
    print(f"\ndetection {down:.2f}s (interval {INTERVAL}s, threshold 3), recovery {up:.2f}s")


def test_slow_is_degraded_hanging_is_down_and_blocks_nobody(tmp_path: Path) -> None:
    # The fast peer is a tarpit without delay: a thread per session is cheaper than aiosmtpd,
    # whose sessions cost tens of milliseconds of the GIL on a loaded machine.
    with Tarpit(delay=0.15) as slow, Tarpit(delay=5.0) as hanging, Tarpit(delay=0) as fast:
        checks = [
            # banner, EHLO, QUIT at 0.15 s each: about 0.45 s, over degraded_after
            smtp("slow", slow.port, interval=1, timeout=0.9, degraded_after=0.3),
            smtp("hanging", hanging.port, interval=0.3, timeout=0.25),
            smtp("fast", fast.port, interval=0.2, timeout=0.2),
        ]
        engine, store = build(tmp_path, checks)

        async def scenario() -> tuple[float, list[dict[str, Any]]]:
            task = asyncio.create_task(engine.run())
            try:
                down = await wait_state(engine, "hanging", State.DOWN, 5)
                await wait_state(engine, "slow", State.DEGRADED, 5)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            rows = await store.observations("fast")
            await store.close()
            return down, rows

        down, fast_rows = asyncio.run(scenario())
    assert engine.states["fast"].state is State.UP
    assert engine.states["slow"].state is State.DEGRADED
    # Down after three timeouts of 0.25 s at 0.3 s intervals: about 0.85 s.
    # (The bounds leave room for a loaded machine: 2 cores shared by several test runs.)
    assert 0.6 < down < 2.0, down
    # Meanwhile the fast check ran on its own schedule, every 0.2 s.
    assert len(fast_rows) >= int(down / 0.2) - 1, len(fast_rows)
    assert all(row["outcome"] == "success" for row in fast_rows)


def test_state_survives_a_restart_and_old_rows_are_pruned(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = Store(tmp_path / "s.sqlite")
        old = Observation("c", "smtp", Outcome.FAILURE, 0.1, "refused", at=1000.0)
        new = Observation("c", "smtp", Outcome.FAILURE, 0.1, "refused", at=5000.0)
        await store.record(old, CheckState(State.DOWN, 1000.0, 3, 0), None)
        await store.record(new, CheckState(State.DOWN, 1000.0, 4, 0), None)
        assert await store.prune(before=2000.0) == 1
        assert [row["at"] for row in await store.observations("c")] == [5000.0]
        await store.close()
        reopened = Store(tmp_path / "s.sqlite")
        row = (await reopened.states())["c"]
        assert row.state == CheckState(State.DOWN, 1000.0, 4, 0) and row.last is not None
        await reopened.close()

    asyncio.run(scenario())


class _GatedStore(Store):
    """The real store, whose ``record`` waits for the test's go: the window in which the engine
    has taken a verdict but not yet recorded it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.recording = asyncio.Event()
        self.go = asyncio.Event()

    async def record(self, observation: Any, state: Any, change: Any) -> None:
        self.recording.set()
        await self.go.wait()
        await super().record(observation, state, change)


def test_the_state_shows_only_once_the_change_is_recorded(tmp_path: Path) -> None:
    """Regression: the engine set ``states`` before ``store.record``; a reader who saw the new
    state and stopped the monitor lost the change from the store and the log."""

    async def scenario() -> tuple[State, list[Any], State]:
        store = _GatedStore(tmp_path / "monitor.sqlite")
        checks = [smtp("mx", free_port(), failure_threshold=1)]
        engine, _ = build(tmp_path, checks, store)
        run = asyncio.create_task(engine.run_once(engine.checks[0]))
        await store.recording.wait()
        during = engine.states.get("mx", CheckState()).state
        changes_during = await store.changes("mx")
        store.go.set()
        await run
        after = engine.states["mx"].state
        await store.close()
        return during, changes_during, after

    during, changes_during, after = asyncio.run(scenario())
    assert changes_during == [] and during is State.UNKNOWN
    assert after is State.DOWN
