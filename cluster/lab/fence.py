"""The lab's STONITH, lean enough for the failover's critical path.

``python -m cluster.lab.fence --namespace hamta-node1 --vip 198.18.0.100/24`` powers the node
off: it SIGKILLs every process in that node's network namespace (agent, relay, workers,
watchdog; a frozen process dies as well), which also ends the node's mount namespaces and so
unmounts its spool, and takes the virtual IP off its ``eth0``. The node stays off until it is
started again (``hamta lab start NODE``), as after a fence agent's "off" action.

On real machines this is a power switch, IPMI or a hypervisor; in the lab the nodes share a
kernel, so ending every process and dropping the address is what "powered off" means. It imports
only the standard library and runs ``ip`` once: the agents run it before every takeover, and a
second spent importing libraries would be a second of outage.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_GONE_WITHIN = 5.0


class FenceError(Exception):
    """The node could not be fenced; the message says what survived."""


def processes_in(namespace: str) -> list[int]:
    """Pids of the processes whose network namespace is ``/run/netns/<namespace>``."""
    try:
        wanted = os.stat(f"/run/netns/{namespace}")
    except FileNotFoundError:
        raise FenceError(f"no network namespace {namespace}") from None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            net = os.stat(entry / "ns" / "net")
        except OSError:
            continue
        if (net.st_dev, net.st_ino) == (wanted.st_dev, wanted.st_ino):
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_released(device: str, timeout: float) -> None:
    """Wait until nobody has ``device`` mounted: the last process of a mount namespace frees it
    only as that namespace is torn down, a little after the process is gone."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(device, os.O_RDONLY | os.O_EXCL)  # EBUSY while mounted anywhere
        except OSError as exc:
            if time.monotonic() > deadline:
                raise FenceError(f"{device} still in use: {exc.strerror}") from None
            time.sleep(0.01)  # the kernel's deferred teardown sends no event
            continue
        os.close(fd)
        return


def fence_node(
    namespace: str,
    vip: str,
    interface: str = "eth0",
    device: str | None = None,
    also: Sequence[str] = (),
) -> list[int]:
    """Power ``namespace``'s node off: kill all its processes, drop the VIP and the addresses
    ``also`` (the egress addresses, as /32); the pids killed.

    With ``device`` (the shared disk), a node that had it mounted is fenced only once the disk
    is free again, as it would be on a machine that is off.
    """
    victims = [pid for pid in processes_in(namespace) if pid != os.getpid()]
    # Only a node that has the disk mounted is waited for: its peer may hold it legitimately.
    # A node whose last process has just exited (its watchdog, after ending the agent's
    # session) shows no mount any more while its namespace is still being torn down.
    held = bool(device) and (_mounts(victims, device or "") or _orphaned(device or "", victims))
    killed: list[int] = []
    # A process forked while the others were being killed escapes a round: kill until none.
    for _ in range(5):
        if not victims:
            break
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + _GONE_WITHIN
        while (left := [pid for pid in victims if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.005)  # a SIGKILLed process is gone within milliseconds; no event for it
        if left:
            raise FenceError(f"processes {left} in {namespace} outlived SIGKILL")
        killed += victims
        victims = [pid for pid in processes_in(namespace) if pid != os.getpid()]
    for address in (vip, *(a if "/" in a else f"{a}/32" for a in also)):
        done = subprocess.run(
            ["ip", "-n", namespace, "address", "del", address, "dev", interface],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        absent = "Cannot assign" in done.stderr or "Address not found" in done.stderr
        if done.returncode != 0 and not absent:
            raise FenceError(f"cannot remove {address} from {namespace}: {done.stderr.strip()}")
    if held and device:
        _wait_released(device, _GONE_WITHIN)
    return killed


def _orphaned(device: str, victims: Sequence[int]) -> bool:
    """Whether ``device`` is busy although no process outside ``victims`` has it mounted: a
    mount namespace whose last process is gone but whose teardown has not released it yet."""
    try:
        os.close(os.open(device, os.O_RDONLY | os.O_EXCL))
        return False  # free
    except OSError:
        pass
    others = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and int(entry.name) not in victims
    ]
    return not _mounts(others, device)


def _mounts(pids: Sequence[int], device: str) -> bool:
    """Whether one of ``pids`` sees ``device`` mounted (in its own mount namespace)."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return False
    wanted = f"{os.major(rdev)}:{os.minor(rdev)}"
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        except OSError:
            continue
        if any(line.split()[2] == wanted for line in lines if len(line.split()) > 2):
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cluster.lab.fence``: exit 0 once the node serves no mail and holds no VIP."""
    parser = argparse.ArgumentParser(prog="python -m cluster.lab.fence", description=__doc__)
    parser.add_argument("--namespace", required=True, help="the node's network namespace")
    parser.add_argument("--vip", required=True, help="the virtual IP with its prefix length")
    parser.add_argument(
        "--also", action="append", default=[], help="another address to remove (egress)"
    )
    parser.add_argument("--interface", default="eth0")
    parser.add_argument("--device", help="the shared disk: wait until the node's mount is gone")
    args = parser.parse_args(argv)
    try:
        killed = fence_node(args.namespace, args.vip, args.interface, args.device, args.also)
    except (FenceError, OSError, subprocess.SubprocessError) as exc:
        print(f"fence: {exc}", file=sys.stderr)
        return 1
    print(f"fenced {args.namespace}: {len(killed)} process(es) killed, {args.vip} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
