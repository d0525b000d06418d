"""The monitor's SQLite file: observations, state changes, each check's state, last answers.

One connection, used from one thread only (a single-worker executor), so the event loop never
waits on the disk and SQLite never sees two threads. The status page and the notifiers to come
read the same tables. Observations older than the retention are pruned; state changes are kept
as long (an incident's history outlives its observations only by that much).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from monitor.observation import Observation
from monitor.uptime import Bucket
from monitor.verdicts import CheckState, Outcome, State, StateChange

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS observations (
    id INTEGER PRIMARY KEY, check_name TEXT NOT NULL, at REAL NOT NULL, outcome TEXT NOT NULL,
    seconds REAL NOT NULL, detail TEXT NOT NULL, facts TEXT NOT NULL, changes TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS observations_by_check ON observations (check_name, at);
-- Covering the response-time series: a range is summed up from the index, not the table.
CREATE INDEX IF NOT EXISTS observations_series ON observations (check_name, at, seconds, outcome);
CREATE TABLE IF NOT EXISTS state_changes (
    id INTEGER PRIMARY KEY, check_name TEXT NOT NULL, at REAL NOT NULL, previous TEXT NOT NULL,
    current TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS state_changes_by_check ON state_changes (check_name, at);
CREATE TABLE IF NOT EXISTS states (
    check_name TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, since REAL,
    failures INTEGER NOT NULL, successes INTEGER NOT NULL, last_observation INTEGER);
-- Each run of the monitor: when it started, its last sign of life (the time between one run's
-- last sign and the next one's start nobody looked: unknown, not the last state).
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started REAL NOT NULL, alive REAL NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    check_name TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (check_name, key));
"""


@dataclass(frozen=True, slots=True)
class CheckRow:
    """A check's state with its last observation, as the status table and API show it."""

    check: str
    kind: str
    state: CheckState
    last: dict[str, Any] | None


class Store:
    """The SQLite file; every method runs in the store's one thread (``await store.x(...)``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monitor-store")
        self._db: sqlite3.Connection | None = None

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path)  # in the store's thread, like every use
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        return self._db

    # ------------------------------------------------------------------ writes

    async def record(
        self, observation: Observation, state: CheckState, change: StateChange | None
    ) -> None:
        """One observation, the state it led to, its state change and its DNS answers."""
        await self._run(self._record, observation, state, change)

    def _record(self, obs: Observation, state: CheckState, change: StateChange | None) -> None:
        db = self._connection()
        with db:
            cursor = db.execute(
                "INSERT INTO observations (check_name, at, outcome, seconds, detail, facts,"
                " changes) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    obs.check,
                    obs.at,
                    obs.outcome.value,
                    obs.seconds,
                    obs.detail,
                    json.dumps(obs.facts),
                    json.dumps(list(obs.changes)),
                ),
            )
            db.execute(
                "INSERT OR REPLACE INTO states VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    obs.check,
                    obs.kind,
                    state.state.value,
                    state.since,
                    state.failures,
                    state.successes,
                    cursor.lastrowid,
                ),
            )
            if change is not None:
                db.execute(
                    "INSERT INTO state_changes (check_name, at, previous, current, detail)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        change.check,
                        change.at,
                        change.previous.value,
                        change.current.value,
                        change.detail,
                    ),
                )
            if obs.outcome is not Outcome.FAILURE:
                # A whole run's answers replace the last ones (a former MX's address goes);
                # a run that failed half-way may not have asked everything: merged.
                db.execute("DELETE FROM answers WHERE check_name = ?", (obs.check,))
            for key, value in obs.answers.items():
                db.execute(
                    "INSERT OR REPLACE INTO answers VALUES (?, ?, ?)",
                    (obs.check, key, json.dumps(value)),
                )

    async def start_run(self, at: float) -> int:
        """A run of the monitor begins at ``at``; its id, for :meth:`alive`."""
        result: int = await self._run(self._start_run, at)
        return result

    def _start_run(self, at: float) -> int:
        db = self._connection()
        with db:
            cursor = db.execute("INSERT INTO runs (started, alive) VALUES (?, ?)", (at, at))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    async def alive(self, run: int, at: float) -> None:
        await self._run(self._alive, run, at)

    def _alive(self, run: int, at: float) -> None:
        db = self._connection()
        with db:
            db.execute("UPDATE runs SET alive = ? WHERE id = ?", (at, run))

    async def prune(self, before: float) -> int:
        """Forget observations and state changes older than ``before``; how many went."""
        result: int = await self._run(self._prune, before)
        return result

    def _prune(self, before: float) -> int:
        db = self._connection()
        with db:
            gone = db.execute("DELETE FROM observations WHERE at < ?", (before,)).rowcount
            gone += db.execute("DELETE FROM state_changes WHERE at < ?", (before,)).rowcount
            # The runs before the last one that ended before ``before``: no gap of theirs is
            # inside the retention any more.
            db.execute(
                "DELETE FROM runs WHERE id < (SELECT MAX(id) FROM runs WHERE alive < ?)", (before,)
            )
        return gone

    # ------------------------------------------------------------------- reads

    async def states(self) -> dict[str, CheckRow]:
        result: dict[str, CheckRow] = await self._run(self._states)
        return result

    def _states(self) -> dict[str, CheckRow]:
        db = self._connection()
        rows = db.execute(
            "SELECT s.check_name, s.kind, s.state, s.since, s.failures, s.successes, o.at,"
            " o.outcome, o.seconds, o.detail, o.facts FROM states s"
            " LEFT JOIN observations o ON o.id = s.last_observation"
        ).fetchall()
        result = {}
        for name, kind, state, since, failures, successes, at, outcome, secs, detail, facts in rows:
            last = None
            if at is not None:
                last = {
                    "at": at,
                    "outcome": outcome,
                    "seconds": secs,
                    "detail": detail,
                    "facts": json.loads(facts),
                }
            check_state = CheckState(State(state), since, failures, successes)
            result[name] = CheckRow(name, kind, check_state, last)
        return result

    async def answers(self, check: str) -> dict[str, list[str]]:
        result: dict[str, list[str]] = await self._run(self._answers, check)
        return result

    def _answers(self, check: str) -> dict[str, list[str]]:
        rows = self._connection().execute(
            "SELECT key, value FROM answers WHERE check_name = ?", (check,)
        )
        return {key: json.loads(value) for key, value in rows}

    async def changes(self, check: str | None = None) -> list[StateChange]:
        result: list[StateChange] = await self._run(self._changes, check)
        return result

    def _changes(self, check: str | None) -> list[StateChange]:
        query = "SELECT check_name, previous, current, at, detail FROM state_changes"
        rows = self._connection().execute(
            query + (" WHERE check_name = ? ORDER BY id" if check else " ORDER BY id"),
            (check,) if check else (),
        )
        return [StateChange(c, State(p), State(n), at, d) for c, p, n, at, d in rows]

    async def observations(self, check: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._run(self._observations, check)
        return result

    def _observations(self, check: str) -> list[dict[str, Any]]:
        rows = self._connection().execute(
            "SELECT at, outcome, seconds, detail, changes FROM observations"
            " WHERE check_name = ? ORDER BY id",
            (check,),
        )
        return [
            {"at": at, "outcome": o, "seconds": s, "detail": d, "changes": json.loads(c)}
            for at, o, s, d, c in rows
        ]

    async def history(self, checks: Sequence[str], since: float) -> dict[str, list[StateChange]]:
        """Per check, its state changes from ``since`` on, after the last one before it (where
        the check stood when the range began), in time order."""
        result: dict[str, list[StateChange]] = await self._run(self._history, checks, since)
        return result

    def _history(self, checks: Sequence[str], since: float) -> dict[str, list[StateChange]]:
        db = self._connection()
        columns = "SELECT check_name, previous, current, at, detail FROM state_changes"
        result = {}
        for check in checks:
            before = db.execute(
                columns + " WHERE check_name = ? AND at < ? ORDER BY at DESC, id DESC LIMIT 1",
                (check, since),
            ).fetchall()
            after = db.execute(
                columns + " WHERE check_name = ? AND at >= ? ORDER BY at, id", (check, since)
            ).fetchall()
            result[check] = [
                StateChange(c, State(p), State(n), at, d) for c, p, n, at, d in before + after
            ]
        return result

    async def gaps(self, since: float) -> list[tuple[float, float]]:
        """The times from ``since`` on when the monitor did not run: from one run's last sign of
        life to the next run's start."""
        result: list[tuple[float, float]] = await self._run(self._gaps, since)
        return result

    def _gaps(self, since: float) -> list[tuple[float, float]]:
        rows = self._connection().execute(
            "SELECT alive, next FROM (SELECT alive, LEAD(started) OVER (ORDER BY id) AS next"
            " FROM runs) WHERE next IS NOT NULL AND next > alive AND next >= ?",
            (since,),
        )
        return [(alive, following) for alive, following in rows]

    async def buckets(self, check: str, start: float, width: float, count: int) -> list[Bucket]:
        """The observations of ``check`` from ``start`` in ``count`` buckets of ``width``."""
        result: list[Bucket] = await self._run(self._buckets, check, start, width, count)
        return result

    def _buckets(self, check: str, start: float, width: float, count: int) -> list[Bucket]:
        rows = self._connection().execute(
            "SELECT CAST((at - ?) / ? AS INTEGER) AS bucket, COUNT(*), AVG(seconds),"
            " MAX(seconds), SUM(outcome = 'failure') FROM observations"
            " WHERE check_name = ? AND at >= ? AND at < ? GROUP BY bucket ORDER BY bucket",
            (start, width, check, start, start + width * count),
        )
        return [Bucket(*row) for row in rows]

    async def call(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``function(connection)`` in the store's thread: how other modules' tables
        (monitor.incident_store) share the one connection."""
        result: T = await self._run(lambda: function(self._connection()))
        return result

    async def close(self) -> None:
        await self._run(self._close)
        self._thread.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
