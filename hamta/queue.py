"""The in-memory queue: per-destination ready lines, deferred mail and the retry policy.

The spool says *what* is still to be done; this module says *when* and *in which line*. Each
recipient that is not finished belongs to one :class:`Job` (one message, one domain), and each job
waits either in its destination's ready line or in the deferred heap until its next attempt. A
destination is the next hop: the recipient domain, or the smarthost of a static route, so that a
slow or dead destination only ever holds up its own line.

A message none of whose recipients was tried yet (most of a deep queue, all of a fresh one) waits
in each of its destinations' ready lines as itself, not as jobs: it is split into its jobs for a
destination when a session takes it (:meth:`MailQueue.take`), so that a million queued messages
cost a line entry each, not a Job object per recipient domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec

from hamta.config import RetryConfig
from hamta.shaping import Shaper
from hamta.spool import LiveMessage

# The places a job's recipients are counted in, per domain (MailQueue._counts).
_READY, _DEFERRED, _IN_FLIGHT = 0, 1, 2


def recipient_domain(address: str) -> str:
    """The domain of an address, lower-cased, as a queue and routing key.

    Interned: a queue of a million jobs holds each domain's name once, not once per job.
    """
    return sys.intern(address.rpartition("@")[2].lower().rstrip("."))


# One tuple per single recipient index, shared by every job of one recipient (the usual job):
# a tuple made per job costs 48 bytes each in a deep queue.
_SINGLE = tuple((index,) for index in range(256))


def _indices(indices: list[int]) -> tuple[int, ...]:
    if len(indices) == 1 and indices[0] < len(_SINGLE):
        return _SINGLE[indices[0]]
    return tuple(indices)


def backoff_delay(attempts: int, policy: RetryConfig, rng: random.Random) -> float:
    """Seconds until the next attempt after ``attempts`` failures: exponential, capped, jittered."""
    base = min(policy.max_delay, policy.first_delay * policy.factor ** max(0, attempts - 1))
    if policy.jitter:
        base *= 1.0 + rng.uniform(-policy.jitter, policy.jitter)
    return min(base, policy.max_delay)


class Job(msgspec.Struct, gc=False):
    """Recipients of one message in one domain, delivered in one SMTP transaction.

    Not tracked by the cyclic garbage collector, like the messages it points to.
    """

    message: LiveMessage
    domain: str
    rcpts: tuple[int, ...]
    attempts: int = 0
    due: float = 0.0  # wall-clock time of the next attempt

    @property
    def addresses(self) -> list[str]:
        """The recipients' addresses."""
        return [self.message.rec.recipients[i] for i in self.rcpts]


@dataclass(slots=True, eq=False)
class Destination:
    """One next hop: its ready line, how many sessions serve it, and how it is shaped."""

    key: str
    # Jobs, and messages not yet split into their jobs for this destination (see the module).
    ready: deque[Job | LiveMessage] = field(default_factory=deque)
    sessions: int = 0
    idle: int = 0
    in_flight: int = 0
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    shaper: Shaper = field(default_factory=Shaper)
    #: Held by an operator (``hamta queue suspend``): mail stays queued, nothing is sent.
    suspended: bool = False

    @property
    def throttled(self) -> bool:
        """Slowed down by throttle replies and not yet recovered."""
        return self.shaper.throttled

    @property
    def rate(self) -> float | None:
        """Messages per second this process may send to it now (None: no limit)."""
        return self.shaper.rate

    @property
    def concurrency(self) -> int:
        """Sessions this process may run to it now."""
        return self.shaper.concurrency


class MailQueue:
    """Jobs by destination, ready or deferred; the scheduler feeds ready lines in time."""

    def __init__(
        self,
        policy: RetryConfig,
        next_hop: Callable[[str], str],
        wall_clock: Callable[[], float],
        on_ready: Callable[[Destination], None],
        rng: random.Random | None = None,
        *,
        shaper_for: Callable[[str], Shaper] | None = None,
        suspended: Iterable[str] = (),
    ) -> None:
        self.policy = policy
        self._shaper_for = shaper_for
        #: Destination keys held by an operator, also those with no mail queued yet.
        self.suspended: set[str] = set(suspended)
        self._next_hop = next_hop
        self._wall = wall_clock
        self._on_ready = on_ready
        self._rng = rng or random.Random()
        self.destinations: dict[str, Destination] = {}
        self._by_domain: dict[str, Destination] = {}
        self._deferred: list[tuple[float, int, Job]] = []
        # Jobs a session took from a ready line whose outcome is not applied yet, by id(): in
        # no line, yet still queued (``hamta queue`` counts them in flight). With each, the
        # recipients it was counted with (the engine narrows a job's rcpts before deferring it).
        self._taken: dict[int, tuple[Job, int]] = {}
        # Recipients per domain in each place (READY, DEFERRED, IN_FLIGHT), kept as jobs move,
        # so that the metrics and the domain API cost O(domains), never a walk of the queue.
        self._counts: dict[str, list[int]] = {}
        self._seq = itertools.count()
        self._timer_changed = asyncio.Event()

    # ------------------------------------------------------------- admission

    def add(self, message: LiveMessage) -> None:
        """Queue a message's unfinished recipients, grouped by domain and retry time."""
        # Decoded once, dropped once queued.
        self.add_all([message], [recipient_domain(address) for address in message.rec.recipients])

    def add_all(self, messages: list[LiveMessage], domains: list[str]) -> None:
        """:meth:`add` each of ``messages``, in order, given their recipients' domains: those
        of the first message's recipients, then the second's, and so on (recovery found them
        as it read the journal: ``SpoolState.take_queue``), so that no envelope is decoded.
        A message with no recipient left (finished since) adds nothing."""
        # Recovery runs this for millions of messages: what each needs is bound once here.
        by_domain, counts, on_ready = self._by_domain, self._counts, self._on_ready
        start = 0
        for message in messages:
            # LiveMessage.recipient_count and .untouched written out (two calls a message).
            marks = message.marks
            stop = start + marks.bit_length() - 1
            if message.retry is not None or marks.bit_count() != 1:
                self._add_tried(message, domains[start:stop])
                start = stop
                continue
            # The common case, and the one recovery at depth depends on: nothing done yet. The
            # message itself waits in each of its destinations' lines (split when taken), and
            # each line is woken once all its recipients are counted.
            lines: list[Destination] = []
            for domain in domains[start:stop]:
                destination = by_domain.get(domain) or self.destination_for(domain)
                row = counts.get(domain)
                if row is None:
                    row = counts[domain] = [0, 0, 0]
                row[_READY] += 1
                if destination not in lines:
                    destination.ready.append(message)
                    lines.append(destination)
            for destination in lines:
                on_ready(destination)
            start = stop

    def _add_tried(self, message: LiveMessage, domains: list[str]) -> None:
        """Queue ``message``, some of whose recipients were tried (recipient ``i`` is in
        ``domains[i]``): one job per domain and retry time, deferred or ready."""
        groups: dict[tuple[str, int, float], list[int]] = {}
        retry = message.retry or {}
        for index in message.pending:
            attempts, due = retry.get(index, (0, 0.0))
            groups.setdefault((domains[index], attempts, due), []).append(index)
        now = self._wall()
        for (domain, attempts, due), indices in groups.items():
            job = Job(message, domain, _indices(indices), attempts, due)
            if due > now:
                self._push_deferred(job)
            else:
                self.make_ready(job)

    def _jobs_of(self, message: LiveMessage, destination: Destination) -> list[Job]:
        """The jobs of a message in a ready line: its unfinished recipients that go to
        ``destination``, one job per domain, in the order of their first recipient."""
        by_domain: dict[str, list[int]] = {}
        marks = message.marks
        for index, address in enumerate(message.rec.recipients):
            if marks >> index & 1:
                continue
            domain = recipient_domain(address)
            if (self._by_domain.get(domain) or self.destination_for(domain)) is destination:
                by_domain.setdefault(domain, []).append(index)
        return [Job(message, domain, _indices(indices)) for domain, indices in by_domain.items()]

    def make_ready(self, job: Job) -> None:
        """Put a job at the end of its destination's ready line."""
        domain = job.domain
        destination = self._by_domain.get(domain) or self.destination_for(domain)
        destination.ready.append(job)
        # _count(domain, _READY, ...) written out: recovery calls this once per job, millions.
        row = self._counts.get(domain)
        if row is None:
            row = self._counts[domain] = [0, 0, 0]
        row[_READY] += len(job.rcpts)
        self._on_ready(destination)

    def take(self, destination: Destination) -> Job:
        """The next job of ``destination``'s ready line, counted in flight until :meth:`settle`.

        A message waiting as itself is split into its jobs here: the first is taken, the others
        go back to the head of the line, still counted ready.
        """
        line = destination.ready
        while True:
            entry = line.popleft()  # IndexError once empty, as for any deque
            if isinstance(entry, Job):
                job = entry
                break
            jobs = self._jobs_of(entry, destination)
            if jobs:
                job = jobs[0]
                line.extendleft(reversed(jobs[1:]))
                break
        self._hold(job)
        return job

    def take_all(self, destination: Destination) -> list[Job]:
        """Every job of ``destination``'s ready line, each in flight until :meth:`settle`."""
        jobs: list[Job] = []
        for entry in destination.ready:
            if isinstance(entry, Job):
                jobs.append(entry)
            else:
                jobs += self._jobs_of(entry, destination)
        destination.ready.clear()
        for job in jobs:
            self._hold(job)
        return jobs

    def _hold(self, job: Job) -> None:
        recipients = len(job.rcpts)
        self._taken[id(job)] = (job, recipients)
        self._count(job.domain, _READY, -recipients)
        self._count(job.domain, _IN_FLIGHT, recipients)

    def settle(self, job: Job) -> None:
        """A taken job leaves the flight: its outcome is applied, or it is left to the spool."""
        taken = self._taken.pop(id(job), None)
        if taken is not None:
            self._count(job.domain, _IN_FLIGHT, -taken[1])

    def _count(self, domain: str, place: int, recipients: int) -> None:
        row = self._counts.get(domain)
        if row is None:
            row = self._counts[domain] = [0, 0, 0]
        row[place] += recipients
        if recipients < 0 and not (row[0] or row[1] or row[2]):
            del self._counts[domain]  # a domain with nothing queued leaves no row behind

    def destination_for(self, domain: str) -> Destination:
        """The destination that mail for ``domain`` goes to."""
        destination = self._by_domain.get(domain)
        if destination is None:
            destination = self._by_domain[domain] = self.destination(self._next_hop(domain))
        return destination

    def destination(self, key: str) -> Destination:
        """The destination for a next-hop key, created on first use."""
        destination = self.destinations.get(key)
        if destination is None:
            shaper = self._shaper_for(key) if self._shaper_for is not None else Shaper()
            destination = self.destinations[key] = Destination(
                key, shaper=shaper, suspended=key in self.suspended
            )
        return destination

    # ------------------------------------------------------- operator actions

    def destination_key(self, name: str) -> str:
        """The destination key for a name an operator gives: a domain or a key itself."""
        name = name.strip().lower().rstrip(".")
        return name if name in self.destinations or name.startswith("[") else self._next_hop(name)

    def suspend(self, key: str) -> Destination:
        """Hold a destination: its sessions end after their current message, mail stays."""
        self.suspended.add(key)
        destination = self.destination(key)
        destination.suspended = True
        destination.wakeup.set()  # idle sessions notice and close
        return destination

    def resume(self, key: str) -> Destination:
        """Release a held destination: its ready line is served again."""
        self.suspended.discard(key)
        destination = self.destination(key)
        destination.suspended = False
        if destination.ready:
            self._on_ready(destination)
        return destination

    def retry_destination(self, key: str) -> int:
        """Make every deferred job of a destination due now; return how many moved."""
        return self.retry_now(lambda job: self.destination_for(job.domain).key == key)

    # --------------------------------------------------------------- retries

    def is_expired(self, job: Job) -> bool:
        """Has the job's message outlived the maximum queue lifetime?"""
        return self._wall() - job.message.rec.arrival >= self.policy.max_queue_lifetime

    def defer(self, job: Job) -> float:
        """Count a failed attempt and schedule the next; return its wall-clock time."""
        job.attempts += 1
        policy = self.destination_for(job.domain).shaper.limits.retry
        job.due = self._wall() + backoff_delay(job.attempts, policy, self._rng)
        self._push_deferred(job)
        return job.due

    def _push_deferred(self, job: Job) -> None:
        was_first = not self._deferred or job.due < self._deferred[0][0]
        heapq.heappush(self._deferred, (job.due, next(self._seq), job))
        self._count(job.domain, _DEFERRED, len(job.rcpts))
        if was_first:
            self._timer_changed.set()

    def retry_now(self, predicate: Callable[[Job], bool] | None = None) -> int:
        """Move deferred jobs (all, or those matching) to their ready lines at once."""
        keep: list[tuple[float, int, Job]] = []
        moved = 0
        for entry in self._deferred:
            if predicate is None or predicate(entry[2]):
                self._count(entry[2].domain, _DEFERRED, -len(entry[2].rcpts))
                self.make_ready(entry[2])
                moved += 1
            else:
                keep.append(entry)
        heapq.heapify(keep)
        self._deferred = keep
        return moved

    def release_due(self) -> float:
        """Move the deferred jobs due by now to their ready lines; return that now."""
        now = self._wall()
        while self._deferred and self._deferred[0][0] <= now:
            job = heapq.heappop(self._deferred)[2]
            self._count(job.domain, _DEFERRED, -len(job.rcpts))
            self.make_ready(job)
        return now

    async def run_timer(self) -> None:
        """Forever: move deferred jobs to their ready lines when they fall due."""
        while True:
            self._timer_changed.clear()
            now = self.release_due()
            if not self._deferred:
                await self._timer_changed.wait()
                continue
            wait = self._deferred[0][0] - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_changed.wait(), timeout=wait)

    # ----------------------------------------------------------------- views

    @property
    def deferred_count(self) -> int:
        """Jobs waiting for their next attempt."""
        return len(self._deferred)

    @property
    def ready_count(self) -> int:
        """Jobs waiting in ready lines (a message not yet split into its jobs counts once per
        line it waits in)."""
        return sum(len(d.ready) for d in self.destinations.values())

    @property
    def in_flight(self) -> int:
        """Jobs being delivered right now."""
        return sum(d.in_flight for d in self.destinations.values())

    def by_domain(self) -> dict[str, dict[str, int]]:
        """Recipients queued per domain: ready, deferred, and in flight (taken by a session).

        The three add up to every recipient of the queue, so that a domain's mail never seems
        to vanish while a session holds it. Read from counters kept as jobs move: O(domains).
        """
        return {
            domain: {"ready": ready, "deferred": deferred, "in_flight": in_flight}
            for domain, (ready, deferred, in_flight) in self._counts.items()
        }

    def walk_by_domain(self) -> dict[str, dict[str, int]]:
        """:meth:`by_domain` counted by walking every job: what the counters must equal."""
        summary: dict[str, dict[str, int]] = {}

        def count(job: Job, column: str, recipients: int) -> None:
            row = summary.setdefault(job.domain, {"ready": 0, "deferred": 0, "in_flight": 0})
            row[column] += recipients

        for destination in self.destinations.values():
            for entry in destination.ready:
                jobs = [entry] if isinstance(entry, Job) else self._jobs_of(entry, destination)
                for job in jobs:
                    count(job, "ready", len(job.rcpts))
        for _, _, job in self._deferred:
            count(job, "deferred", len(job.rcpts))
        for job, recipients in self._taken.values():
            count(job, "in_flight", recipients)
        return summary
