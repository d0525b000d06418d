"""The split-brain sampler: who holds the virtual IP, the spool and port 25, every 50 ms.

It looks from outside, as an auditor would: the addresses on each node's ``eth0``, the mounts of
the shared disk in each node's processes, and the listening sockets of each node's processes.
Two holders of any of them at one instant is split brain.

One look reads the nodes one after the other, and on a loaded machine the reads of one look can
be a second apart: node1 seen holding the VIP, then node1 hands over and node2 takes it, then
node2 seen holding it, is one look that shows two holders at no instant. So an overlap counts
only when it is proven: a node seen holding at two reads in a row of its own, and another node
seen holding at a read between them (a node that let go cannot hold again so soon: the other
took over meanwhile, and it would have to let go first). Overlaps shorter than a look are missed
by that rule; hamta's split brain would last for seconds. The looks that only suggest one are
kept in ``unproven``, for the record.
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


def proven_overlap(reads: list[tuple[str, bool]]) -> list[str]:
    """Nodes proven to hold at one instant, from ``reads`` in the order they were made: a read
    of a holder that falls between two reads of another node that saw it holding both times."""
    for at, (node, held) in enumerate(reads):
        if not held:
            continue
        for other in {name for name, _ in reads} - {node}:
            before = [h for name, h in reads[:at] if name == other]
            after = [h for name, h in reads[at + 1 :] if name == other]
            if before and after and before[-1] and after[0]:
                return sorted((node, other))
    return []


class Sampler:
    """Samples who holds what, in a thread, and remembers every instant of split brain.

    ``violations`` holds one line per offending sample: the monotonic time, what, and who.
    """

    def __init__(self, lab: Lab, interval: float = 0.05) -> None:
        self.lab = lab
        self.interval = interval
        self.samples = 0
        self.violations: list[str] = []
        self.unproven: list[str] = []  # two holders in one look, not proven simultaneous
        # Per resource, the reads of the last look: (node, held), in the order they were made.
        self._last: dict[str, list[tuple[str, bool]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="split-brain-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                vip = self.lab.vip_holders()
                mounted = self.lab.spool_mounted_on()
                listening = [node for node in self.lab.nodes if listening_for_smtp(self.lab, node)]
            except Exception:  # a namespace or process vanished under the sample: take the next
                self._last.clear()  # a look missing: the next one proves nothing with the last
                continue
            self.samples += 1
            now = f"{time.monotonic():.3f}"
            for what, holders in (("vip", vip), ("spool", mounted), ("smtp", listening)):
                reads = [(node, node in holders) for node in self.lab.nodes]
                if len(holders) > 1:
                    self.unproven.append(f"{now} {what} held by {holders} in one look")
                proven = proven_overlap(self._last.get(what, []) + reads)
                if proven:
                    self.violations.append(f"{now} {what} held by {proven} at once")
                self._last[what] = reads

    def start(self) -> None:
        """Start sampling in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        self._thread.join()
