"""Damaged spool storage costs at most the damaged message, and never silently.

A small spool (a checkpoint and a journal holding ten live messages) is damaged one byte at a
time, and cut at every frame boundary; each time a fresh copy is recovered with the Spool
class and every message whose own bytes are intact must come back, with its body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import smtplib
import stat
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from hamta.spool import Spool, SpoolState, load_state
from hamta.spool_format import Enqueue, scan_frames
from hamta.suppression import SuppressionStore
from tests.conftest import RelayFactory
from tests.support import RecordingSink


def body(n: int) -> bytes:
    return f"Subject: message {n}\r\n\r\n".encode() + f"body {n} ".encode() * 20 + b"\r\n"


@dataclass(frozen=True)
class Built:
    """The spool as written: which messages are live, and every body ever appended."""

    live: frozenset[str]
    bodies: dict[str, bytes]


async def _wait_checkpoint(spool: Spool) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while spool._checkpointing:  # the test waits for the background checkpoint
        assert asyncio.get_running_loop().time() < deadline, "checkpoint did not finish"
        await asyncio.sleep(0.01)


def build(path: Path) -> Built:
    """Seven messages then a checkpoint of six of them; five more, a Done and a Defer after."""
    bodies: dict[str, bytes] = {}

    async def scenario() -> frozenset[str]:
        spool = Spool(path)
        spool.open()
        await spool.recover()
        first = []
        for n in range(7):  # one frame each
            message = await spool.append(body(n), f"s{n}@a.test", [f"r{n}@sink.test"])
            first.append(message)
            bodies[message.rec.qid] = body(n)
        spool.mark_done(first[0], [0])
        await spool.close()

        spool = Spool(path)
        spool.open()
        await spool.recover()  # folds run one's journal into a checkpoint
        await _wait_checkpoint(spool)
        appended = await asyncio.gather(
            *(spool.append(body(n), f"s{n}@a.test", [f"r{n}@sink.test"]) for n in (7, 8))
        )
        for n in (9, 10, 11):
            appended.append(await spool.append(body(n), f"s{n}@a.test", [f"r{n}@sink.test"]))
        for n, message in zip((7, 8, 9, 10, 11), appended, strict=True):
            bodies[message.rec.qid] = body(n)
        spool.mark_done(spool.live[first[1].rec.qid], [0])
        spool.mark_deferred(spool.live[appended[2].rec.qid], [0], 2, 1234.0)
        live = frozenset(spool.live)
        await spool.close()
        return live

    live = asyncio.run(scenario())
    assert len(live) == 10
    assert len(list((path / "journal").glob("*.ckpt"))) == 1
    return Built(live, bodies)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Built]:
    path = tmp_path_factory.mktemp("damage") / "spool"
    return path, build(path)


def damaged_copies(original: Path, work: Path) -> list[tuple[str, Path, bytes]]:
    """Every one-byte flip and every cut at a frame boundary of the checkpoint and journal."""
    cases = []
    for name in ("ckpt", "jnl"):
        (source,) = (original / "journal").glob(f"*.{name}")
        data = source.read_bytes()
        for index in range(len(data)):
            flipped = bytearray(data)
            flipped[index] ^= 0x5A
            cases.append((f"{source.name} byte {index}", source, bytes(flipped)))
        scan = scan_frames(data)
        assert not scan.damaged and not scan.torn
        for offset, _ in scan.frames:
            cases.append((f"{source.name} cut at {offset}", source, data[:offset]))
    return cases


async def recover_copy(
    original: Path, work: Path, file: Path, data: bytes
) -> tuple[SpoolState, dict[str, bytes]]:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(original, work)
    (work / file.relative_to(original)).write_bytes(data)
    spool = Spool(work)
    spool.open()
    state = await spool.recover()
    bodies = {qid: await spool.read_body(m.rec) for qid, m in spool.live.items()}
    await spool.close()
    return state, bodies


def test_every_flipped_byte_and_every_cut_costs_no_message(
    built: tuple[Path, Built], tmp_path: Path
) -> None:
    original, spool = built
    cases = damaged_copies(original, tmp_path)
    assert len(cases) > 800

    async def scenario() -> list[str]:
        failures = []
        for label, file, data in cases:
            state, bodies = await recover_copy(original, tmp_path / "work", file, data)
            missing = spool.live - set(bodies)
            strangers = set(bodies) - set(spool.bodies)
            wrong = [q for q, b in bodies.items() if spool.bodies.get(q) != b]
            silent = not state.damage and not state.stats.torn_frames
            if "byte" in label and silent:
                failures.append(f"{label}: damage not reported")
            if missing or strangers or wrong:
                failures.append(f"{label}: missing {missing} strangers {strangers} wrong {wrong}")
        return failures

    failures = asyncio.run(scenario())
    assert not failures, f"{len(failures)} of {len(cases)}: {failures[:5]}"


def test_a_lost_frame_and_a_damaged_body_cost_that_message_alone(
    built: tuple[Path, Built], tmp_path: Path
) -> None:
    """Damage in the journal and in the body of a message it named: that message is lost,
    by name, and the others of the frame come back from their segment."""
    original, spool = built
    work = tmp_path / "spool"
    shutil.copytree(original, work)
    (journal,) = (work / "journal").glob("*.jnl")
    data = journal.read_bytes()
    first = scan_frames(data).frames[0]
    named = [r.qid for r in first[1] if isinstance(r, Enqueue)]
    assert len(named) == 2
    victim = next(m for q, m in load_state(work).live.items() if q == named[0])
    damaged = data[: first[0] + 20] + b"\xff" + data[first[0] + 21 :]
    journal.write_bytes(damaged)
    segment = work / "data" / f"{victim.rec.segment:08d}.seg"
    with open(segment, "r+b") as handle:
        handle.seek(victim.rec.offset + 5)
        handle.write(b"#")
    (work / "data" / "00000099.seg").write_bytes(b"")  # unreferenced: kept while damaged

    async def recover() -> SpoolState:
        relay_spool = Spool(work)
        relay_spool.open()
        state = await relay_spool.recover()
        await relay_spool.close()
        return state

    state = asyncio.run(recover())
    assert state.damage.lost == (named[0],)
    assert state.damage.rebuilt == (named[1],)
    assert set(state.live) == spool.live - {named[0]}
    assert state.damage.files == (f"journal/{journal.name}", f"data/{segment.name}")
    assert (work / "data" / "00000099.seg").exists()
    kept = state.damage.kept
    assert [(work / k).read_bytes() for k in kept] == [damaged, segment.read_bytes()]

    # Once recovery is clean again (the damaged journal is folded into a checkpoint and gone),
    # the unreferenced segment goes.
    assert not asyncio.run(recover()).damage
    assert not (work / "data" / "00000099.seg").exists()
    assert all((work / k).exists() for k in kept), "the operator's copies stay"


def test_spool_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "spool"
        build(path)
        asyncio.run(_recover_and_close(path))  # another checkpoint, written under umask 022
        store = SuppressionStore.in_spool(path)
        store.add("x@sink.test", "manual", "test")
        files = [p for p in path.rglob("*") if p.is_file() and p.name != "lock"]
        loose = {str(p.relative_to(path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
        store.close()
    finally:
        os.umask(old)
    assert {p.suffix for p in files} >= {".seg", ".jnl", ".ckpt", ".sqlite", ".sqlite-wal"}
    assert {k: v for k, v in loose.items() if v != "0o600"} == {}


async def _recover_and_close(path: Path) -> None:
    spool = Spool(path)
    spool.open()
    await spool.recover()
    await _wait_checkpoint(spool)
    await spool.append(body(1), "a@a.test", ["b@sink.test"])
    await spool.close()


@pytest.mark.root
def test_a_failed_checkpoint_is_reported_and_cleared_by_the_next_success(small_fs: Path) -> None:
    path = small_fs / "spool"

    async def fill() -> None:
        spool = Spool(path)
        spool.open()
        await spool.recover()
        await _wait_checkpoint(spool)
        for n in range(3):
            await spool.append(body(n), "a@a.test", ["b@sink.test"])
        await spool.close()

    asyncio.run(fill())
    filler = small_fs / "filler"
    with open(filler, "wb") as handle, contextlib.suppress(OSError):
        while True:  # until ENOSPC
            handle.write(b"\0" * 65536)
            handle.flush()

    async def scenario() -> list[str | None]:
        seen: list[str | None] = []
        spool = Spool(path, on_checkpoint=seen.append, checkpoint_retry=0.0)
        spool.open()
        await spool.recover()  # its checkpoint fails: the disk is full
        await _wait_checkpoint(spool)
        assert seen and seen[0] is not None and "No space" in seen[0], seen
        assert spool.checkpoint_error == seen[0]
        filler.unlink()
        await spool.append(body(9), "a@a.test", ["b@sink.test"])  # a commit: time to retry
        await spool.sync()
        await _wait_checkpoint(spool)
        assert seen[-1] is None and spool.checkpoint_error is None, seen
        await spool.close()
        return seen

    asyncio.run(scenario())
    assert load_state(path).stats.messages == 4


def test_a_relay_delivers_every_message_of_a_damaged_spool_and_names_the_damage(
    built: tuple[Path, Built], make_relay: RelayFactory, sink: RecordingSink
) -> None:
    original, spool = built
    relay = make_relay(start=False)
    shutil.copytree(original, relay.spool)
    (journal,) = (relay.spool / "journal").glob("*.jnl")
    data = bytearray(journal.read_bytes())
    first = scan_frames(bytes(data)).frames[0]
    rebuilt = sorted(r.qid for r in first[1] if isinstance(r, Enqueue))
    data[first[0] + 30] ^= 0x01  # one bit of the frame holding two messages' Enqueue records
    journal.write_bytes(bytes(data))

    relay.start()
    assert sink.wait_for(len(spool.live), timeout=30), sink.count
    relay.wait_queue_empty(timeout=30)
    delivered = {m.data for m in sink.messages}
    assert {spool.bodies[q] for q in spool.live} <= {d[d.index(b"Subject:") :] for d in delivered}
    (damaged,) = relay.events("SpoolDamaged")
    assert damaged["level"] == "error"
    assert damaged["files"] == [f"journal/{journal.name}"] and damaged["rebuilt"] == 2
    assert (relay.spool / damaged["kept"][0]).read_bytes() == bytes(data)
    events = relay.events("SpoolMessageRebuilt")
    assert sorted(e["qid"] for e in events) == rebuilt
    assert {e["level"] for e in events} == {"error"}
    _, metrics = relay.get("/metrics")
    assert b'hamta_spool_damaged_messages_total{outcome="rebuilt"} 2.0' in metrics


def test_a_version_1_spool_is_read_and_upgraded(tmp_path: Path) -> None:
    """Frames without a magic, bodies without envelopes: as a version 1 relay left them."""
    (tmp_path / "journal").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "VERSION").write_text("hamta-spool 1\n")
    bodies = [body(1), body(2)]
    (tmp_path / "data" / "00000001.seg").write_bytes(b"".join(bodies))
    records = [
        Enqueue(
            f"Q{n}",
            1,
            sum(map(len, bodies[:n])),
            len(b),
            zlib.crc32(b),
            1.0,
            "a@a.test",
            ("b@sink.test",),
        )
        for n, b in enumerate(bodies)
    ]
    journal = b""
    for batch in ([records[0]], [records[1]]):
        payload = msgspec.msgpack.encode(batch)
        journal += struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    (tmp_path / "journal" / "00000001.jnl").write_bytes(journal)

    async def scenario() -> None:
        spool = Spool(tmp_path)
        spool.open()
        state = await spool.recover()
        assert not state.damage
        assert [await spool.read_body(spool.live[q].rec) for q in ("Q0", "Q1")] == bodies
        await spool.append(body(3), "a@a.test", ["b@sink.test"])
        await spool.close()

    asyncio.run(scenario())
    assert (tmp_path / "VERSION").read_text() == "hamta-spool 2\n"
    state = load_state(tmp_path)
    assert state.stats.messages == 3 and not state.damage


def test_spool_check_reports_and_repairs(built: tuple[Path, Built], tmp_path: Path) -> None:
    original, spool = built
    work = tmp_path / "spool"
    shutil.copytree(original, work)
    (checkpoint,) = (work / "journal").glob("*.ckpt")
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))

    def hamta(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "hamtactl", "spool", "check", "--spool", str(work)]
        return subprocess.run(
            [*command, *args], check=False, capture_output=True, text=True, timeout=60
        )

    check = hamta("--json")
    assert check.returncode == 1, check.stderr
    (report,) = json.loads(check.stdout)
    assert report["files"] == [f"journal/{checkpoint.name}"] and report["kept"] == []
    assert report["lost"] == [] and report["messages"] >= len(spool.live)
    assert set(report["rebuilt"]) & spool.live
    assert not (work / "damaged").exists(), "check alone changes nothing"

    repair = hamta("--repair")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "rebuilt from its segment" in repair.stdout
    assert list((work / "damaged").iterdir())
    again = hamta()
    assert again.returncode == 0 and "no damage" in again.stdout, again.stdout
    assert spool.live <= set(load_state(work).live)


@pytest.mark.root
def test_a_relay_logs_and_counts_a_checkpoint_that_failed(
    small_fs: Path, make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay({"spool": {"path": str(small_fs / "spool"), "min_free": 0}})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail("a@origin.test", ["x@sink.test"], body(1))
    assert sink.wait_for(1, timeout=15)
    relay.wait_queue_empty()
    # A start in between: its recovery deletes the first run's emptied segment and folds its
    # journal into a checkpoint, so that the start below frees no space before its own.
    relay.terminate()
    relay.start()
    relay.terminate()
    with open(small_fs / "filler", "wb") as handle, contextlib.suppress(OSError):
        while True:  # until ENOSPC: the recovery's checkpoint cannot be written
            handle.write(b"\0" * 65536)
            handle.flush()

    relay.start()
    (failed,) = relay.wait_events("CheckpointFailed")
    assert failed["level"] == "error" and "No space" in failed["error"]
    assert "No space" in relay.queue()["checkpoint_error"]
    _, metrics = relay.get("/metrics")
    assert b"hamta_spool_checkpoint_failing 1.0" in metrics
    assert b"hamta_spool_checkpoint_failures_total 1.0" in metrics


def test_every_flipped_segment_byte_costs_at_most_its_own_message(
    built: tuple[Path, Built], tmp_path: Path
) -> None:
    """Recovery does not read bodies; a flipped body byte shows when that message is read, and
    no other message notices. Offline (load_state reads only) for speed: 3,000 cases."""
    original, spool = built
    work = tmp_path / "spool"
    shutil.copytree(original, work)
    cases = 0
    for segment in sorted((work / "data").glob("*.seg")):
        clean = segment.read_bytes()
        fd = os.open(segment, os.O_RDWR)
        try:
            for index in range(len(clean)):
                os.pwrite(fd, bytes([clean[index] ^ 0x5A]), index)
                state = load_state(work)
                assert set(state.live) == spool.live, index
                files = {int(p.stem): p.read_bytes() for p in (work / "data").glob("*.seg")}
                spoiled = []
                for qid, message in state.live.items():
                    rec = message.rec
                    read = files[rec.segment][rec.offset : rec.offset + rec.length]
                    if zlib.crc32(read) != rec.crc:
                        spoiled.append(qid)
                    else:
                        assert read == spool.bodies[qid]
                assert len(spoiled) <= 1, (segment.name, index, spoiled)
                if spoiled:
                    rec = state.live[spoiled[0]].rec
                    assert rec.segment == int(segment.stem)
                    assert rec.offset <= index < rec.offset + rec.length
                os.pwrite(fd, clean[index : index + 1], index)
                cases += 1
        finally:
            os.close(fd)
    assert cases > 2000
