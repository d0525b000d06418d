"""Incidents and their timelines, in the monitor's SQLite file (through ``Store.call``).

The store is the one truth about an incident: the running monitor's escalation reads it at each
tick, so an acknowledgement written here by ``hamta monitor ack`` (whether or not the monitor
runs) or through ``POST /api/incidents/{id}/ack`` stops the next step either way.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from monitor.incidents import Incident, Severity
from monitor.store import Store
from monitor.verdicts import State

_SCHEMA = """
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY, check_name TEXT NOT NULL, kind TEXT NOT NULL,
    severity TEXT NOT NULL, state TEXT NOT NULL, detail TEXT NOT NULL, opened REAL NOT NULL,
    resolved REAL, acked_by TEXT, acked_at REAL, maintenance TEXT,
    steps_fired TEXT NOT NULL DEFAULT '[]', notified TEXT NOT NULL DEFAULT '[]');
CREATE INDEX IF NOT EXISTS incidents_open ON incidents (check_name, resolved);
CREATE TABLE IF NOT EXISTS incident_events (
    id INTEGER PRIMARY KEY, incident INTEGER NOT NULL, at REAL NOT NULL, event TEXT NOT NULL,
    detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS incident_events_by_incident ON incident_events (incident, id);
"""
_COLUMNS = (
    "id, check_name, kind, severity, state, detail, opened, resolved, acked_by, acked_at,"
    " maintenance, steps_fired, notified"
)


class AckError(Exception):
    """An acknowledgement that cannot be taken (no such incident, already resolved)."""


@dataclass(frozen=True, slots=True)
class IncidentRow:
    """An incident as stored: the rules' view plus what the pages and the CLI show."""

    incident: Incident
    kind: str
    detail: str
    acked_at: float | None
    maintenance: str | None

    def as_dict(self) -> dict[str, Any]:
        i = self.incident
        return {
            "id": i.id,
            "check": i.check,
            "kind": self.kind,
            "severity": i.severity.value,
            "state": i.state.value,
            "detail": self.detail,
            "opened": i.opened,
            "resolved": i.resolved,
            "acked_by": i.acked_by,
            "acked_at": self.acked_at,
            "maintenance": self.maintenance,
            "steps_fired": sorted(step + 1 for step in i.steps_fired),
            "notified": sorted(i.notified),
        }


def _row(values: tuple[Any, ...]) -> IncidentRow:
    (
        ident,
        check,
        kind,
        severity,
        state,
        detail,
        opened,
        resolved,
        by,
        at,
        maint,
        steps,
        notified,
    ) = values
    incident = Incident(
        ident,
        check,
        Severity(severity),
        State(state),
        opened,
        resolved,
        by,
        frozenset(json.loads(steps)),
        frozenset(json.loads(notified)),
    )
    return IncidentRow(incident, kind, detail, at, maint)


def _schema(db: sqlite3.Connection) -> sqlite3.Connection:
    db.executescript(_SCHEMA)
    return db


def _event(db: sqlite3.Connection, incident: int, at: float, event: str, detail: str) -> None:
    db.execute(
        "INSERT INTO incident_events (incident, at, event, detail) VALUES (?, ?, ?, ?)",
        (incident, at, event, detail),
    )


def _get(db: sqlite3.Connection, incident: int) -> IncidentRow | None:
    row = db.execute(f"SELECT {_COLUMNS} FROM incidents WHERE id = ?", (incident,)).fetchone()
    return _row(row) if row else None


class IncidentStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def open(
        self, check: str, kind: str, severity: Severity, state: State, at: float, detail: str
    ) -> IncidentRow:
        def run(db: sqlite3.Connection) -> IncidentRow:
            with _schema(db):
                cursor = db.execute(
                    "INSERT INTO incidents (check_name, kind, severity, state, detail, opened)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (check, kind, severity.value, state.value, detail, at),
                )
                ident = cursor.lastrowid or 0
                _event(db, ident, at, "opened", f"{state.value}: {detail}")
            row = _get(db, ident)
            assert row is not None
            return row

        return await self.store.call(run)

    async def update(
        self, ident: int, severity: Severity, state: State, at: float, detail: str
    ) -> None:
        def run(db: sqlite3.Connection) -> None:
            with _schema(db):
                db.execute(
                    "UPDATE incidents SET severity = ?, state = ?, detail = ? WHERE id = ?",
                    (severity.value, state.value, detail, ident),
                )
                _event(db, ident, at, "state", f"{state.value}: {detail}")

        await self.store.call(run)

    async def resolve(self, ident: int, at: float, detail: str) -> None:
        def run(db: sqlite3.Connection) -> None:
            with _schema(db):
                db.execute("UPDATE incidents SET resolved = ? WHERE id = ?", (at, ident))
                _event(db, ident, at, "resolved", detail)

        await self.store.call(run)

    async def fire_step(self, ident: int, step: int, notifiers: tuple[str, ...], at: float) -> None:
        """Step ``step`` (from 0) fired: spent for this incident; its notifiers were told."""

        def run(db: sqlite3.Connection) -> None:
            row = _get(_schema(db), ident)
            assert row is not None
            steps = sorted(row.incident.steps_fired | {step})
            notified = sorted(row.incident.notified | set(notifiers))
            with db:
                db.execute(
                    "UPDATE incidents SET steps_fired = ?, notified = ? WHERE id = ?",
                    (json.dumps(steps), json.dumps(notified), ident),
                )
                _event(db, ident, at, "escalated", f"step {step + 1}: {', '.join(notifiers)}")

        await self.store.call(run)

    async def in_maintenance(self, ident: int, window: str, at: float) -> None:
        def run(db: sqlite3.Connection) -> None:
            with _schema(db):
                db.execute("UPDATE incidents SET maintenance = ? WHERE id = ?", (window, ident))
                _event(db, ident, at, "maintenance", f"alerts held by window {window!r}")

        await self.store.call(run)

    async def note(self, ident: int, at: float, event: str, detail: str) -> None:
        """A line of the timeline (a notification sent or given up)."""

        def run(db: sqlite3.Connection) -> None:
            with _schema(db):
                _event(db, ident, at, event, detail)

        await self.store.call(run)

    async def ack(self, ident: int, by: str, at: float) -> IncidentRow:
        """Acknowledge: no further escalation. Again: unchanged. :class:`AckError` if it
        cannot be (no such incident, or resolved already)."""

        def run(db: sqlite3.Connection) -> IncidentRow:
            row = _get(_schema(db), ident)
            if row is None:
                raise AckError(f"no incident {ident}")
            if row.incident.resolved is not None:
                raise AckError(f"incident {ident} is resolved already")
            if row.incident.acked_by is not None:
                return row
            with db:
                db.execute(
                    "UPDATE incidents SET acked_by = ?, acked_at = ? WHERE id = ?",
                    (by, at, ident),
                )
                _event(db, ident, at, "acknowledged", f"by {by}")
            acked = _get(db, ident)
            assert acked is not None
            return acked

        return await self.store.call(run)

    async def get(self, ident: int) -> IncidentRow | None:
        return await self.store.call(lambda db: _get(_schema(db), ident))

    async def open_incidents(self) -> list[IncidentRow]:
        def run(db: sqlite3.Connection) -> list[IncidentRow]:
            rows = _schema(db).execute(
                f"SELECT {_COLUMNS} FROM incidents WHERE resolved IS NULL ORDER BY id"
            )
            return [_row(r) for r in rows]

        return await self.store.call(run)

    async def open_for(self, check: str) -> IncidentRow | None:
        def run(db: sqlite3.Connection) -> IncidentRow | None:
            row = (
                _schema(db)
                .execute(
                    f"SELECT {_COLUMNS} FROM incidents WHERE check_name = ? AND resolved IS NULL"
                    " ORDER BY id DESC",
                    (check,),
                )
                .fetchone()
            )
            return _row(row) if row else None

        return await self.store.call(run)

    async def recent(self, limit: int = 50) -> list[IncidentRow]:
        """The open incidents, then the latest resolved ones, ``limit`` in all."""

        def run(db: sqlite3.Connection) -> list[IncidentRow]:
            rows = _schema(db).execute(
                f"SELECT {_COLUMNS} FROM incidents ORDER BY resolved IS NOT NULL, id DESC LIMIT ?",
                (limit,),
            )
            return [_row(r) for r in rows]

        return await self.store.call(run)

    async def timeline(self, ident: int) -> list[dict[str, Any]]:
        def run(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = _schema(db).execute(
                "SELECT at, event, detail FROM incident_events WHERE incident = ? ORDER BY id",
                (ident,),
            )
            return [{"at": at, "event": event, "detail": detail} for at, event, detail in rows]

        return await self.store.call(run)

    async def prune(self, before: float) -> int:
        """Forget incidents resolved before ``before``, with their timelines."""

        def run(db: sqlite3.Connection) -> int:
            with _schema(db):
                gone = db.execute(
                    "DELETE FROM incident_events WHERE incident IN"
                    " (SELECT id FROM incidents WHERE resolved < ?)",
                    (before,),
                ).rowcount
                gone += db.execute("DELETE FROM incidents WHERE resolved < ?", (before,)).rowcount
            return gone

        return await self.store.call(run)
