"""DRBD's fast fence-peer path: the handler's decisions, and the agent's order of writes.

The handler (``python -m cluster.fence_marker``) runs here as drbdadm runs it: a process of its
own with ``DRBD_RESOURCE``/``DRBD_PEER`` and the full handler after ``--``, here a script that
records that it ran. The agent's half runs in the real executor against a real ZooKeeper, with a
stand-in ``drbdadm`` (this host has no DRBD module) whose ``primary`` runs the real handler, as
DRBD would, at the very moment the marker must already be there.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.config import StorageSection
from cluster.coordination import Coordinator
from cluster.decision_data import Action, Step
from cluster.executor import Executor
from cluster.fast_fence import FastFence
from cluster.fence_marker import TERM_FILE, Marker, marker_name
from cluster.fencers import CommandFencer
from cluster.relayproc import RelayProcess
from cluster.storage import DrbdStorage
from cluster.zookeeper import ZooKeeperEnsemble
from tests.support.pair import active_and_passive

ROOT = Path(__file__).resolve().parent.parent
FULL = 6  # what the stand-in full handler answers, to tell it from the fast path's 4


def full_handler(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for ``hamta drbd fence-peer``: records that it ran, exits 6."""
    ran = tmp_path / "full-handler-ran"
    script = tmp_path / "full-handler"
    script.write_text(f'#!/bin/sh\necho "$@" > {ran}\nexit {FULL}\n')
    script.chmod(0o755)
    return script, ran


def write(directory: Path, marker: Marker | None, term: int | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if marker is not None:
        (directory / marker_name(marker.resource)).write_bytes(marker.encode())
    if term is not None:
        (directory / TERM_FILE).write_text(json.dumps({"term": term}))


def handler(directory: Path, full: Path, peer: str = "b") -> subprocess.CompletedProcess[str]:
    """The fast handler as drbdadm runs it (no standard input, its environment)."""
    return subprocess.run(
        [sys.executable, "-m", "cluster.fence_marker", "--dir", str(directory), "--", str(full)],
        env={**os.environ, "DRBD_RESOURCE": "r0", "DRBD_PEER": peer, "DRBD_MINOR": "0"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_fresh_marker_of_the_current_term_answers_peer_fenced(tmp_path: Path) -> None:
    full, ran = full_handler(tmp_path)
    write(tmp_path / "m", Marker(7, "r0", "b", time.time(), 60.0), term=7)
    done = handler(tmp_path / "m", full)
    assert done.returncode == 4, done.stderr
    assert "b marked outdated for r0 in term 7" in done.stderr
    assert not ran.exists()


@pytest.mark.parametrize(
    ("marker", "term", "why"),
    [
        (Marker(7, "r0", "b", time.time() - 61, 60.0), 7, "stale marker of term 7"),
        (Marker(7, "r0", "b", time.time() + 30, 60.0), 7, "stale marker"),  # from the future
        (Marker(6, "r0", "b", time.time(), 60.0), 7, "term 6 is not the current term 7"),
        (Marker(7, "r0", "c", time.time(), 60.0), 7, "the marker is for c of r0, not b"),
        (Marker(7, "r1", "b", time.time(), 60.0), 7, "no r0.fenced"),
        (None, 7, "no r0.fenced"),
        (Marker(7, "r0", "b", time.time(), 60.0), None, "no term"),
    ],
    ids=["stale", "future", "other-term", "other-peer", "other-resource", "missing", "no-term"],
)
def test_anything_but_a_fresh_marker_of_this_term_falls_back_to_the_full_handler(
    tmp_path: Path, marker: Marker | None, term: int | None, why: str
) -> None:
    full, ran = full_handler(tmp_path)
    write(tmp_path / "m", marker, term)
    done = handler(tmp_path / "m", full)
    assert done.returncode == FULL, done.stderr
    assert why in done.stderr
    assert ran.exists()  # the full handler decided, through ZooKeeper


def test_a_garbled_marker_falls_back(tmp_path: Path) -> None:
    full, ran = full_handler(tmp_path)
    write(tmp_path / "m", None, term=7)
    (tmp_path / "m" / marker_name("r0")).write_text('{"term": 7, "resource"')
    done = handler(tmp_path / "m", full)
    assert (done.returncode, ran.exists()) == (FULL, True), done.stderr
    assert "unreadable marker" in done.stderr


# ---------------------------------------------------------------------- the agent's half


def drbdadm_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, markers: Path, *, known_for: int = 0
) -> Path:
    """A ``drbdadm`` whose peer is gone (DUnknown) and whose ``primary`` runs the fast handler.

    As DRBD 8.4 with ``fencing resource-only``: promoting beside an unknown peer disk calls the
    fence-peer handler and fails unless it answers 4 (or 7). ``known_for``: DRBD goes on seeing
    the powered-off peer Primary and its disk UpToDate for that many ``role`` calls (until its
    ping times out).
    """
    calls = tmp_path / "calls"
    full, _ = full_handler(tmp_path)
    handler = f"{sys.executable} -m cluster.fence_marker --dir {markers} -- {full}"
    tool = tmp_path / "bin" / "drbdadm"
    tool.parent.mkdir()
    tool.write_text(
        "#!/bin/sh\n"
        f'echo "$1" >> {calls}\n'
        'case "$1" in\n'
        f'  dstate) if [ "$(grep -c "^role$" {calls})" -le {known_for} ]; '
        "then echo UpToDate/UpToDate; else echo UpToDate/DUnknown; fi ;;\n"
        f'  role) if [ "$(grep -c "^role$" {calls})" -le {known_for} ]; '
        "then echo Secondary/Primary; else echo Secondary/Unknown; fi ;;\n"
        f"  primary) DRBD_RESOURCE=$2 DRBD_PEER=node1 {handler} 2>/dev/null; code=$?\n"
        f'    echo "fence-peer $code" >> {calls}; [ $code -eq 4 ] || exit 11 ;;\n'
        "esac\n"
    )
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return calls


@pytest.fixture
def pair(zookeeper: ZooKeeperEnsemble) -> Iterator[tuple[Coordinator, Coordinator]]:
    """node1 was active and is gone (its session ended); node2, passive, is connected."""
    with active_and_passive(zookeeper.hosts, f"f{uuid.uuid4().hex[:10]}") as (node1, node2, _):
        node1.stop()
        yield node1, node2


@pytest.fixture
def leading(zookeeper: ZooKeeperEnsemble) -> Iterator[tuple[Coordinator, int]]:
    """node1 leads (its epoch), node2 is passive and connected."""
    with active_and_passive(zookeeper.hosts, f"f{uuid.uuid4().hex[:10]}") as (node1, _, epoch):
        yield node1, epoch


def promote(
    tmp_path: Path, coordinator: Coordinator, fast: bool, *, fenced_first: bool = False
) -> tuple[list[str], bool]:
    """ACQUIRE, FENCE node1, STORAGE on node2's executor; drbdadm's calls and the outcome.
    ``fenced_first``: node1 fenced before ACQUIRE, as the fast takeover does (the promotion's
    FENCE then has nobody left to fence)."""
    markers = tmp_path / "markers"
    storage = DrbdStorage("r0", tmp_path / "no-device", tmp_path / "mnt", timeout=10.0)
    fast_fence = FastFence(
        coordinator=coordinator,
        node="node2",
        resource="r0",
        directory=markers,
        valid=30.0,
        fence_expected=storage.primary_would_fence,
    )
    executor = Executor(
        node="node2",
        coordinator=coordinator,
        storage=storage,
        spool_name="spool",
        vip=None,
        relay=RelayProcess(["true"], tmp_path / "control.sock", None),
        fencer=CommandFencer([["true"]]),  # the peer's power is cut (stand-in)
        probe_address=("127.0.0.1", 1),
        probe_timeout=1.0,
        fast_fence=fast_fence if fast else None,
    )

    async def steps() -> bool:
        if fenced_first:  # while passive, in the silent leader's term
            first = await executor.run(Action(Step.FENCE, 10.0, 1, peer="node1", fence=("node1",)))
            assert first.ok, first.detail
        acquired = await executor.run(Action(Step.ACQUIRE, 10.0))
        assert acquired.ok, acquired.detail
        epoch = acquired.epoch
        if fenced_first:
            fence = Action(Step.FENCE, 10.0, epoch, peer="node1", fenced=("node1",))
        else:
            fence = Action(Step.FENCE, 10.0, epoch, peer="node1", fence=("node1",))
        fenced = await executor.run(fence)
        assert fenced.ok, fenced.detail
        stored = await executor.run(Action(Step.STORAGE, 30.0, epoch))
        return "no-device" in stored.detail  # primary succeeded; the mount has no device

    promoted = asyncio.run(steps())
    calls = (tmp_path / "calls").read_text().split("\n")
    return [call for call in calls if call], promoted


def test_the_agent_marks_the_peer_and_writes_the_marker_before_drbdadm_primary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pair: tuple[Coordinator, Coordinator]
) -> None:
    _, node2 = pair
    drbdadm_on_path(tmp_path, monkeypatch, tmp_path / "markers")
    drbdadm, promoted = promote(tmp_path, node2, fast=True)
    assert drbdadm[-2:] == ["primary", "fence-peer 4"]  # answered from the marker
    assert promoted
    assert "node1" in node2.view().outdated  # the mark the marker stands for, in ZooKeeper
    assert not (tmp_path / "markers" / marker_name("r0")).exists()  # removed after the step
    term = json.loads((tmp_path / "markers" / TERM_FILE).read_text())["term"]
    assert term == node2.view().epoch


def test_a_peer_fenced_before_acquire_by_the_fast_takeover_is_answered_for_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pair: tuple[Coordinator, Coordinator]
) -> None:
    # The Vagrant fleet: the fast takeover fenced the powered-off node while passive, and the
    # storage step then left DRBD to the full handler ("no single fenced peer"): 22-24 s.
    _, node2 = pair
    drbdadm_on_path(tmp_path, monkeypatch, tmp_path / "markers")
    drbdadm, promoted = promote(tmp_path, node2, fast=True, fenced_first=True)
    assert drbdadm[-2:] == ["primary", "fence-peer 4"]  # answered from the marker
    assert promoted
    assert "node1" in node2.view().outdated


def test_a_fenced_peer_drbd_has_not_lost_yet_is_waited_for_then_answered_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pair: tuple[Coordinator, Coordinator]
) -> None:
    # The Vagrant cluster's fast takeover fenced the peer before DRBD's own ping noticed; the
    # marker was not written, and by ``primary`` DRBD had lost the peer and ran the full
    # handler: 8-10 s storage steps under TCG.
    _, node2 = pair
    drbdadm_on_path(tmp_path, monkeypatch, tmp_path / "markers", known_for=3)
    drbdadm, promoted = promote(tmp_path, node2, fast=True, fenced_first=True)
    assert drbdadm[-2:] == ["primary", "fence-peer 4"], drbdadm  # answered from the marker
    assert promoted
    assert "node1" in node2.view().outdated
    assert drbdadm[:5] == ["role", "role", "role", "role", "dstate"]  # DRBD lost it, then asked


def test_without_the_fast_path_drbd_s_handler_falls_back_to_the_full_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pair: tuple[Coordinator, Coordinator]
) -> None:
    _, node2 = pair
    drbdadm_on_path(tmp_path, monkeypatch, tmp_path / "markers")
    drbdadm, promoted = promote(tmp_path, node2, fast=False)
    assert drbdadm[-2:] == ["primary", f"fence-peer {FULL}"]
    assert not promoted
    assert "node1" not in node2.view().outdated


def test_the_marker_directory_setting() -> None:
    assert StorageSection().fence_marker_dir == Path("/var/lib/hamta/drbd-fence")
    off = StorageSection.model_validate({"fence_marker_dir": ""})  # as TOML gives it
    assert off.fence_marker_dir is None  # the fast path off
    with pytest.raises(ValidationError, match="fence_marker_dir must be an absolute path"):
        StorageSection.model_validate({"fence_marker_dir": "drbd-fence"})


def test_a_peer_drbd_still_knows_is_neither_marked_nor_answered_for(
    tmp_path: Path, leading: tuple[Coordinator, int]
) -> None:
    # It receives every write: marked, it could never take over again (only a resync clears it).
    node1, epoch = leading
    fast = FastFence(
        coordinator=node1,
        node="node1",
        resource="r0",
        directory=tmp_path,
        valid=30.0,
        fence_expected=lambda: False,
    )
    assert "DRBD knows node2's disk, or ours is not current" in fast.arm(epoch, ("node2",))
    assert "node2" not in node1.view().outdated
    assert not (tmp_path / marker_name("r0")).exists()
