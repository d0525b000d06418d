"""The split-brain sampler: who holds the virtual IP, the spool and port 25, every 50 ms.

It looks from outside, as an auditor would: the addresses on each node's ``eth0``, the mounts of
the shared disk in each node's processes, and the listening sockets of each node's processes.
Two holders of any of them at one instant is split brain.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.lab.lab import Lab


def listening_for_smtp(lab: Lab, node: str) -> bool:
    """Whether some process of ``node`` has a TCP socket listening on port 25."""
    for pid in lab.node_pids(node):
        try:
            table = Path(f"/proc/{pid}/net/tcp").read_text()
        except OSError:
            continue
        for line in table.splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(":0019") and fields[3] == "0A":
                return True
    return False


class Sampler:
    """Samples who holds what, in a thread, and remembers every instant of split brain.

    ``violations`` holds one line per offending sample: the monotonic time, what, and who.
    """

    def __init__(self, lab: Lab, interval: float = 0.05) -> None:
        self.lab = lab
        self.interval = interval
        self.samples = 0
        self.violations: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="split-brain-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                vip = self.lab.vip_holders()
                mounted = self.lab.spool_mounted_on()
                listening = [node for node in self.lab.nodes if listening_for_smtp(self.lab, node)]
            except Exception:  # a namespace or process vanished under the sample: take the next
                continue
            self.samples += 1
            for what, holders in (("vip", vip), ("spool", mounted), ("smtp", listening)):
                if len(holders) > 1:
                    self.violations.append(f"{time.monotonic():.3f} {what} held by {holders}")

    def start(self) -> None:
        """Start sampling in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        self._thread.join()
