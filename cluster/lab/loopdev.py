"""The lab's shared disk: an ext4 filesystem on a loop device over a sparse file.

Both nodes see the same block device, as two machines would see a SAN volume; which one mounts
it is the agents' business (only the active node may). The filesystem is made with its
``spool`` directory already in it (``mkfs.ext4 -d``), so it never has to be mounted here.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Final

IMAGE_SIZE: Final = 256 * 1024 * 1024


class LoopError(RuntimeError):
    """losetup or mkfs failed; the message carries their error output."""


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LoopError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise LoopError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def create_image(path: Path, size: int = IMAGE_SIZE) -> None:
    """A sparse file of ``size`` bytes at ``path`` (replacing any file there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as image:
        image.truncate(size)


def attach(image: Path) -> str:
    """Attach ``image`` to a free loop device and return the device's path."""
    return _run(["losetup", "--find", "--show", str(image)]).strip()


def attached_to(image: Path) -> list[str]:
    """The loop devices backed by ``image`` now (``losetup -j``)."""
    if not image.exists():
        return []
    out = _run(["losetup", "--associated", str(image), "--output", "NAME", "--noheadings"])
    return [line.strip() for line in out.splitlines() if line.strip()]


def detach(devices: Iterable[str], image: Path) -> None:
    """Detach each device that is still backed by ``image`` (a device reused since is left)."""
    for device in sorted(set(devices)):
        if device in attached_to(image):
            _run(["losetup", "--detach", device])


def make_ext4(device: str, directories: Iterable[str] = ("spool",)) -> None:
    """Make an ext4 filesystem on ``device`` holding the given (empty) top-level directories."""
    with tempfile.TemporaryDirectory(prefix="hamta-lab-fs-") as root:
        for name in directories:
            os.mkdir(Path(root, name), 0o755)
        _run(["mkfs.ext4", "-q", "-F", "-L", "hamta-spool", "-d", root, device])


def device_number(device: str) -> tuple[int, int] | None:
    """The (major, minor) numbers of a block device, as /proc/PID/mountinfo shows them."""
    try:
        st = os.stat(device)
    except FileNotFoundError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def mounted_in(pid: int, device: tuple[int, int]) -> bool:
    """Whether process ``pid`` sees a filesystem of ``device`` mounted (its mount namespace)."""
    wanted = f"{device[0]}:{device[1]}"
    try:
        with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="replace") as mountinfo:
            return any(line.split(" ", 3)[2] == wanted for line in mountinfo)
    except (FileNotFoundError, ProcessLookupError):
        return False
