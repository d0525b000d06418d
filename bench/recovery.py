"""Queue recovery at depth: how long a relay takes to rebuild its queue from a full spool.

This is the replay on the failover path: the new active node opens the spool left by the old
one and must know every queued message before it can deliver them. The benchmark fills a spool
with N messages of 2 KB through the real append path (group commit, fsync), with 10 % of them
half-delivered and 10 % deferred so that the journal holds every kind of record, then measures,
in a fresh process, what activation does: open the spool, load its journal (no body is read),
and put every message into the per-destination queue. It prints the figures and ends with one
JSON line.

    python bench/recovery.py --messages 100000 --messages 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hamta.config import RetryConfig
from hamta.domain_stats import DomainStats, destination_metrics, domains_view, relay_snapshot
from hamta.queue import MailQueue, recipient_domain
from hamta.spool import Spool

BODY = b"Subject: bench\r\n\r\n" + b"x" * (2048 - 20) + b"\r\n"


async def fill(path: Path, count: int, concurrency: int = 2000) -> float:
    """Queue ``count`` messages through the real append path; return seconds taken."""
    rng = random.Random(1)
    started = time.perf_counter()
    spool = Spool(path)
    spool.open()
    await spool.recover()
    domains = [f"d{n}.test" for n in range(200)]
    done = 0
    while done < count:
        batch = min(concurrency, count - done)
        messages = await asyncio.gather(
            *(
                spool.append(
                    BODY,
                    "sender@origin.test",
                    [f"r{done + i}@{rng.choice(domains)}", f"s{done + i}@{rng.choice(domains)}"],
                    message_id=f"<{done + i}@bench>",
                )
                for i in range(batch)
            )
        )
        for message in messages:
            roll = rng.random()
            if roll < 0.1:
                spool.mark_done(message, [0])
            elif roll < 0.2:
                spool.mark_deferred(message, [0, 1], attempts=2, next_attempt=time.time() + 600)
        done += batch
    await spool.close()
    return time.perf_counter() - started


async def recover(path: Path) -> dict[str, float]:
    """What activation does with a spool: open, load the journal, fill the queue."""
    rss_before = _rss_bytes()
    started = time.perf_counter()
    # CPU seconds of the whole process (the loading thread included): on a shared machine
    # the wall-clock time above moves with the others' load, this much less.
    cpu_started = time.process_time()
    spool = Spool(path, recipient_key=recipient_domain)  # as the relay opens it
    spool.open()
    opened = time.perf_counter()
    state = await spool.recover()
    loaded = time.perf_counter()
    queue = MailQueue(RetryConfig(), lambda domain: domain, time.time, lambda _: None)
    queue.add_all(*state.take_queue())
    queued = time.perf_counter()
    cpu_s = time.process_time() - cpu_started
    jobs = queue.ready_count + queue.deferred_count
    # What the queue holds, per message: RSS now less RSS before the spool was opened (the
    # interpreter and modules), with every message queued.
    held = _rss_bytes() - rss_before
    # What /api/domains and /metrics compute at this depth (without HTTP): the relay's
    # snapshot with the queue's per-domain counts, its view and the per-destination series;
    # and, for comparison, the walk of every job that by_domain() used to be.
    snapshot_started = time.perf_counter()
    snapshot = relay_snapshot(DomainStats(), queue, lambda domain: domain)
    domains_view(snapshot, 100)
    api_s = time.perf_counter() - snapshot_started
    metrics_started = time.perf_counter()
    destination_metrics(relay_snapshot(DomainStats(), queue, lambda domain: domain), 20)
    metrics_s = time.perf_counter() - metrics_started
    walk_started = time.perf_counter()
    queue.walk_by_domain()
    walk_s = time.perf_counter() - walk_started
    await spool.close()
    return {
        "bytes_per_message": held / max(1, state.stats.messages),
        "api_domains_ms": api_s * 1000,
        "metrics_destinations_ms": metrics_s * 1000,
        "queue_walk_ms": walk_s * 1000,
        "messages": float(state.stats.messages),
        "jobs": float(jobs),
        "journal_mib": state.stats.journal_bytes / 2**20,
        "open_s": opened - started,
        "load_s": loaded - opened,
        "queue_s": queued - loaded,
        "recovery_s": queued - started,
        "recovery_cpu_s": cpu_s,
        "load_average": os.getloadavg()[0],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure(count: int, workdir: Path) -> dict[str, float]:
    """Fill a spool with ``count`` messages, then recover it in a fresh process."""
    path = workdir / f"spool-{count}"
    if path.exists():
        shutil.rmtree(path)
    fill_seconds = asyncio.run(fill(path, count))
    result = subprocess.run(
        [sys.executable, __file__, "--recover-only", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    figures: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    figures["fill_s"] = fill_seconds
    figures["fill_msgs_per_s"] = count / fill_seconds
    shutil.rmtree(path)
    return figures


def main() -> None:
    """Run the benchmark for each requested depth."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--messages",
        type=int,
        action="append",
        help="queue depth to measure (repeatable; default 100000 and 1000000)",
    )
    parser.add_argument("--workdir", type=Path, help="where to build the spools")
    parser.add_argument("--recover-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recover_only:
        print(json.dumps(asyncio.run(recover(args.recover_only))))
        return
    depths = args.messages or [100_000, 1_000_000]
    summary: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for count in depths:
            figures = measure(count, Path(tmp))
            print(
                f"{count:>9} messages: recovery {figures['recovery_s']:.3f} s, "
                f"{figures['recovery_cpu_s']:.3f} s of CPU "
                f"(load average {figures['load_average']:.1f}; "
                f"open {figures['open_s'] * 1000:.1f} ms, "
                f"journal {figures['journal_mib']:.0f} MiB "
                f"loaded in {figures['load_s']:.3f} s, queue built in {figures['queue_s']:.3f} s), "
                f"{figures['jobs']:.0f} jobs, peak RSS {figures['peak_rss_mib']:.0f} MiB, "
                f"{figures['bytes_per_message']:.0f} bytes per queued message; "
                f"filled at {figures['fill_msgs_per_s']:.0f} msg/s",
                flush=True,
            )
            print(
                f"{count:>9} messages: /api/domains in {figures['api_domains_ms']:.1f} ms, "
                f"/metrics' per-destination series in {figures['metrics_destinations_ms']:.1f} ms "
                f"(a walk of every job: {figures['queue_walk_ms']:.1f} ms)",
                flush=True,
            )
            summary[f"recovery_{count}_s"] = round(figures["recovery_s"], 3)
            summary[f"recovery_{count}_cpu_s"] = round(figures["recovery_cpu_s"], 3)
            summary[f"recovery_{count}_load_average"] = round(figures["load_average"], 1)
            summary[f"recovery_{count}_rss_mib"] = round(figures["peak_rss_mib"], 1)
            summary[f"bytes_per_message_{count}"] = round(figures["bytes_per_message"])
            summary[f"api_domains_{count}_ms"] = round(figures["api_domains_ms"], 2)
            summary[f"metrics_destinations_{count}_ms"] = round(
                figures["metrics_destinations_ms"], 2
            )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
