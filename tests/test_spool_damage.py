"""Damaged spool storage costs at most the damaged message, and never silently.

A small spool (a checkpoint and a journal holding ten live messages) is damaged one byte at a
time, and cut at every frame boundary; each time a fresh copy is recovered with the Spool
class and every message whose own bytes are intact must come back, with its body.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from hamta.spool import Spool, SpoolState, scan_frames


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


async def recover_copy(original: Path, work: Path, file: Path, data: bytes) -> tuple[
    SpoolState, dict[str, bytes]
]:  # fmt: skip
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
