"""How fast the monitor's history API answers on a full store: 90 days of 1-minute observations
for 50 checks (6.48 million rows), with an outage a day per check.

Prints the time of each view (the page's first load reads /api/uptime and /api/outages, then
one /api/checks/NAME/history per check) and a final JSON line. Usage:
``python -m bench.monitor_history [--checks 50] [--days 90] [--store PATH]``; a store at PATH
that already holds the rows is reused (filling it takes about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from monitor.config import parse_monitor_config
from monitor.history_api import check_history_view, outages_view, uptime_view
from monitor.store import Store

MINUTE, DAY = 60.0, 86400.0


def fill(path: Path, checks: int, days: int, now: float) -> int:
    """Write the rows straight into the store's tables (its schema made by the Store)."""
    db = sqlite3.connect(path)
    if db.execute("SELECT COUNT(*) FROM observations").fetchone()[0] > 0:
        return 0
    rng = random.Random(18)
    rows = 0
    with db:
        for index in range(checks):
            name = f"check{index:02d}"
            start = now - days * DAY
            observations = []
            changes = [(name, start, "unknown", "up", "ok")]
            for day in range(days):
                down = start + day * DAY + rng.uniform(0, DAY - 3600)
                changes.append((name, down, "up", "down", "refused"))
                changes.append((name, down + rng.uniform(60, 3000), "down", "up", "ok"))
            at = start
            while at < now:
                observations.append((name, at, "success", rng.uniform(0.05, 0.3), "", "{}", "[]"))
                at += MINUTE
            db.executemany(
                "INSERT INTO observations (check_name, at, outcome, seconds, detail, facts,"
                " changes) VALUES (?, ?, ?, ?, ?, ?, ?)",
                observations,
            )
            db.executemany(
                "INSERT INTO state_changes (check_name, at, previous, current, detail)"
                " VALUES (?, ?, ?, ?, ?)",
                changes,
            )
            rows += len(observations)
    db.execute("ANALYZE")
    db.close()
    return rows


async def measure(path: Path, checks: int, days: int) -> dict[str, float | int]:
    now = time.time()
    text = "".join(
        f'[[checks]]\nname = "check{i:02d}"\nkind = "smtp"\nhost = "127.0.0.1"\n'
        for i in range(checks)
    )
    config = parse_monitor_config(text)
    store = Store(path)
    await store.states()  # makes the schema and its indexes
    started = time.perf_counter()
    rows = await asyncio.get_running_loop().run_in_executor(None, fill, path, checks, days, now)
    filled = time.perf_counter() - started
    figures: dict[str, float | int] = {"checks": checks, "days": days, "rows_written": rows}
    figures["fill_s"] = round(filled, 1)
    views: dict[str, Coroutine[Any, Any, dict[str, Any]]] = {
        "uptime_s": uptime_view(store, config.checks, now),
        "outages_90d_s": outages_view(store, config.checks, now, "90d"),
        "history_one_90d_s": check_history_view(store, config.checks[0], now, "90d"),
        "history_one_24h_s": check_history_view(store, config.checks[0], now, "24h"),
    }
    for label, view in views.items():  # a coroutine starts when awaited: timed one by one
        started = time.perf_counter()
        await view
        figures[label] = round(time.perf_counter() - started, 4)
    started = time.perf_counter()
    for check in config.checks:
        await check_history_view(store, check, now, "90d")
    figures["history_all_90d_s"] = round(time.perf_counter() - started, 3)
    await store.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=50)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--store", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = args.store or Path(scratch) / "monitor.sqlite"
        figures = asyncio.run(measure(path, args.checks, args.days))
    for key, value in figures.items():
        print(f"{key:>20}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
