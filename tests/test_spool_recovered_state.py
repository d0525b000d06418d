"""Recovery gives back what was written, field by field, and the queue it builds is the one
``MailQueue.add`` would have built message by message.

Recovery at depth (issue 21) keeps each Enqueue record's bytes as read instead of encoding the
record again, finds the recipients' domains as it reads the journal and hands them to the queue
(``SpoolState.take_queue``, ``MailQueue.add_all``): these tests hold every one of those short
cuts to the slow path, on a spool with every kind of record (Enqueue, Done and Defer in a
checkpoint and in the journal after it, and the checkpoint's CheckpointEnd).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from hamta.config import RetryConfig
from hamta.queue import Job, MailQueue, recipient_domain
from hamta.spool import LiveMessage, Spool, load_state
from hamta.spool_format import CheckpointEnd, Defer, Done, Enqueue, scan_frames


def body(n: int) -> bytes:
    return f"Subject: message {n}\r\n\r\n".encode() + b"x" * 300 + b"\r\n"


@dataclass
class Written:
    """What the test wrote for one message, kept apart from the spool's own bookkeeping."""

    rec: Enqueue
    finished: set[int] = field(default_factory=set)
    retry: dict[int, tuple[int, float]] = field(default_factory=dict)

    def done(self, rcpts: list[int]) -> None:
        self.finished.update(rcpts)
        for index in rcpts:
            self.retry.pop(index, None)

    def deferred(self, rcpts: list[int], attempts: int, when: float) -> None:
        for index in rcpts:
            if index not in self.finished:
                self.retry[index] = (attempts, when)

    @property
    def live(self) -> bool:
        return len(self.finished) < len(self.rec.recipients)


# Recipients of the messages appended in turn: one, several in one domain (written in
# different cases, one with the root's trailing dot), several domains, an address literal.
RECIPIENTS = [
    ["one@a.test"],
    ["x@B.Test", "y@b.test.", "z@c.test"],
    ["p@c.test", "q@d.test"],
    ["lit@[192.0.2.7]", "u@a.test", "v@e.test", "w@A.TEST"],
]


async def append(spool: Spool, written: dict[str, Written], n: int) -> LiveMessage:
    message = await spool.append(
        body(n),
        f"sender{n}@origin.test",
        RECIPIENTS[n % len(RECIPIENTS)],
        message_id=f"<{n}@origin.test>" if n % 3 else "",
        client=f"client{n}.example [192.0.2.{n}]" if n % 2 else "",
        is_dsn=n % 5 == 4,
    )
    written[message.qid] = Written(message.rec)
    return message


def mark_done(
    spool: Spool, written: dict[str, Written], message: LiveMessage, rcpts: list[int]
) -> None:
    spool.mark_done(message, rcpts)
    written[message.qid].done(rcpts)


def mark_deferred(
    spool: Spool, written: dict[str, Written], message: LiveMessage, rcpts: list[int], n: int
) -> None:
    when = 1_800_000_000.0 + n + 0.25  # far ahead: the queue keeps these deferred
    spool.mark_deferred(message, rcpts, n, when)
    written[message.qid].deferred(rcpts, n, when)


def write_spool(path: Path, segment_size: int = 64 * 1024 * 1024) -> dict[str, Written]:
    """A checkpoint (the first run's state, folded by the second run's recovery) and a journal
    after it (the second run's messages, and Done and Defer for both runs' messages)."""
    written: dict[str, Written] = {}

    async def first() -> None:
        spool = Spool(path, segment_size=segment_size)
        spool.open()
        await spool.recover()
        messages = [await append(spool, written, n) for n in range(12)]
        mark_done(spool, written, messages[1], [0])  # half done
        mark_done(spool, written, messages[2], [0, 1])  # finished
        mark_deferred(spool, written, messages[3], [0, 2], 2)
        mark_deferred(spool, written, messages[5], [1], 3)
        mark_done(spool, written, messages[5], [0])  # done and deferred
        mark_deferred(spool, written, messages[7], [0, 1, 2, 3], 1)
        mark_done(spool, written, messages[7], [1])  # its deferral of 1 goes with it
        await spool.close()

    async def second() -> None:
        folded = asyncio.Event()
        spool = Spool(path, segment_size=segment_size, on_checkpoint=lambda _: folded.set())
        spool.open()
        await spool.recover()
        await folded.wait()  # the first run's journal is now a checkpoint
        checkpointed = list(written)  # the first run's messages: number 2 is finished
        messages = [await append(spool, written, n) for n in range(12, 24)]
        mark_done(spool, written, messages[0], [0])  # finished in the journal
        mark_done(spool, written, messages[1], [2])
        mark_deferred(spool, written, messages[3], [1, 2, 3], 4)
        mark_done(spool, written, spool.live[checkpointed[0]], [0])  # finished in the journal
        mark_deferred(spool, written, spool.live[checkpointed[1]], [1, 2], 5)  # deferred again
        mark_done(spool, written, spool.live[checkpointed[3]], [2])
        await spool.close()

    asyncio.run(first())
    asyncio.run(second())
    return written


def test_the_recovered_state_is_what_was_written_field_by_field(tmp_path: Path) -> None:
    written = write_spool(tmp_path)
    journal = tmp_path / "journal"
    (checkpoint,) = journal.glob("*.ckpt")
    (after,) = journal.glob("*.jnl")
    assert int(after.stem) > int(checkpoint.stem)
    for path, kinds in (
        (checkpoint, {Enqueue, Done, Defer, CheckpointEnd}),
        (after, {Enqueue, Done, Defer}),
    ):
        scan = scan_frames(path.read_bytes())
        assert {type(rec) for _, records in scan.frames for rec in records} == kinds, path

    state = load_state(tmp_path, recipient_key=recipient_domain)
    expected = {qid: w for qid, w in written.items() if w.live}
    assert list(state.live) == [qid for qid in written if written[qid].live]
    for qid, w in expected.items():
        message = state.live[qid]
        assert message.qid == qid
        # The envelope: the very bytes the journal holds, and every field of the record.
        assert message.envelope == msgspec.msgpack.encode(w.rec)
        rec = message.rec
        for name in Enqueue.__struct_fields__:
            assert getattr(rec, name) == getattr(w.rec, name), (qid, name)
        assert message.segment == w.rec.segment
        assert message.recipient_count == len(w.rec.recipients)
        assert message.finished == sorted(w.finished)
        assert message.pending == sorted(set(range(len(w.rec.recipients))) - w.finished)
        assert message.retry == (w.retry or None)
    assert state.stats.messages == len(expected)
    assert state.stats.recipients == sum(
        len(w.rec.recipients) - len(w.finished) for w in expected.values()
    )
    assert state.stats.journal_files == 2 and not state.damage

    # What the queue is built from: every live message in the table's order (and those
    # finished since, which it passes over), with each recipient's domain.
    order, domains = state.take_queue()
    assert [m for m in order if m.left] == list(state.live.values())
    assert domains == [recipient_domain(a) for m in order for a in m.rec.recipients]
    assert state.take_queue() == ([], [])  # handed over once


def queue_of(messages: list[LiveMessage], domains: list[str] | None) -> MailQueue:
    queue = MailQueue(RetryConfig(), lambda domain: domain, time.time, lambda _: None)
    if domains is None:
        for message in messages:
            queue.add(message)
    else:
        queue.add_all(messages, domains)
    return queue


def lines(queue: MailQueue) -> dict[str, list[object]]:
    """Each destination's line and the deferred jobs, entries by identity and content."""

    def entry(item: Job | LiveMessage) -> object:
        if isinstance(item, Job):
            return ("job", id(item.message), item.domain, item.rcpts, item.attempts, item.due)
        return ("message", id(item))

    seen = {key: [entry(item) for item in d.ready] for key, d in queue.destinations.items()}
    seen["(deferred)"] = [entry(job) for _, _, job in sorted(queue._deferred)]
    return seen


def test_the_recovered_queue_is_the_one_add_builds(tmp_path: Path) -> None:
    write_spool(tmp_path)

    async def recovered() -> None:
        # As a relay recovers: the spool given the queue's keys, then the queue built at once.
        spool = Spool(tmp_path, recipient_key=recipient_domain)
        spool.open()
        state = await spool.recover()
        live = list(state.live.values())
        at_once = queue_of(*state.take_queue())
        one_by_one = queue_of(live, None)
        assert lines(at_once) == lines(one_by_one)
        assert at_once.by_domain() == one_by_one.by_domain() == at_once.walk_by_domain()
        assert at_once.ready_count > 0 and at_once.deferred_count > 0
        await spool.close()

    asyncio.run(recovered())
    # An offline reader asks for no keys, and there is then nothing to build a queue from.
    with pytest.raises(ValueError, match="recipient_key"):
        load_state(tmp_path).take_queue()


def test_messages_lost_with_their_segment_are_not_queued(tmp_path: Path) -> None:
    written = write_spool(tmp_path, segment_size=2048)  # a few messages a segment
    segments = sorted((tmp_path / "data").glob("*.seg"))
    assert len(segments) > 4
    segments[2].unlink()  # as a disk would lose it: recovery names its messages lost
    state = load_state(tmp_path, recipient_key=recipient_domain)
    assert state.damage.lost and state.stats.missing_segments
    assert all(written[qid].rec.segment == int(segments[2].stem) for qid in state.damage.lost)
    order, keys = state.take_queue()
    assert [m for m in order if m.left] == list(state.live.values())
    assert not set(state.damage.lost) & {m.qid for m in order}
    assert keys == [recipient_domain(a) for m in order for a in m.rec.recipients]
