"""The queue's per-domain counters equal a walk of the queue after any sequence of operations.

``MailQueue.by_domain()`` (what ``/metrics``, ``/api/domains``, ``/api/queue`` and the dashboard
read) is kept as jobs move instead of walking the queue; ``walk_by_domain()`` counts every job.
Hypothesis drives a real queue through random admissions (fresh and recovered, with retry
state), takes, whole-line takes (a routing failure), outcomes (delivered, narrowed and
deferred, left to the spool), retries and timer releases, and compares the two after each step.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from hamta.config import RetryConfig
from hamta.queue import Job, MailQueue
from hamta.spool_format import Enqueue
from hamta.spool_recovery import LiveMessage

DOMAINS = ("a.test", "b.test", "C.test", "mx.test")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def message(serial: int, domains: list[int], retry: dict[int, tuple[int, float]]) -> LiveMessage:
    recipients = tuple(f"r{i}@{DOMAINS[d]}" for i, d in enumerate(domains))
    rec = Enqueue(f"q{serial}", 0, 0, 10, 0, 0.0, "s@x.test", recipients)
    retry = {i: v for i, v in retry.items() if i < len(recipients)}
    live = LiveMessage.of(rec)
    live.durable, live.retry = True, retry or None
    return live


operation = st.one_of(
    st.tuples(
        st.just("add"),
        st.lists(st.integers(0, len(DOMAINS) - 1), min_size=1, max_size=5),
        st.dictionaries(
            st.integers(0, 4), st.tuples(st.integers(1, 5), st.floats(900.0, 1100.0)), max_size=3
        ),
    ),
    st.tuples(st.just("take"), st.integers(0, 10)),
    st.tuples(st.just("take_all"), st.integers(0, 10)),
    st.tuples(st.just("outcome"), st.integers(0, 20), st.sampled_from(["done", "defer", "left"])),
    st.tuples(st.just("retry_now"), st.sampled_from(["all", "a.test", "none"])),
    st.tuples(st.just("tick"), st.floats(0.0, 200.0)),
)


def smarthost(domain: str) -> str:
    """Two domains share a next hop (a static route): one line, two jobs per message."""
    return "[relay.test]" if domain in ("a.test", "mx.test") else domain


@settings(max_examples=150, deadline=None)
@given(st.lists(operation, max_size=60), st.booleans())
def test_counters_equal_a_walk_after_any_sequence(
    operations: list[tuple[Any, ...]], routed: bool
) -> None:
    clock = Clock()
    policy = RetryConfig(first_delay=10.0, max_delay=100.0, jitter=0.0)
    next_hop = smarthost if routed else (lambda d: d)
    queue = MailQueue(policy, next_hop=next_hop, wall_clock=clock, on_ready=lambda d: None)
    taken: list[Job] = []
    for serial, op in enumerate(operations):
        kind = op[0]
        if kind == "add":
            queue.add(message(serial, op[1], op[2]))
        elif kind in ("take", "take_all"):
            lines = [d for d in queue.destinations.values() if d.ready]
            if lines:
                line = lines[op[1] % len(lines)]
                taken += [queue.take(line)] if kind == "take" else queue.take_all(line)
        elif kind == "outcome" and taken:
            job = taken.pop(op[1] % len(taken))
            queue.settle(job)
            if op[2] == "defer":
                job.rcpts = job.rcpts[:1]  # as the engine does: only the deferred ones go back
                queue.defer(job)
        elif kind == "retry_now":
            if op[1] == "all":
                queue.retry_now()
            else:
                queue.retry_destination(op[1])
        elif kind == "tick":
            clock.now += op[1]
            queue.release_due()
        assert queue.by_domain() == queue.walk_by_domain(), op
    # Everything delivered: no domain is left behind with zero rows.
    for job in taken:
        queue.settle(job)
    queue.retry_now()
    for destination in list(queue.destinations.values()):
        for job in queue.take_all(destination):
            queue.settle(job)
    assert queue.by_domain() == queue.walk_by_domain() == {}


def test_a_settled_job_counts_what_it_was_taken_with() -> None:
    # The engine narrows a job's recipients before settling it: the in-flight count must drop
    # by what was added at the take, or a domain would keep phantom mail in flight.
    queue = MailQueue(
        RetryConfig(), next_hop=lambda d: d, wall_clock=Clock(), on_ready=lambda d: None
    )
    queue.add(message(1, [0, 0, 0], {}))
    job = queue.take(queue.destinations["a.test"])
    assert queue.by_domain() == {"a.test": {"ready": 0, "deferred": 0, "in_flight": 3}}
    job.rcpts = job.rcpts[:1]
    queue.settle(job)
    queue.defer(job)
    assert queue.by_domain() == {"a.test": {"ready": 0, "deferred": 1, "in_flight": 0}}


def test_a_deep_queue_holds_each_domain_and_single_index_once() -> None:
    # Recovery builds a million jobs: each must not carry its own copy of its domain's name
    # or of its one-recipient index tuple (bench/recovery.py measures bytes per message).
    queue = MailQueue(
        RetryConfig(), next_hop=lambda d: d, wall_clock=Clock(), on_ready=lambda d: None
    )
    for serial in range(2):
        # Two recipients in two domains: the general path, which groups by domain.
        queue.add(message(serial, [0, 1], {}))
    line = queue.destinations["b.test"]
    first, second = queue.take(line), queue.take(line)
    assert first.domain is second.domain
    assert first.rcpts is second.rcpts == (1,)


def test_an_untried_message_waits_as_itself_and_is_split_when_taken() -> None:
    # A deep queue costs a line entry per untried message and destination, not a Job per
    # recipient domain (issue 21): a message to a.test, mx.test (one smarthost) and b.test
    # waits once in each of the two lines, and the smarthost's line yields its two jobs.
    queue = MailQueue(
        RetryConfig(), next_hop=smarthost, wall_clock=Clock(), on_ready=lambda d: None
    )
    queued = message(1, [0, 3, 1, 0], {})
    queue.add(queued)
    routed, direct = queue.destinations["[relay.test]"], queue.destinations["b.test"]
    assert list(routed.ready) == [queued] and list(direct.ready) == [queued]
    assert queue.by_domain()["a.test"] == {"ready": 2, "deferred": 0, "in_flight": 0}
    first = queue.take(routed)
    assert (first.domain, first.rcpts) == ("a.test", (0, 3))
    [rest] = routed.ready
    assert isinstance(rest, Job) and (rest.domain, rest.rcpts) == ("mx.test", (1,))
    assert queue.by_domain()["a.test"] == {"ready": 0, "deferred": 0, "in_flight": 2}
    assert queue.by_domain()["mx.test"] == {"ready": 1, "deferred": 0, "in_flight": 0}
    [job] = queue.take_all(direct)
    assert (job.domain, job.rcpts) == ("b.test", (2,))
