"""The spool's storage drivers, on real loop devices mounted in a private mount namespace.

Every mount happens inside a worker process started with ``unshare --mount --propagation
private``: nothing can leak into the host's mount table, even when a test fails half-way (the
namespace, and its mounts, die with the worker). The worker runs driver calls sent to it as JSON
lines and answers with their results, so that the assertions stay here, in pytest, and can
interleave with what the host sees at the same time.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.storage import (
    BlockDeviceStorage,
    DirectoryStorage,
    DrbdStorage,
    StorageError,
    local_disk_states,
    mounts,
    peer_disk_states,
    peer_roles,
    run_command,
    storage_from_config,
)

ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 32 * 1024 * 1024
CALL_TIMEOUT = 30.0

# ---------------------------------------------------------------------- the worker (child side)


def serve_worker() -> None:
    """Run driver calls read from standard input; one JSON answer per line on standard output.

    ``argv[1]`` is the driver configuration (``storage_from_config``'s arguments).
    """
    spec = json.loads(sys.argv[1])
    storage = storage_from_config(spec.pop("driver"), **spec)
    mountpoint = Path(spec.get("mountpoint") or spec["path"])
    open_files: list[int] = []

    def write(name: str, text: str) -> None:
        with open(mountpoint / name, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())

    def read(name: str) -> str | None:
        path = mountpoint / name
        return path.read_text() if path.exists() else None

    def hold_open(name: str) -> None:
        open_files.append(os.open(mountpoint / name, os.O_RDWR | os.O_CREAT, 0o644))

    def close_all() -> None:
        while open_files:
            os.close(open_files.pop())

    def mount_other(device: str) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", device, str(mountpoint)], check=True, timeout=20)

    operations: dict[str, Callable[..., Any]] = {
        "promote": lambda: str(storage.promote()),
        "release": storage.release,
        "held": storage.held,
        "describe": storage.describe,
        "ismount": lambda: os.path.ismount(mountpoint),
        "write": write,
        "read": read,
        "hold_open": hold_open,
        "close_all": close_all,
        "mount_other": mount_other,
    }
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = {"value": operations[request["op"]](**request["args"])}
        except Exception as exc:  # reported to the test, which decides
            answer = {"error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(answer), flush=True)


# ---------------------------------------------------------------------- the worker (test side)


class RemoteError(Exception):
    """An exception raised by a driver call in the worker: ``"StorageError: message"``."""


class MountNamespaceWorker:
    """A worker process in its own private mount namespace, driving one storage driver."""

    def __init__(self, spec: dict[str, Any], workdir: Path) -> None:
        self.stderr_path = workdir / "worker.stderr"
        entry = "from tests.test_storage import serve_worker; serve_worker()"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    sys.executable,
                    "-c",
                    entry,
                    json.dumps(spec),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                cwd=ROOT,
            )

    def call(self, op: str, **args: Any) -> Any:
        """Run ``op`` in the worker and return its result; raise ``RemoteError`` for its error."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], CALL_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"worker gave no answer to {op}: {self.stderr_path.read_text()}")
        answer = json.loads(line)
        if "error" in answer:
            raise RemoteError(f"{answer['error']}: {answer['message']}")
        return answer["value"]

    def stop(self) -> None:
        """End the worker: its namespace, and any mount left in it, goes with it."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


Spawn = Callable[..., MountNamespaceWorker]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start workers (``spawn(driver, **options)``); all are stopped at the end."""
    workers: list[MountNamespaceWorker] = []

    def factory(driver: str, **options: Any) -> MountNamespaceWorker:
        spec = {
            "driver": driver,
            **{
                key: str(value) if isinstance(value, Path) else value
                for key, value in options.items()
            },
        }
        worker = MountNamespaceWorker(spec, tmp_path)
        workers.append(worker)
        return worker

    yield factory
    for worker in workers:
        worker.stop()


def detach(device: str) -> None:
    """Detach a loop device; a mount namespace being torn down may hold it a moment longer."""
    deadline = time.monotonic() + 10
    while True:
        done = subprocess.run(
            ["losetup", "-d", device], capture_output=True, text=True, timeout=10, check=False
        )
        if done.returncode == 0 or time.monotonic() > deadline:
            assert done.returncode == 0, f"losetup -d {device}: {done.stderr}"
            return
        time.sleep(0.05)


LoopFactory = Callable[..., Path]


@pytest.fixture
def make_loop(tmp_path: Path) -> Iterator[LoopFactory]:
    """Loop devices over fresh 32 MB images (ext4 unless ``mkfs=False``); detached at the end."""
    devices: list[str] = []
    images: list[Path] = []

    def factory(*, mkfs: bool = True) -> Path:
        image = tmp_path / f"disk{len(images)}.img"
        images.append(image)
        with open(image, "wb") as file:
            file.truncate(IMAGE_SIZE)
        if mkfs:
            subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=30)
        done = subprocess.run(
            ["losetup", "--find", "--show", str(image)],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        devices.append(done.stdout.strip())
        return Path(devices[-1])

    try:
        yield factory
    finally:
        for device in devices:
            detach(device)
        for image in images:
            image.unlink(missing_ok=True)


def host_has_mount(mountpoint: Path) -> bool:
    """Whether the test's own mount namespace has anything mounted at ``mountpoint``."""
    return any(mount.mountpoint == str(mountpoint.resolve()) for mount in mounts())


# ---------------------------------------------------------------------- block devices


@pytest.mark.root
def test_promote_write_release_promote_sees_the_file(
    make_loop: LoopFactory, spawn: Spawn, tmp_path: Path
) -> None:
    device, mountpoint = make_loop(), tmp_path / "mnt"
    worker = spawn("blockdev", device=device, mountpoint=mountpoint)
    assert worker.call("held") is False
    assert worker.call("promote") == str(mountpoint)
    assert worker.call("held") is True
    assert worker.call("ismount") is True
    # The mount lives in the worker's namespace only: here it is not held, nor mounted.
    assert not BlockDeviceStorage(device, mountpoint).held()
    assert not host_has_mount(mountpoint)

    worker.call("write", name="queued", text="a message")
    worker.call("release")
    assert worker.call("held") is False
    assert worker.call("ismount") is False
    assert worker.call("read", name="queued") is None  # the empty mountpoint directory

    assert worker.call("promote") == str(mountpoint)
    assert worker.call("read", name="queued") == "a message"
    worker.call("release")
    assert worker.call("ismount") is False


@pytest.mark.root
def test_promote_and_release_are_idempotent(
    make_loop: LoopFactory, spawn: Spawn, tmp_path: Path
) -> None:
    device, mountpoint = make_loop(), tmp_path / "deep" / "mnt"  # created on promotion
    worker = spawn("blockdev", device=device, mountpoint=mountpoint)
    worker.call("release")  # nothing held: nothing to do
    assert worker.call("promote") == str(mountpoint)
    assert worker.call("promote") == str(mountpoint)
    worker.call("release")
    worker.call("release")
    assert worker.call("held") is False
    assert worker.call("describe") == f"{device} (ext4) at {mountpoint}"


@pytest.mark.root
def test_release_of_a_busy_filesystem_fails_loudly_and_keeps_it_mounted(
    make_loop: LoopFactory, spawn: Spawn, tmp_path: Path
) -> None:
    device, mountpoint = make_loop(), tmp_path / "mnt"
    worker = spawn("blockdev", device=device, mountpoint=mountpoint)
    worker.call("promote")
    worker.call("hold_open", name="in-flight")
    started = time.monotonic()
    with pytest.raises(RemoteError, match=r"StorageError: cannot unmount .*in use after 5 att"):
        worker.call("release")
    assert time.monotonic() - started < 5, "retries on a busy filesystem must stay brief"
    assert worker.call("held") is True  # never detached lazily
    assert worker.call("ismount") is True

    worker.call("close_all")
    worker.call("release")
    assert worker.call("held") is False


@pytest.mark.root
def test_a_wrong_device_is_a_storage_error(
    make_loop: LoopFactory, spawn: Spawn, tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    missing = spawn("blockdev", device=tmp_path / "no-such-disk", mountpoint=mountpoint)
    with pytest.raises(RemoteError, match=r"StorageError: cannot use .*no-such-disk: No such"):
        missing.call("promote")
    assert missing.call("held") is False

    image = tmp_path / "plain-file"
    image.write_bytes(b"\0" * 4096)
    regular = spawn("blockdev", device=image, mountpoint=mountpoint)
    with pytest.raises(RemoteError, match=r"StorageError: .*plain-file is not a block device"):
        regular.call("promote")

    blank = spawn("blockdev", device=make_loop(mkfs=False), mountpoint=mountpoint)
    with pytest.raises(RemoteError, match=r"StorageError: fsck of /dev/loop\d+ failed"):
        blank.call("promote")
    assert blank.call("ismount") is False

    unchecked = spawn("blockdev", device=make_loop(mkfs=False), mountpoint=mountpoint, check=False)
    with pytest.raises(RemoteError, match=r"StorageError: cannot mount /dev/loop\d+ at .*: mount"):
        unchecked.call("promote")  # fsck skipped: mount(8) says why it cannot
    assert unchecked.call("held") is False


@pytest.mark.root
def test_a_foreign_mount_at_the_mountpoint_is_left_alone(
    make_loop: LoopFactory, spawn: Spawn, tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    worker = spawn("blockdev", device=make_loop(), mountpoint=mountpoint)
    worker.call("mount_other", device=str(make_loop()))
    assert worker.call("held") is False
    with pytest.raises(RemoteError, match=r"StorageError: .*mnt already has /dev/loop\d+ \(ext4\)"):
        worker.call("promote")
    worker.call("release")  # not ours: nothing to release, and it is not unmounted
    assert worker.call("ismount") is True


def test_run_command_turns_an_overrun_into_a_storage_error() -> None:
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"sleep 10 did not finish within 0.2s"):
        run_command(["sleep", "10"], 0.2)
    assert time.monotonic() - started < 3
    with pytest.raises(StorageError, match="cannot run hvt-no-such-tool"):
        run_command(["hvt-no-such-tool"], 1)
    assert run_command(["sh", "-c", "echo out; exit 3"], 5).returncode == 3


# ---------------------------------------------------------------------- DRBD


def test_local_disk_states_of_drbdadm_dstate() -> None:
    assert local_disk_states("UpToDate/UpToDate\n") == ["UpToDate"]
    assert local_disk_states("Outdated/DUnknown\nUpToDate/UpToDate\n") == ["Outdated", "UpToDate"]
    assert local_disk_states("Diskless\n") == ["Diskless"]
    assert local_disk_states("\n") == []


def test_peer_roles_of_drbdadm_role() -> None:
    assert peer_roles("Secondary/Primary\n") == ["Primary"]
    assert peer_roles("Secondary/Unknown\nSecondary/Secondary\n") == ["Unknown", "Secondary"]
    assert peer_roles("\n") == []


class _Clock:
    """Monotonic time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _drbdadm_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, primary_roles: int) -> Path:
    """A ``drbdadm`` first on PATH that reports the peer Primary ``primary_roles`` times.

    This host's kernel has no DRBD module; the real one runs in the Vagrant cluster's machines
    (tests/test_vagrant_cluster.py). This stand-in answers as DRBD 8.4 does and logs each call.
    """
    calls = tmp_path / "calls"
    tool = tmp_path / "bin" / "drbdadm"
    tool.parent.mkdir()
    tool.write_text(
        "#!/bin/sh\n"
        f'echo "$1" >> {calls}\n'
        'case "$1" in\n'
        "  dstate) echo UpToDate/DUnknown ;;\n"
        f'  role) n=$(grep -c "^role$" {calls}); '
        f'if [ "$n" -le {primary_roles} ]; then echo Secondary/Primary; '
        "else echo Secondary/Unknown; fi ;;\n"
        "  primary) ;;\n"
        "esac\n"
    )
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    return calls


def test_drbd_waits_until_drbd_itself_has_lost_the_fenced_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DRBD sees a powered-off peer as Primary until its ping times out: promotion waits."""
    calls = _drbdadm_on_path(tmp_path, monkeypatch, primary_roles=3)
    clock = _Clock()
    storage = DrbdStorage(
        "r0", tmp_path / "no-device", tmp_path / "mnt", clock=clock, sleep=clock.sleep
    )
    with pytest.raises(StorageError):  # the stand-in has no device to mount
        storage.promote()
    assert calls.read_text().split() == ["dstate", "role", "role", "role", "role", "primary"]
    assert clock.now == pytest.approx(0.6)


def test_drbd_never_promotes_beside_a_peer_that_stays_primary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _drbdadm_on_path(tmp_path, monkeypatch, primary_roles=10_000)
    clock = _Clock()
    storage = DrbdStorage(
        "r0", tmp_path / "dev", tmp_path / "mnt", timeout=5.0, clock=clock, sleep=clock.sleep
    )
    with pytest.raises(StorageError, match="the peer is still Primary after 5s"):
        storage.promote()
    assert "primary" not in calls.read_text().split()


@pytest.mark.root
@pytest.mark.skipif(
    shutil.which("drbdadm") is None,
    reason="drbdadm (drbd-utils) is not installed; DRBD needs a kernel module this host lacks",
)
def test_drbd_refuses_a_resource_it_cannot_see(tmp_path: Path) -> None:
    storage = DrbdStorage("hvt-no-such-resource", "/dev/drbd99", tmp_path / "mnt")
    with pytest.raises(StorageError, match="drbdadm dstate hvt-no-such-resource failed"):
        storage.promote()
    assert not storage.held()
    assert not (tmp_path / "mnt").exists()


# ---------------------------------------------------------------------- directory and config


def test_directory_storage(tmp_path: Path) -> None:
    path = tmp_path / "a" / "spool"
    storage = DirectoryStorage(path)
    assert not storage.held()
    assert storage.promote() == path
    assert path.is_dir() and storage.held()
    assert storage.promote() == path
    storage.release()
    storage.release()
    assert path.is_dir()  # the demo's directory stays
    assert storage.describe() == f"directory {path}"

    blocked = DirectoryStorage(tmp_path / "file" / "spool")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StorageError, match="cannot create"):
        blocked.promote()


def test_storage_from_config(tmp_path: Path) -> None:
    directory = storage_from_config("directory", path=str(tmp_path / "spool"))
    assert isinstance(directory, DirectoryStorage)
    assert directory.path == tmp_path / "spool"

    blockdev = storage_from_config(
        "blockdev", device="/dev/sdz", mountpoint=str(tmp_path), options=["noatime", "data=ordered"]
    )
    assert isinstance(blockdev, BlockDeviceStorage)
    assert blockdev.options == ("noatime", "data=ordered")

    drbd = storage_from_config("drbd", resource="r0", device="/dev/drbd0", mountpoint=tmp_path)
    assert isinstance(drbd, DrbdStorage)
    assert drbd.describe() == f"DRBD resource r0 (/dev/drbd0) at {tmp_path}"

    with pytest.raises(StorageError, match="unknown storage driver 'nfs'"):
        storage_from_config("nfs", path="/x")
    with pytest.raises(StorageError, match=r"storage driver blockdev: missing .*mountpoint"):
        storage_from_config("blockdev", device="/dev/sdz")
    with pytest.raises(StorageError, match=r"storage driver directory: .*unexpected .*device"):
        storage_from_config("directory", path="/x", device="/dev/sdz")


def test_peer_disk_states_of_drbdadm_dstate() -> None:
    assert peer_disk_states("UpToDate/DUnknown\n") == ["DUnknown"]
    assert peer_disk_states("UpToDate/UpToDate\nUpToDate/Outdated\n") == ["UpToDate", "Outdated"]
    assert peer_disk_states("Diskless\n") == []


def test_drbd_expects_a_fence_only_beside_an_unknown_peer_from_a_current_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = tmp_path / "bin" / "drbdadm"
    tool.parent.mkdir()
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")
    storage = DrbdStorage("r0", tmp_path / "dev", tmp_path / "mnt")
    for dstate, expected in [
        ("UpToDate/DUnknown", True),
        ("UpToDate/UpToDate", False),  # connected: primary calls no handler
        ("UpToDate/Outdated", False),
        ("Outdated/DUnknown", False),  # promotion is refused before drbdadm primary
    ]:
        tool.write_text(f"#!/bin/sh\necho {dstate}\n")
        tool.chmod(0o755)
        assert storage.primary_would_fence() is expected, dstate
