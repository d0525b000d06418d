"""The shared spool's storage: made available read-write on the active node, released on demotion.

Three drivers share one small protocol. ``DirectoryStorage`` is a local directory for a
single-host demo. ``BlockDeviceStorage`` mounts a shared block device (a SAN LUN, an iSCSI or
NBD export, a loop device in tests). ``DrbdStorage`` promotes a DRBD resource, then mounts it.

Mount state is read from /proc/self/mountinfo, i.e. in the caller's *current* mount namespace:
a mount made in another namespace (``ip netns exec`` gives each command its own) is not "held"
here. Mount and unmount go through util-linux ``mount``/``umount``; every tool runs with a time
limit, and a tool that overruns it is killed and reported as ``StorageError``.

Release never detaches lazily (``umount -l``): a lazily detached filesystem stays alive, and
writable, for whoever still has files open on it, which is exactly the split-brain writer the
peer must never meet. A busy filesystem fails the release loudly and stays mounted; the agent
then retries the demotion step and keeps its leadership until the spool is really released.

All calls block (they run tools and wait for the disk): the executor runs them in a worker thread.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

MOUNTINFO: Final = Path("/proc/self/mountinfo")
# A killed tool normally exits at once; one stuck in the kernel (dead device) is left behind.
_REAP_GRACE: Final = 2.0
_UPTODATE: Final = "UpToDate"
_PRIMARY: Final = "Primary"
_UNKNOWN: Final = "DUnknown"
_PEER_POLL: Final = 0.2


class StorageError(Exception):
    """The spool's storage could not be promoted, released or inspected."""


class Storage(Protocol):
    """What the executor needs of the spool's storage."""

    def promote(self) -> Path:
        """Make the spool available read-write here and return its mountpoint; idempotent."""
        ...

    def release(self) -> None:
        """The reverse of ``promote``; idempotent; ``StorageError`` if still in use."""
        ...

    def held(self) -> bool:
        """Whether the spool is available read-write here right now."""
        ...

    def describe(self) -> str:
        """A short description for logs."""
        ...


# ---------------------------------------------------------------------- tools and mounts


def run_command(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a storage tool with a time limit; it is killed and ``StorageError`` raised on overrun.

    The exit status is returned, not checked. ``subprocess.run`` waits without limit for a
    killed child, which hangs when the child is stuck in the kernel on a dead device; here the
    wait after the kill is bounded too, and such a child is abandoned.
    """
    command = " ".join(argv)
    env = {**os.environ, "LC_ALL": "C"}  # messages are matched ("busy"), never translated
    try:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    except OSError as exc:
        raise StorageError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=_REAP_GRACE)
        raise StorageError(f"{command} did not finish within {timeout:g}s") from exc
    return subprocess.CompletedProcess(list(argv), process.returncode, stdout, stderr)


def _output(done: subprocess.CompletedProcess[str]) -> str:
    text = (done.stderr or done.stdout or "").strip()
    return " ".join(text.split()) or f"exit status {done.returncode}"


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    device: int  # st_dev of the mounted filesystem (os.makedev(major, minor))
    mountpoint: str
    options: frozenset[str]  # per-mount options: rw or ro, noatime, ...
    fstype: str
    source: str

    @property
    def writable(self) -> bool:
        """Mounted read-write."""
        return "rw" in self.options


_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    return os.fsdecode(_ESCAPE.sub(lambda match: bytes([int(match[1], 8)]), field))


def mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """The mounts of the current mount namespace, in mount order (later ones on top)."""
    try:
        data = mountinfo.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {mountinfo}: {exc.strerror or exc}") from exc
    found: list[Mount] = []
    for line in data.splitlines():
        fields = line.split(b" ")
        try:
            separator = fields.index(b"-", 6)  # after the optional fields
            major, minor = (int(part) for part in fields[2].split(b":"))
            found.append(
                Mount(
                    device=os.makedev(major, minor),
                    mountpoint=_unescape(fields[4]),
                    options=frozenset(os.fsdecode(fields[5]).split(",")),
                    fstype=_unescape(fields[separator + 1]),
                    source=_unescape(fields[separator + 2]),
                )
            )
        except (ValueError, IndexError):
            continue  # not a line of the documented format: nothing of ours
    return found


def mount_at(mountpoint: Path) -> Mount | None:
    """The mount visible at ``mountpoint`` (the topmost one), if any."""
    where = os.path.realpath(mountpoint)
    visible = None
    for mount in mounts():
        if mount.mountpoint == where:
            visible = mount
    return visible


# ---------------------------------------------------------------------- drivers


class DirectoryStorage(Storage):
    """A local directory: the single-host demo, where both relays share one disk anyway."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def promote(self) -> Path:
        """Create the directory if needed and return it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.path}: {exc.strerror or exc}") from exc
        return self.path

    def release(self) -> None:
        """Nothing to release: the directory stays where it is."""

    def held(self) -> bool:
        """The directory exists."""
        return self.path.is_dir()

    def describe(self) -> str:
        """``directory PATH``."""
        return f"directory {self.path}"


class BlockDeviceStorage(Storage):
    """A block device with a filesystem, mounted read-write on the active node only.

    Promotion runs ``fsck.<fstype> -p`` (preen) before mounting, bounded by ``fsck_timeout``;
    ``check=False`` skips it. Why preen at all: after a crash of the former active node, an
    ext4 filesystem only needs its journal replayed, and e2fsck -p does exactly that (the same
    work the kernel would do on mount) and returns at once. It runs a full check only when the
    superblock records errors, and then the time is well spent: serving from a damaged spool
    risks losing mail already acknowledged, and a check that overruns its limit fails the step
    instead of silently mounting a broken filesystem. Periodic checks (maximum mount count,
    check interval) should be disabled on the spool (``tune2fs -c 0 -i 0``, mke2fs's default)
    so that preening never turns into a full check at failover time by the calendar alone.
    Exit status 1 or 2 (errors corrected) is success; 4 and above fail the promotion.
    """

    def __init__(
        self,
        device: Path | str,
        mountpoint: Path | str,
        fstype: str = "ext4",
        options: Sequence[str] = ("noatime",),
        *,
        check: bool = True,
        timeout: float = 20.0,
        fsck_timeout: float = 35.0,
        busy_attempts: int = 5,
        busy_interval: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.device = Path(device)
        self.mountpoint = Path(mountpoint)
        self.fstype = fstype
        self.options = tuple(options)
        self.check = check
        self.timeout = timeout
        self.fsck_timeout = fsck_timeout
        self.busy_attempts = max(1, busy_attempts)
        self.busy_interval = busy_interval
        self._sleep = sleep

    def promote(self) -> Path:
        """Check (``fsck -p``) and mount the device read-write; return the mountpoint."""
        current = mount_at(self.mountpoint)
        if current is not None:
            if not self._ours(current):
                raise StorageError(
                    f"{self.mountpoint} already has {current.source} ({current.fstype}) mounted"
                )
            if not current.writable:
                raise StorageError(
                    f"{self.device} is mounted read-only at {self.mountpoint} "
                    "(remounted after an I/O error?); refusing to serve from it"
                )
            return self.mountpoint
        self._check_device()
        try:
            self.mountpoint.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.mountpoint}: {exc.strerror or exc}") from exc
        if self.check:
            self._fsck()
        options = ",".join(("rw", *self.options))
        done = run_command(
            ["mount", "-t", self.fstype, "-o", options, str(self.device), str(self.mountpoint)],
            self.timeout,
        )
        if done.returncode != 0:
            raise StorageError(f"cannot mount {self.device} at {self.mountpoint}: {_output(done)}")
        if not self.held():
            raise StorageError(f"{self.device} is not mounted read-write at {self.mountpoint}")
        return self.mountpoint

    def release(self) -> None:
        """Flush and unmount; ``StorageError`` (and still mounted) when the filesystem is busy."""
        if self._mounted() is None:
            return
        done = run_command(["sync", "-f", str(self.mountpoint)], self.timeout)
        if done.returncode != 0:
            raise StorageError(f"cannot flush {self.mountpoint}: {_output(done)}")
        for attempt in range(1, self.busy_attempts + 1):
            done = run_command(["umount", str(self.mountpoint)], self.timeout)
            if self._mounted() is None:
                return  # by us, or by someone else meanwhile: released all the same
            if done.returncode == 0:
                continue  # a second mount of ours was stacked underneath
            busy = "busy" in _output(done).lower()
            if not busy or attempt == self.busy_attempts:
                why = "in use" if busy else "umount failed"
                raise StorageError(
                    f"cannot unmount {self.mountpoint} ({why} after {attempt} attempt(s)): "
                    f"{_output(done)}; it stays mounted"
                )
            self._sleep(self.busy_interval)  # a closing process may let go in a moment
        raise StorageError(f"{self.device} is still mounted at {self.mountpoint}")

    def held(self) -> bool:
        """The device is mounted read-write at the mountpoint, in this mount namespace."""
        current = self._mounted()
        return current is not None and current.writable

    def describe(self) -> str:
        """``DEVICE (FSTYPE) at MOUNTPOINT``."""
        return f"{self.device} ({self.fstype}) at {self.mountpoint}"

    # ------------------------------------------------------------------ internals

    def _mounted(self) -> Mount | None:
        current = mount_at(self.mountpoint)
        return current if current is not None and self._ours(current) else None

    def _ours(self, mount: Mount) -> bool:
        try:
            return mount.device == os.stat(self.device).st_rdev
        except OSError:  # the device node is gone (a vanished disk): compare by name
            return mount.source == str(self.device)

    def _check_device(self) -> None:
        try:
            mode = os.stat(self.device).st_mode
        except OSError as exc:
            raise StorageError(f"cannot use {self.device}: {exc.strerror or exc}") from exc
        if not stat.S_ISBLK(mode):
            # mount(8) would silently set up a loop device over a regular file.
            raise StorageError(f"{self.device} is not a block device")

    def _fsck(self) -> None:
        tool = shutil.which(f"fsck.{self.fstype}")
        if tool is None:
            return  # no checker for this filesystem (fsck.xfs would do nothing anyway)
        done = run_command([tool, "-p", str(self.device)], self.fsck_timeout)
        if done.returncode >= 4:
            raise StorageError(
                f"fsck of {self.device} failed (exit status {done.returncode}): {_output(done)}"
            )


class DrbdStorage(Storage):
    """A DRBD resource: made primary when locally UpToDate, then mounted like a block device.

    Promotion refuses a resource whose local disk is in any state other than UpToDate
    (Outdated, Inconsistent, Diskless, ...), naming the state: becoming primary on stale data
    would serve, and then replicate, an old spool.
    """

    def __init__(
        self,
        resource: str,
        device: Path | str,
        mountpoint: Path | str,
        fstype: str = "ext4",
        options: Sequence[str] = ("noatime",),
        *,
        timeout: float = 20.0,
        check: bool = True,
        fsck_timeout: float = 35.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.resource = resource
        self.timeout = timeout
        self._clock = clock
        self._sleep = sleep
        self.filesystem = BlockDeviceStorage(
            device,
            mountpoint,
            fstype,
            options,
            check=check,
            timeout=timeout,
            fsck_timeout=fsck_timeout,
        )

    def promote(self) -> Path:
        """Check the local disk state, ``drbdadm primary``, mount; return the mountpoint."""
        if self.filesystem.held():
            return self.filesystem.mountpoint  # only a primary device can be mounted
        done = self._drbdadm("dstate")
        states = local_disk_states(done.stdout)
        if not states:
            raise StorageError(f"drbdadm dstate {self.resource} said nothing: {_output(done)}")
        stale = [state for state in states if state != _UPTODATE]
        if stale:
            raise StorageError(
                f"DRBD resource {self.resource} is {'/'.join(stale)} locally, not UpToDate; "
                "refusing to become primary"
            )
        self._await_peer_not_primary()
        self._drbdadm("primary")
        return self.filesystem.promote()

    def primary_would_fence(self) -> bool:
        """``primary`` would call DRBD's fence-peer: the local disk is UpToDate (else promotion
        is refused before) and DRBD does not know the peer's (``DUnknown``).

        Asked of a peer just fenced, so first waited for as ``promote`` waits (``StorageError``
        if it stays Primary): DRBD learns of the power-off on its own clock (ping-int and
        ping-timeout), and the fast takeover fences sooner. Asked at once, the Vagrant cluster's
        DRBD still knew the peer's disk, the marker was not written, and by ``primary`` DRBD
        had lost it and ran the full handler: storage steps of 8-10 s under TCG."""
        self._await_peer_not_primary()
        output = self._drbdadm("dstate").stdout
        local = local_disk_states(output)
        return bool(local) and set(local) == {_UPTODATE} and _UNKNOWN in peer_disk_states(output)

    def _await_peer_not_primary(self) -> None:
        # The takeover starts when the old node's ZooKeeper session ends, and its fence may
        # have cut the power already; DRBD learns that its peer is gone on its own clock (the
        # resource's ping-int and ping-timeout), and until then it sees a Primary peer and
        # refuses `drbdadm primary` ("peer is not outdated"). Measured on the Vagrant cluster:
        # DRBD's default 10 s ping interval lost the first attempt and a 30 s cooldown. A peer
        # that stays Primary past the time limit is alive and connected: never promote then.
        deadline = self._clock() + self.timeout
        while True:
            roles = peer_roles(self._drbdadm("role").stdout)
            if _PRIMARY not in roles:
                return
            if self._clock() >= deadline:
                raise StorageError(
                    f"DRBD resource {self.resource}: the peer is still Primary after "
                    f"{self.timeout:g}s; refusing to become primary beside it"
                )
            self._sleep(_PEER_POLL)

    def release(self) -> None:
        """Unmount, then ``drbdadm secondary`` (a no-op for a resource that is secondary)."""
        self.filesystem.release()
        self._drbdadm("secondary")

    def held(self) -> bool:
        """Mounted read-write here (which DRBD allows only on the primary)."""
        return self.filesystem.held()

    def describe(self) -> str:
        """``DRBD resource RES (DEVICE) at MOUNTPOINT``."""
        fs = self.filesystem
        return f"DRBD resource {self.resource} ({fs.device}) at {fs.mountpoint}"

    def _drbdadm(self, command: str) -> subprocess.CompletedProcess[str]:
        done = run_command(["drbdadm", command, self.resource], self.timeout)
        if done.returncode != 0:
            raise StorageError(f"drbdadm {command} {self.resource} failed: {_output(done)}")
        return done


def peer_roles(role_output: str) -> list[str]:
    """The peer's role of each volume in ``drbdadm role`` output ("Secondary/Primary")."""
    return [line.split("/")[1].strip() for line in role_output.splitlines() if "/" in line]


def peer_disk_states(dstate_output: str) -> list[str]:
    """The peer's disk state of each volume in ``drbdadm dstate`` output ("UpToDate/DUnknown")."""
    return [line.split("/")[1].strip() for line in dstate_output.splitlines() if "/" in line]


def local_disk_states(dstate_output: str) -> list[str]:
    """The local disk state of each volume in ``drbdadm dstate`` output ("UpToDate/Outdated")."""
    return [line.split("/")[0].strip() for line in dstate_output.splitlines() if line.strip()]


# ---------------------------------------------------------------------- configuration

_DRIVERS: Final[Mapping[str, Callable[..., Storage]]] = {
    "directory": DirectoryStorage,
    "blockdev": BlockDeviceStorage,
    "drbd": DrbdStorage,
}


def storage_from_config(driver: str, **options: Any) -> Storage:
    """The storage driver ``driver`` ("directory", "blockdev" or "drbd") built from ``options``.

    ``options`` are the driver's constructor arguments (``path`` for a directory; ``device``,
    ``mountpoint``, ``fstype``, ``options`` for a block device; plus ``resource`` for DRBD).
    An unknown driver, a missing or an unknown option is a ``StorageError``.
    """
    factory = _DRIVERS.get(driver)
    if factory is None:
        raise StorageError(f"unknown storage driver {driver!r}; use one of {', '.join(_DRIVERS)}")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise StorageError(f"storage driver {driver}: {exc}") from exc
    return factory(**options)
