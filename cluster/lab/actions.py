"""What tests, benchmarks and the chaos suite do to a lab: send mail, kill or fence a node."""

from __future__ import annotations

import json
import signal
import subprocess
from datetime import UTC, datetime

from cluster.lab import client, processes
from cluster.lab.fence import FenceError, fence_node
from cluster.lab.inspection import Inspection
from cluster.lab.results import SendResult
from cluster.lab.site import LabError, LabSite, Launcher
from cluster.lab.submission import SUBMISSION_PORT, SUBMISSIONS_PORT, SubmissionFiles
from cluster.lab.topology import CLIENT, INTERFACE, PAIR_CLUSTER, SMTP_PORT


class Actions:
    """Mail from the client, and the power switch: kill or fence a node."""

    def __init__(self, site: LabSite, launcher: Launcher, inspection: Inspection) -> None:
        self._site = site
        self._launcher = launcher
        self._inspection = inspection

    def send(
        self,
        count: int,
        *,
        size: int = 1024,
        domain: str = "a.lab.test",
        timeout: float = 30.0,
        connections: int = 1,
        submission: int | None = None,
        password: str | None = None,
        sender: str | None = None,
        pair: str = PAIR_CLUSTER,
    ) -> SendResult:
        """Send ``count`` messages from the client namespace to the virtual IP (of ``pair``),
        port 25.

        ``submission`` (587 or 465): to that port instead, logged in with the lab's probe
        account (``password`` instead of its own, to see a refusal); ``sender``: the envelope
        sender instead of the account's.
        """
        site = self._site
        site.check_pair(pair)
        extra: list[str] = []
        if submission is not None:
            if submission not in (SUBMISSION_PORT, SUBMISSIONS_PORT):
                raise LabError(f"submission is on {SUBMISSION_PORT} or {SUBMISSIONS_PORT}")
            extra = ["--account", str(SubmissionFiles(site.directory).account)]
            extra += ["--implicit-tls"] if submission == SUBMISSIONS_PORT else []
            extra += ["--password", password] if password is not None else []
        extra += ["--sender", sender] if sender is not None else []
        argv = client.command(
            site.python,
            f"{site.topology.pair_vip(pair).ip}:{submission or SMTP_PORT}",
            count,
            size=size,
            domain=domain,
            timeout=timeout,
            connections=connections,
            submission=extra,
        )
        try:
            # Each SMTP command has its own limit (10 s) after the last message is started.
            done = self._inspection.exec(CLIENT, argv, timeout=timeout + 30.0, env=site.env())
        except subprocess.TimeoutExpired:
            raise LabError(f"the lab's client did not finish within {timeout + 30:g}s") from None
        try:
            return client.outcome(done)
        except ValueError as exc:
            raise LabError(f"the lab's client failed: {exc}") from None

    def kill_node(self, node: str, sig: int = signal.SIGKILL) -> None:
        """Signal every process of ``node`` (agent and relay); with SIGKILL, wait until gone."""
        self._site.check_node(node)
        pids = self._inspection.node_pids(node)
        processes.send_signal(pids, sig)
        if sig == signal.SIGKILL:
            # A process forked while the others were being killed escapes the first round.
            for _ in range(5):
                left = processes.wait_gone(pids, 10.0)
                if left:
                    raise LabError(f"processes {sorted(left)} of {node} outlived SIGKILL")
                pids = self._inspection.node_pids(node)
                if not pids:
                    break
                processes.send_signal(pids, sig)
        self._launcher.reap()

    def fence(self, node: str) -> None:
        """The lab's STONITH, power-off only: SIGKILL every process of ``node``, drop its VIP.

        The agents' fencing hook runs the same (``python -m cluster.lab.fence``) against the
        former active node before taking over; on real machines this would be a power switch,
        IPMI or a hypervisor. Starting its agent powers the node on again.
        """
        site = self._site
        pair = site.pair_of(node)
        # Pair 1's egress addresses go with its VIP; the extra pairs have none.
        egress = site.topology.egress if pair == PAIR_CLUSTER else ()
        try:
            fence_node(
                site.namespace(node),
                str(site.topology.pair_vip(pair)),
                INTERFACE,
                site.pair_loop_device(pair) or None,
                [str(address) for address, _ in egress],
            )
        except FenceError as exc:
            raise LabError(f"cannot fence {node}: {exc}") from None
        # The power switch's own record: nothing on the node can log its power-off, and a
        # checker that believes a release only when a log says so (chaos.holds) must see it.
        record = {
            "ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "event": "PoweredOff",
            "node": node,
            "by": "lab",
        }
        with open(site.power_log, "a") as log:
            log.write(json.dumps(record) + "\n")
