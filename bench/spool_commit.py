#!/usr/bin/env python3
"""What the spool's group commit costs per message, in CPU and context switches (issue 21).

The relay's figure (``bench/relay.py``: CPU per message of the whole relay) moves by ±15 % from
run to run on a shared machine, more than the spool's part of it. This runs the spool alone, in
one process, as the relay drives it: ``--sessions`` coroutines each doing ``--work-us`` of
Python work per message (what reception and delivery cost the event loop, so that the loop's
thread holds the GIL the I/O thread wants, as in the relay), waiting ``--wait-ms`` (the client's
round trips: what keeps the relay's group commits small, 1.5 to 2.5 messages), then appending
a 2 KB message and marking it delivered. The same load runs without the spool (the work alone),
and the difference is the spool's cost per message: CPU of the process (``time.process_time``,
every thread), context switches of all its threads (``/proc/self/task/*/status``: each GIL
hand-off between the event loop and the I/O thread is one or two) and syncs (two a group commit:
a faster commit makes smaller groups, hence more syncs a message). With ``--old FILE`` (an older
``hamta/spool.py``, e.g. ``git show main:hamta/spool.py > /tmp/old_spool.py``), that module
runs beside this tree's, alternately, round after round. The last line is JSON.

Usage: .venv/bin/python bench/spool_commit.py [--messages 3000] [--sessions 20]
    [--work-us 300] [--wait-ms 5] [--rounds 5] [--old FILE] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import tempfile
import time
import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

import hamta.spool

Run = tuple[float, float, float]  # one run's CPU ms, context switches and syncs, per message


def _context_switches() -> int:
    total = 0
    for status in Path("/proc/self/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if "ctxt_switches:" in line:  # voluntary and nonvoluntary
                    total += int(line.split()[1])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return total


def _work(microseconds: int) -> None:
    """Python work of about ``microseconds`` (CRC-32 of small pieces, held GIL)."""
    deadline = time.perf_counter() + microseconds / 1e6
    piece = b"x" * 64
    while time.perf_counter() < deadline:
        zlib.crc32(piece)


async def _load(spool_module: ModuleType | None, root: Path, args: argparse.Namespace) -> int:
    """Run the load; return the spool's fsyncs (0 without a spool)."""
    body = b"Subject: bench\r\n\r\n" + b"x" * (args.size - 20) + b"\r\n"
    spool: Any = None
    if spool_module is not None:
        spool = spool_module.Spool(root)
        spool.open()
        await spool.recover()
    remaining = [args.messages]

    async def session() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            _work(args.work_us)
            await asyncio.sleep(args.wait_ms / 1000)
            if spool is None:
                continue
            message = await spool.append(body, "from@bench.test", ["to@sink.test"])
            spool.mark_done(message, [0])

    await asyncio.gather(*(session() for _ in range(args.sessions)))
    if spool is None:
        return 0
    await spool.close()
    return int(spool.fsyncs)


def _measure(spool_module: ModuleType | None, args: argparse.Namespace) -> Run:
    """CPU milliseconds, context switches and syncs per message of one run."""
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        cpu, switches = time.process_time(), _context_switches()
        syncs = asyncio.run(_load(spool_module, Path(tmp) / "spool", args))
        cpu, switches = time.process_time() - cpu, _context_switches() - switches
    n = args.messages
    return cpu * 1000 / n, switches / n, syncs / n


def _old_module(path: Path) -> ModuleType:
    """An older hamta/spool.py, loaded beside this tree's (its imports resolve to this tree)."""
    spec = importlib.util.spec_from_file_location("old_spool", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--work-us", type=int, default=300, help="Python work per message")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="wait before each append")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--old", type=Path, default=None, help="an older hamta/spool.py")
    parser.add_argument("--workdir", type=Path, default=None, help="where the spools go")
    args = parser.parse_args()
    modules: dict[str, ModuleType] = {"new": hamta.spool}
    if args.old is not None:
        modules["old"] = _old_module(args.old)
    runs: dict[str, list[Run]] = {
        "work": [],
        **{name: [] for name in modules},
    }
    for _ in range(args.rounds):
        runs["work"].append(_measure(None, args))
        for name, module in modules.items():
            runs[name].append(_measure(module, args))
    for line in _report(runs, args.rounds):
        print(line)
    return 0


def _report(runs: dict[str, list[Run]], rounds: int) -> list[str]:
    """One line per spool (medians, less the work alone's), then the JSON line."""
    work = [statistics.median(run[i] for run in runs["work"]) for i in range(2)]
    figures: dict[str, float] = {"work_cpu_ms": round(work[0], 4)}
    lines = []
    for name in (name for name in runs if name != "work"):
        cpu, switches, syncs = (statistics.median(run[i] for run in runs[name]) for i in range(3))
        cpu, switches = cpu - work[0], switches - work[1]
        figures |= {
            f"{name}_spool_cpu_ms": round(cpu, 4),
            f"{name}_spool_switches": round(switches, 2),
            f"{name}_syncs": round(syncs, 3),  # the group commits' size: a faster one shrinks it
        }
        lines.append(
            f"{name}: the spool's CPU {cpu:.3f} ms a message, {switches:.2f} context switches "
            f"and {syncs:.3f} syncs a message (medians of {rounds}; the work alone: "
            f"{work[0]:.3f} ms)"
        )
    return [*lines, json.dumps(figures)]


if __name__ == "__main__":
    raise SystemExit(main())
