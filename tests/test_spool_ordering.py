"""The group commit's order of writes and syncs, seen from the syscalls the spool makes.

A model of what a crash would keep: a file's bytes are durable up to its length at its last
fdatasync. Every acknowledged message (an ``append`` that returned) must have its body durable
before the journal frame naming it is written, and that frame durable before the ack.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from hamta.spool import LiveMessage, Spool


@dataclass(frozen=True)
class Call:
    """One write or fdatasync the spool made: on which file, the file's length after it."""

    kind: str  # "write", "sync", or "dsync" (a write durable when it returns: both at once)
    path: str
    length: int
    data: bytes
    thread: int


class Recorder:
    """Wraps ``os.write``, ``os.pwritev``, ``os.fdatasync`` and ``os.fstat``: the spool's calls,
    in order."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = str(root)
        self.calls: list[Call] = []
        self.acks: list[tuple[int, LiveMessage]] = []  # (calls made before the ack, message)
        self.fstats: list[int] = []  # threads that asked the length of a spool file
        write, pwritev, fdatasync, fstat = os.write, os.pwritev, os.fdatasync, os.fstat

        def recorded(kind: str, fd: int, data: bytes) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if path.startswith(self.root):
                length = fstat(fd).st_size
                self.calls.append(Call(kind, path, length, data, threading.get_ident()))

        def spy_write(fd: int, data: bytes) -> int:
            written = write(fd, data)
            recorded("write", fd, bytes(data[:written]))
            return written

        def spy_pwritev(fd: int, buffers: list[bytes], offset: int, flags: int = 0) -> int:
            written = pwritev(fd, buffers, offset, flags)
            data = b"".join(bytes(b) for b in buffers)[:written]
            recorded("dsync" if flags & os.RWF_DSYNC else "write", fd, data)
            return written

        def spy_sync(fd: int) -> None:
            fdatasync(fd)
            recorded("sync", fd, b"")

        def spy_fstat(fd: int) -> os.stat_result:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(self.root):
                self.fstats.append(threading.get_ident())
            return fstat(fd)

        monkeypatch.setattr(os, "write", spy_write)
        monkeypatch.setattr(os, "pwritev", spy_pwritev)
        monkeypatch.setattr(os, "fdatasync", spy_sync)
        monkeypatch.setattr(os, "fstat", spy_fstat)

    def synced(self, path: str, before: int) -> int:
        """How much of ``path`` the calls before index ``before`` made durable."""
        lengths = [c.length for c in self.calls[:before] if c.kind != "write" and c.path == path]
        return max(lengths, default=0)


def body(n: int) -> bytes:
    return f"Subject: {n}\r\n\r\n".encode() + b"x" * 2000 + b"\r\n"


def load(spool: Spool, recorder: Recorder) -> None:
    """Groups of concurrent appends, with deliveries' Done records in between."""

    async def one(n: int) -> None:
        message = await spool.append(body(n), "a@a.test", ["b@b.test"])
        recorder.acks.append((len(recorder.calls), message))
        if n % 3 == 0:
            spool.mark_done(message, [0])

    async def scenario() -> None:
        spool.open()
        await spool.recover()
        for group in range(0, 120, 12):
            await asyncio.gather(*(one(n) for n in range(group, group + 12)))
        await spool.close()

    asyncio.run(scenario())


def test_no_acknowledgement_moves_ahead_of_its_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # segment_size small enough that the load rolls over to new segments a few times
    spool = Spool(tmp_path / "spool", segment_size=64 * 1024)
    recorder = Recorder(tmp_path / "spool", monkeypatch)
    load(spool, recorder)
    assert len(recorder.acks) == 120
    assert len({c.path for c in recorder.calls if c.path.endswith(".seg")}) > 3
    for acked_at, message in recorder.acks:
        rec = message.rec
        segment = f"{tmp_path}/spool/data/{rec.segment:08d}.seg"
        frames = [
            i
            for i, c in enumerate(recorder.calls)
            if c.kind != "sync" and c.path.endswith(".jnl") and rec.qid.encode() in c.data
        ]
        assert frames, f"{rec.qid}: acknowledged, never written to a journal"
        frame = frames[0]
        journal = recorder.calls[frame]
        # The body was durable before the frame naming it was written ...
        assert recorder.synced(segment, frame) >= rec.offset + rec.length, rec.qid
        # ... and the frame was durable before the acknowledgement (a dsync write is
        # durable when it returns, so the frame's own call counts).
        assert frame < acked_at, rec.qid
        assert recorder.synced(journal.path, acked_at) >= journal.length, rec.qid


def test_the_io_thread_only_syncs_and_writes_the_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each syscall of the I/O thread hands the GIL to and fro with the event loop: the bodies
    # go to the page cache from the loop's thread, the lengths for a rollback are known
    # without asking the file, and the I/O thread is left the bodies' fdatasync and the
    # frame's write made durable by that write itself (RWF_DSYNC): two syscalls a commit.
    spool = Spool(tmp_path / "spool")
    recorder = Recorder(tmp_path / "spool", monkeypatch)
    loop_thread = threading.get_ident()  # asyncio.run runs the loop in this thread
    load(spool, recorder)
    body_writes = [c for c in recorder.calls if c.kind == "write" and c.path.endswith(".seg")]
    assert body_writes and {c.thread for c in body_writes} == {loop_thread}
    io_calls = [c for c in recorder.calls if c.thread != loop_thread]
    assert {(c.kind, c.path[-4:]) for c in io_calls} == {("sync", ".seg"), ("dsync", ".jnl")}
    # One fstat when the journal is opened, none per commit.
    assert len(recorder.fstats) <= 1
