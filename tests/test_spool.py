"""The spool on a real file system: durability, recovery, checkpoints, locking, a full disk."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from hamta import spool as spool_module
from hamta.durable_files import SyncedWriter
from hamta.spool import Damage, Spool, SpoolError, SpoolFullError, load_state
from hamta.spool_format import FRAME_MAGIC, Enqueue

T = TypeVar("T")


def run(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine in a fresh event loop (the spool's writer task lives in it)."""

    async def main() -> T:
        return await factory()

    return asyncio.run(main())


def body(n: int, size: int = 2048) -> bytes:
    line = f"Subject: message {n}\r\n\r\n".encode()
    return line + b"x" * (size - len(line) - 2) + b"\r\n"


def test_appended_messages_survive_a_restart_with_their_state(tmp_path: Path) -> None:
    async def first() -> list[str]:
        spool = Spool(tmp_path)
        spool.open()
        await spool.recover()
        qids = []
        for n in range(10):
            message = await spool.append(body(n), f"s{n}@a.test", [f"r{n}@b.test", f"q{n}@c.test"])
            qids.append(message.rec.qid)
        spool.mark_done(spool.live[qids[0]], [0, 1])  # finished
        spool.mark_done(spool.live[qids[1]], [0])  # half finished
        spool.mark_deferred(spool.live[qids[2]], [1], attempts=3, next_attempt=1234.5)
        await spool.close()
        return qids

    qids = run(first)

    async def second() -> None:
        spool = Spool(tmp_path)
        spool.open()
        state = await spool.recover()
        assert state.stats.messages == 9
        assert qids[0] not in spool.live
        assert spool.live[qids[1]].pending == [1]
        assert spool.live[qids[2]].retry == {1: (3, 1234.5)}
        for n, qid in enumerate(qids[1:], start=1):
            rec = spool.live[qid].rec
            assert rec.sender == f"s{n}@a.test"
            assert await spool.read_body(rec) == body(n)
        await spool.close()

    run(second)


def test_concurrent_appends_share_fsyncs(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int]:
        spool = Spool(tmp_path)
        spool.open()
        await spool.recover()
        before = spool.fsyncs
        await asyncio.gather(*(spool.append(body(n), "a@a.test", ["b@b.test"]) for n in range(200)))
        used = spool.fsyncs - before
        await spool.close()
        return used, 200

    fsyncs, messages = run(scenario)
    # Two fsyncs (segment, journal) per group commit; 200 concurrent appends need far fewer
    # commits than messages.
    assert fsyncs < messages / 2, fsyncs


def test_a_torn_last_frame_is_cut_off_and_the_rest_recovered(tmp_path: Path) -> None:
    async def fill() -> None:
        spool = Spool(tmp_path)
        spool.open()
        await spool.recover()
        for n in range(5):
            await spool.append(body(n), "a@a.test", ["b@b.test"])
        await spool.close()

    run(fill)
    journal = max((tmp_path / "journal").glob("*.jnl"))
    good_size = journal.stat().st_size
    with open(journal, "ab") as handle:  # a crash in the middle of writing a frame
        handle.write(FRAME_MAGIC + b"\x40\x00\x00\x00\x12\x34\x56\x78partial")

    offline = load_state(tmp_path)
    assert offline.stats.messages == 5
    assert offline.stats.torn_frames == 1
    assert journal.stat().st_size > good_size, "an offline reader must not repair the spool"

    async def reopen() -> int:
        spool = Spool(tmp_path)
        spool.open()
        state = await spool.recover()
        assert state.stats.torn_frames == 1
        await spool.close()
        return len(spool.live)

    assert run(reopen) == 5


def test_finished_segments_are_deleted_and_checkpoints_fold_journals(tmp_path: Path) -> None:
    async def scenario() -> None:
        spool = Spool(tmp_path, segment_size=16 * 1024, journal_size=2 * 1024)
        spool.open()
        await spool.recover()
        messages = [await spool.append(body(n), "a@a.test", ["b@b.test"]) for n in range(40)]
        segments = sorted((tmp_path / "data").glob("*.seg"))
        assert len(segments) >= 4
        for message in messages[:30]:
            spool.mark_done(message, [0])
        await spool.sync()
        await spool.sync()  # deletions follow the commit that made the Done records durable
        left = {m.rec.segment for m in messages[30:]}
        on_disk = {int(p.stem) for p in (tmp_path / "data").glob("*.seg")}
        assert on_disk <= left | {spool.active_segment}, (on_disk, left)
        # Enough journal was written to trigger checkpoints; close waits for the last.
        await spool.append(body(99), "a@a.test", ["b@b.test"])
        await spool.close()

    run(scenario)
    assert list((tmp_path / "journal").glob("*.ckpt"))
    state = load_state(tmp_path)
    assert state.stats.messages == 11
    # Recovery read one checkpoint and only the journals after it.
    assert state.stats.journal_files <= 3


def test_a_checkpoint_is_written_as_it_is_encoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint of a deep queue is 115 MiB for a million messages: it goes to its file a
    # few megabytes at a time, never held whole (issue 21). Here a frame of 3 messages at a
    # time, each written at once; the folded state reads back the same.
    writes: list[int] = []
    write = SyncedWriter.write

    def counted(writer: SyncedWriter, chunks: list[bytes]) -> None:
        writes.append(len(chunks))
        write(writer, chunks)

    monkeypatch.setattr(spool_module, "_CHECKPOINT_CHUNK", 3)
    monkeypatch.setattr(spool_module, "_CHECKPOINT_WRITE", 1)
    monkeypatch.setattr(SyncedWriter, "write", counted)

    async def fill() -> None:
        spool = Spool(tmp_path)
        spool.open()
        await spool.recover()
        messages = [
            await spool.append(body(n), "a@a.test", ["b@b.test", f"c{n}@c.test"]) for n in range(10)
        ]
        spool.mark_done(messages[1], [0])
        spool.mark_deferred(messages[2], [0, 1], 3, 1234.5)
        await spool.close()

    async def fold() -> None:
        spool = Spool(tmp_path)
        spool.open()
        await spool.recover()  # folds the journal into a checkpoint, closed after
        await spool.close()

    run(fill)
    before = load_state(tmp_path)
    writes.clear()  # the spool's VERSION file, written whole
    run(fold)
    assert writes == [1, 1, 1, 1, 1]  # four frames of messages, then the CheckpointEnd
    after = load_state(tmp_path)
    assert after.stats.journal_files == 1 and after.damage == Damage()
    assert {q: (m.rec, m.pending, m.retry) for q, m in after.live.items()} == {
        q: (m.rec, m.pending, m.retry) for q, m in before.live.items()
    }


def test_recovery_reads_no_body(tmp_path: Path) -> None:
    async def fill() -> None:
        spool = Spool(tmp_path)
        spool.open()
        await spool.recover()
        for n in range(20):
            await spool.append(body(n), "a@a.test", ["b@b.test"])
        await spool.close()

    run(fill)
    # Corrupt every segment: recovery must still succeed, since it never reads a body.
    for segment in (tmp_path / "data").glob("*.seg"):
        with open(segment, "r+b") as handle:
            handle.seek(256)  # within the first body, past its envelope
            handle.write(b"\xff" * 64)
    state = load_state(tmp_path)
    assert state.stats.messages == 20

    async def read_back() -> None:
        spool = Spool(tmp_path)
        spool.open()
        await spool.recover()
        first = min(spool.live.values(), key=lambda m: m.rec.offset)
        with pytest.raises(SpoolError, match="checksum"):
            await spool.read_body(first.rec)
        await spool.close()

    run(read_back)


def test_a_spool_is_held_by_one_relay_at_a_time(tmp_path: Path) -> None:
    async def scenario() -> None:
        holder = Spool(tmp_path)
        holder.open()
        with pytest.raises(SpoolError, match=f"in use by pid {os.getpid()}"):
            Spool(tmp_path).open()
        await holder.close()
        again = Spool(tmp_path)
        again.open()
        await again.close()

    run(scenario)


def test_unknown_spool_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "VERSION").write_text("something else 9\n")

    async def scenario() -> None:
        with pytest.raises(SpoolError, match="unknown spool format"):
            Spool(tmp_path).open()

    run(scenario)


@pytest.mark.root
def test_nearly_full_disk_refuses_new_mail_and_empties_itself(small_fs: Path) -> None:
    async def scenario() -> tuple[int, int]:
        spool = Spool(small_fs / "spool", segment_size=128 * 1024, min_free=384 * 1024)
        spool.open()
        await spool.recover()
        accepted = []
        refused = 0
        for n in range(2000):  # 2000 x 2 KiB cannot fit in 2 MiB
            try:
                accepted.append(await spool.append(body(n), "a@a.test", ["b@b.test"]))
            except SpoolFullError:
                refused += 1
                break
        assert refused, "the file system never filled up"
        # Delivering mail frees whole segments, and then the spool accepts again.
        for message in accepted[: len(accepted) // 2]:
            spool.mark_done(message, [0])
        await spool.sync()
        await spool.sync()
        again = await spool.append(body(5000), "a@a.test", ["b@b.test"])
        assert again.rec.qid in spool.live
        live = len(spool.live)
        await spool.close()
        return live, len(accepted)

    live, accepted = run(scenario)
    state = load_state(small_fs / "spool")
    assert state.stats.messages == live == accepted - accepted // 2 + 1


@pytest.mark.root
def test_enospc_fails_the_commit_and_keeps_every_acknowledged_message(small_fs: Path) -> None:
    async def scenario() -> list[str]:
        spool = Spool(small_fs / "spool", segment_size=128 * 1024, min_free=0)
        spool.open()
        await spool.recover()
        acknowledged: list[str] = []
        failures = 0
        for n in range(0, 2000, 10):  # groups of ten share a commit
            results = await asyncio.gather(
                *(spool.append(body(n + i), "a@a.test", ["b@b.test"]) for i in range(10)),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, SpoolFullError):
                    failures += 1
                else:
                    assert not isinstance(result, BaseException), result
                    acknowledged.append(result.rec.qid)
            if failures:
                break
        assert failures, "the file system never filled up"
        await spool.close()
        return acknowledged

    acknowledged = run(scenario)
    state = load_state(small_fs / "spool")
    assert set(state.live) == set(acknowledged)
    for message in state.live.values():
        segment = small_fs / "spool" / "data" / f"{message.rec.segment:08d}.seg"
        with open(segment, "rb") as handle:
            handle.seek(message.rec.offset)
            assert zlib.crc32(handle.read(message.rec.length)) == message.rec.crc


def test_an_envelope_that_cannot_be_encoded_fails_its_append_alone(tmp_path: Path) -> None:
    # aiosmtpd hands over non-UTF-8 address bytes as lone surrogates ("j\udce9" for j\xe9),
    # which msgpack cannot encode: once that killed the group-commit task, and every later
    # append waited forever.
    async def main() -> None:
        spool = Spool(tmp_path)
        spool.open()
        await spool.recover()
        results = await asyncio.wait_for(
            asyncio.gather(
                spool.append(body(1), "a@x.test", ["r@y.test"]),
                spool.append(body(2), "j\udce9@x.test", ["r@y.test"]),
                spool.append(body(3), "b@x.test", ["r\udc85@y.test"]),
                spool.append(body(4), "c@x.test", ["r@y.test"]),
                return_exceptions=True,
            ),
            timeout=10,
        )
        assert not isinstance(results[0], BaseException)
        assert not isinstance(results[3], BaseException)
        for failed in results[1:3]:
            assert isinstance(failed, SpoolError), failed
            assert "cannot be encoded" in str(failed)
        later = await asyncio.wait_for(spool.append(body(5), "d@x.test", ["r@y.test"]), 10)
        assert len(spool.live) == 3
        await asyncio.wait_for(spool.close(), 10)
        state = load_state(tmp_path)
        assert sorted(state.live) == sorted([results[0].rec.qid, results[3].rec.qid, later.rec.qid])
        for message in state.live.values():  # the good bodies lie where their records say
            rec = message.rec
            data = (tmp_path / "data" / f"{rec.segment:08d}.seg").read_bytes()
            assert zlib.crc32(data[rec.offset : rec.offset + rec.length]) == rec.crc

    run(main)


def test_a_recovered_message_holds_its_envelope_as_bytes_and_little_else(tmp_path: Path) -> None:
    # A deep queue must fit in memory (issue 21): per message, the live state holds its queue
    # id, its Enqueue record's msgpack bytes and a few numbers, not the envelope as Python
    # objects (about 600 bytes for two recipients); the record decodes back unchanged.
    count = 2000

    async def fill() -> list[Enqueue]:
        spool = Spool(tmp_path)
        spool.open()
        await spool.recover()
        messages = await asyncio.gather(
            *(
                spool.append(
                    body(n),
                    "news@a.test",
                    [f"first{n}@b{n % 50}.test", f"second{n}@c{n % 70}.test"],
                    message_id=f"<{n}@a.test>",
                    client="app1.example [192.0.2.1]",
                )
                for n in range(count)
            )
        )
        spool.mark_done(messages[0], [1])
        await spool.close()
        return [message.rec for message in messages]

    records = run(fill)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        state = load_state(tmp_path)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(state.live) == count
    assert [state.live[rec.qid].rec for rec in records] == records
    assert state.live[records[0].qid].pending == [0] and state.stats.recipients == 2 * count - 1
    assert held / count < 450, f"{held / count:.0f} bytes per queued message"
