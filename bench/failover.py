#!/usr/bin/env python3
"""Failover benchmark: hamta's cluster agent against keepalived + Postfix, under load, in the lab.

What is measured
    A lab of its own (prefix ``hbf``, subnet 198.18.8.0/24 unless told otherwise, in a temporary
    directory) is built: three ZooKeeper servers, two nodes, a shared ext4 loop device, a client,
    DNS and a recording sink (``cluster/lab``). Then, for hamta:

    1. ``--queued`` messages (10,000) are queued on the active node for ``client.lab.test``, a
       name the lab's DNS resolves (no MX: its address is the implicit MX) to the client host,
       where nothing listens on port 25: every delivery attempt is refused, the mail stays in the
       spool on the shared disk, and every new active node must recover it;
    2. a continuous load (``cluster.lab.load``: 20 attempts/s over 8 sessions, one message each,
       to ``a.lab.test``, i.e. the sink) runs through the virtual IP for the rest of the part.
       Eight sessions, not two: each session waits for its attempt to end, and a connect sent
       while the virtual IP moves (hamta's fence has taken it off the dead node, the new node's
       gratuitous ARP has not arrived yet) is lost and waits out the client's 1 s connect
       timeout; with two sessions both may be stuck so, and the RTO would grow by a second that
       says more about the client than about the failover. With eight, the others keep trying
       at their pace;
    3. ``--iterations`` times: the active node is killed (SIGKILL to every process of its
       namespace: agent and relay), ``t`` being when the kill has ended (every process gone);
       the **RTO** is the time from ``t`` to the end of the first attempt, started after ``t``,
       that got 250 (``cluster.lab.history.recovery_time``).
       The new active node's agent log gives the detection time (kill to the decision to
       promote), the time lost to promotions that were abandoned ("retry", each one printed
       with the agent's reason and counted as an anomaly) and every step's seconds of the one
       that succeeded (its ``Decision`` line with role "active").
       The killed node's agent is started again, and the next kill waits until it is passive
       and ``agent.min_failover_interval`` has passed since the takeover (automatic takeovers
       closer than that are delayed by design, which would be measured instead);
    4. a planned switchover (``hamta cluster switchover``) under the same load, measured as the
       clients' unavailability (first failed attempt to the next 250) and as the command's time;
    5. the load stops, its acknowledged messages must all reach the sink (``check``: lost is
       acknowledged and never delivered).

    Then the baseline (bench/baseline.py), on the same lab after hamta's agents are stopped:
    keepalived (VRRP, advert_int 1, nopreempt) on both nodes with notify scripts that fsck and
    mount the shared device and start a private Postfix (queue on the device, listening on the
    virtual IP, relaying to the sink) on MASTER, and stop and unmount on anything else. The same
    deep queue, the same load, the same kills (every process of the node: keepalived, Postfix, a
    notify script under way), the same RTO measure and the same pace between kills.

    Both relays keep their deep queue quiet for the run: hamta's ``retry.first_delay`` is set to
    30 minutes in the lab's relay.toml (with the lab's own 1-10 s retries the relay would retry
    10,000 messages about a thousand times a second, on the same two cores as the measurement)
    and Postfix's ``minimal_backoff_time`` likewise. Runs longer than 30 minutes
    see both retry their queues once.

On the Vagrant cluster (``--cluster vagrant``)
    The same measurement on real machines: the Vagrant cluster (``vagrant/``: mx1 and mx2 with
    real DRBD, the arbiter with the third ZooKeeper server and the MX sink) is brought up from a
    network namespace with a libvirtd of its own (``cluster.lab.vagrant``), provisioned by
    ``ansible/site.yml``. ``--queued`` messages (200) for a domain nobody resolves stay queued;
    the load runs from the host through the virtual IP to ``example.test`` (the arbiter's sink);
    a kill is ``virsh destroy`` of the active machine (its power cut, the peer's STONITH is
    libvirt's too); phases come from the new active node's journal; the killed machine is booted
    again and waited for as the passive node. No baseline. Vagrant's ``hamta/bookworm`` box is
    built first (``vagrant/build-box``, as ``pytest -m vagrant`` does) if Vagrant lacks it; a
    host without Vagrant is told to run ``scripts/bootstrap --vagrant``. The cluster is
    destroyed at the end and everything libvirt made is removed. Under plain qemu (TCG, the
    default here: KVM guests may hang when nested) expect about half an hour for 5 iterations.

Output
    Every failover as it happens, then a table (RTO min / median / p95 / max for hamta and the
    baseline, mean time of each promotion step, switchover, acknowledged and lost), and last one
    JSON line with the figures. The lab is always taken down (on error and Ctrl-C too).

Where it is
    This file is the command line and the run's lifecycle; the rest lives beside it:
    ``failover_parts`` (each part: hamta in the lab, on the Vagrant cluster, the baseline),
    ``failover_pairs`` (the pairs it kills and the takeover's phases from their logs),
    ``failover_measure`` (the kills and the switchover), ``failover_load`` (the continuous client
    and its verdict), ``failover_report`` (the figures, the table, the JSON line) and
    ``failover_common`` (the error, the output, the waits, the timeouts).

Usage (as root)
    .venv/bin/python bench/failover.py [--iterations 20] [--queued 10000] [--no-baseline]
        [--rate 20] [--connections 8] [--keep] [--workdir DIR] [--prefix hbf]
        [--subnet 198.18.8.0/24] [--cluster lab]
    .venv/bin/python bench/failover.py --cluster vagrant [--iterations 5] [--driver qemu|kvm]
        [--namespace hvg0] [--queued 200] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from baseline import BaselineError
from failover_common import DEFAULT_PREFIX, DEFAULT_SUBNET, VAGRANT_QUEUED, BenchError, say
from failover_measure import PartResult
from failover_parts import run_baseline, run_hamta, run_vagrant
from failover_report import figures, report
from relay_common import shielded

import cluster
from cluster.config import ConfigError
from cluster.lab.lab import Lab, LabError
from cluster.lab.vagrant import NAMESPACE as VAGRANT_NAMESPACE
from cluster.lab.vagrant import VagrantCluster, VagrantError


def take_down(lab: Lab, attempts: int = 3) -> None:
    """``lab.down()``, again after a pause if a process was still exiting (a notify script's
    umount ends with its mount namespace)."""
    for attempt in range(attempts):
        try:
            lab.down()
            return
        except LabError as exc:
            if attempt + 1 == attempts:
                raise
            say(f"  lab down: {exc}; trying again")
            time.sleep(1.0)


_forked = False  # set in a fork of this process by the hook below, never in the benchmark


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if _forked:
        # A fork of this process (pyroute2 forks to enter namespaces, and ends its forks with
        # SIGTERM) must exit, never unwind through the benchmark's finally blocks.
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def _in_fork() -> None:
    global _forked  # noqa: PLW0603 - a flag only a fork's own memory ever sees set
    _forked = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def run(args: argparse.Namespace, out: IO[str]) -> int:
    """The whole benchmark; prints the JSON line to ``out``; the exit status."""
    started = time.monotonic()
    if os.geteuid() != 0:
        raise BenchError("needs root: network namespaces, a loop device, mounts")
    base = Path(tempfile.mkdtemp(prefix="hamta-bench-failover-", dir=args.workdir))
    base.chmod(0o755)  # Postfix's unprivileged daemons reach their queue below it
    if args.cluster == "vagrant":
        return run_on_vagrant(args, out, base, started)
    lab = Lab(base / "lab", prefix=args.prefix, subnet=args.subnet)
    say(f"lab directory: {lab.directory}")
    say(f"load average before the run: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    hamta = PartResult("hamta")
    baseline: PartResult | None = None
    missing: str | None = "--no-baseline" if args.no_baseline else None
    ok = True
    try:
        try:
            run_hamta(lab, args, hamta)
        except (BenchError, LabError, OSError, subprocess.SubprocessError) as exc:
            hamta.error = str(exc)
            ok = False
            say(f"hamta: FAILED: {exc}")
        if not args.no_baseline and hamta.error is not None:
            missing = "not run: hamta's part failed"
        elif not args.no_baseline:
            baseline = PartResult("baseline")
            try:
                run_baseline(lab, args, baseline, base / "baseline")
            except (BaselineError, BenchError, LabError, OSError, subprocess.SubprocessError) as e:
                baseline.error = str(e)
                missing = f"failed: {e}"
                ok = False
                say(f"baseline: FAILED: {e}")
    except KeyboardInterrupt:
        say("interrupted; taking the lab down")
        ok = False
        missing = missing or "interrupted"
    finally:
        with shielded():
            try:
                take_down(lab)
            except LabError as exc:
                say(f"lab down FAILED: {exc}")
                ok = False
            if args.keep:
                say(f"kept {base}")
            else:
                shutil.rmtree(base, ignore_errors=True)
    for part in (hamta, baseline):
        if part is not None and part.verdict is not None and not part.verdict.ok:
            ok = False
    data = figures(args, hamta, baseline, missing, ok, time.monotonic() - started)
    report(hamta, baseline, data)
    print(json.dumps(data), file=out, flush=True)
    return 0 if ok else 1


def run_on_vagrant(args: argparse.Namespace, out: IO[str], base: Path, started: float) -> int:
    """The benchmark on the Vagrant cluster; always destroyed afterwards, like the lab."""
    checkout = Path(cluster.__file__).resolve().parent.parent
    workdir = args.reuse or base / "vagrant"
    machines = VagrantCluster(checkout, workdir, namespace=args.namespace, driver=args.driver)
    say(f"work directory: {machines.workdir}")
    say(f"load average before the run: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    hamta = PartResult("hamta")
    missing = "not on the Vagrant cluster (the baseline runs in the lab)"
    ok = True
    try:
        say(machines.ensure_box())  # as pytest -m vagrant: Vagrant's catalog has no such box
        if args.reuse is None or not machines.attach():
            machines.start_host()
        run_vagrant(machines, args, hamta)
    except (BenchError, VagrantError, ConfigError, OSError, subprocess.SubprocessError) as exc:
        hamta.error = str(exc)
        ok = False
        say(f"hamta: FAILED: {exc}")
    except KeyboardInterrupt:
        say("interrupted; destroying the cluster")
        ok = False
    finally:
        with shielded():
            if args.keep_cluster:
                say(
                    f"cluster kept up; reuse it with HAMTA_VAGRANT_WORKDIR={machines.workdir} "
                    "pytest -m vagrant, which destroys it at the end"
                )
            else:
                with contextlib.suppress(VagrantError):
                    machines.destroy()
                problems = machines.stop_host()
                if problems:
                    say(f"cluster down: left {problems}")
                    ok = False
            if args.keep or args.keep_cluster:
                say(f"kept {base}")
            else:
                shutil.rmtree(base, ignore_errors=True)
    if hamta.verdict is not None and not hamta.verdict.ok:
        ok = False
    data = figures(args, hamta, None, missing, ok, time.monotonic() - started)
    data["cluster"] = "vagrant"
    data["error"] = hamta.error  # why the figures are null, in the JSON line too
    data["driver"] = machines.driver
    report(hamta, None, data)
    print(json.dumps(data), file=out, flush=True)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``bench/failover.py``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20, help="kills per pair")
    parser.add_argument(
        "--queued",
        type=int,
        default=None,
        help=f"messages in the deep queue (10000 in the lab, {VAGRANT_QUEUED} on vagrant)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="hamta only")
    parser.add_argument("--rate", type=float, default=20.0, help="load: attempts per second")
    parser.add_argument("--connections", type=int, default=8, help="load: sessions")
    parser.add_argument("--keep", action="store_true", help="keep the lab directory")
    parser.add_argument("--workdir", type=Path, default=None, help="where the lab directory goes")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="the lab's namespace prefix")
    parser.add_argument("--subnet", default=DEFAULT_SUBNET, help="the lab's subnet")
    parser.add_argument(
        "--fast-takeover",
        choices=("on", "off"),
        default="on",
        help="lab: [agent] fast_takeover (off: the session-expiry path alone, as before)",
    )
    parser.add_argument(
        "--cluster",
        choices=("lab", "vagrant"),
        default="lab",
        help="where to run: the namespace lab, or the Vagrant cluster (vagrant/, real DRBD)",
    )
    parser.add_argument(
        "--driver",
        choices=("qemu", "kvm"),
        default=os.environ.get("HAMTA_VAGRANT_DRIVER") or "qemu",
        help="vagrant: libvirt's domain type (qemu is TCG; KVM guests may hang when nested)",
    )
    parser.add_argument(
        "--namespace", default=VAGRANT_NAMESPACE, help="vagrant: the network namespace to use"
    )
    parser.add_argument(
        "--keep-cluster",
        action="store_true",
        help="vagrant: leave the cluster up (and its work directory) for pytest -m vagrant",
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="vagrant: the work directory of a cluster left up by --keep-cluster",
    )
    args = parser.parse_args(argv)
    if args.queued is None:
        args.queued = VAGRANT_QUEUED if args.cluster == "vagrant" else 10_000
    if args.iterations <= 0 or args.queued < 0 or args.rate <= 0 or args.connections <= 0:
        parser.error("--iterations, --rate and --connections must be positive, --queued >= 0")
    # ^C and SIGTERM unwind through the finally blocks that take the lab down; SIGINT may
    # arrive ignored (started with & from a non-interactive shell), so it is set explicitly.
    # Forks (pyroute2's, into namespaces) get the default handlers back.
    os.register_at_fork(after_in_child=_in_fork)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args, sys.stdout)
    except BenchError as exc:
        say(f"FAILED: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
