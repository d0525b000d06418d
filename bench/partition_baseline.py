"""The chaos suite's partition scenarios against keepalived + Postfix, for comparison.

``python bench/partition_baseline.py`` (as root) builds a lab of its own without hamta's agents,
runs the do-it-yourself pair of ``bench/baseline.py`` (keepalived moves the VIP, notify scripts
fsck, mount and start Postfix) and injects the chaos suite's ``partition-zk`` and
``partition-node`` cuts (``cluster.lab.partitions``) under the same continuous load, with the
same split-brain sampler (two holders of the VIP, of the shared disk's mount or of port 25 at
one instant). It prints a line per scenario and ends with one JSON line: a list of per-scenario
results for ``chaos.report.write_html(baseline=...)``. keepalived knows no ZooKeeper and no
fencing, so a node cut off from the other keeps the address while the other takes it too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from baseline import BaselineError, KeepalivedPostfix
from relay import shielded

from cluster.lab import partitions
from cluster.lab.history import LoadRun, check, unavailability
from cluster.lab.lab import Lab, LabError
from cluster.lab.sampler import Sampler
from cluster.lab.topology import CLIENT, DOMAIN, NODES

# The chaos suite's scenario → the cut it injects, and whether its outage is counted from the
# moment the rules apply (as chaos.faults.PartitionNode does) rather than from just before.
SCENARIOS = {
    "partition-zk": (partitions.cut_from_zookeeper, False),
    "partition-node": (partitions.cut_off, True),
}
CUT_FOR = 12.0  # seconds: four times keepalived's dead interval (3 adverts of 1 s, plus skew)


def _sampled(violations: list[str], what: str) -> int:
    return sum(1 for line in violations if f" {what} held by " in line)


def run_scenario(lab: Lab, pair: KeepalivedPostfix, name: str, directory: Path) -> dict[str, Any]:
    """One partition under load against the pair; what the sampler and the checker saw."""
    active = next(node for node in NODES if pair.state(node) == "master")
    cut, from_the_cut = SCENARIOS[name]
    sampler = Sampler(lab)
    load = LoadRun(lab, directory / f"{name}.jsonl", rate=20, connections=4)
    sampler.start()
    try:
        time.sleep(2.0)  # load before the fault
        fault_at = time.monotonic()
        try:
            cut(lab, active)
        except LabError as exc:
            return {"scenario": name, "system": "keepalived+Postfix", "error": str(exc)}
        if from_the_cut:
            fault_at = time.monotonic()
        time.sleep(CUT_FOR)  # the partition itself: what the pair does meanwhile is the result
        partitions.lift(lab, active)
        time.sleep(5.0)  # VRRP settles: one master again
    finally:
        attempts = load.stop()
        sampler.stop()
    time.sleep(5.0)  # Postfix delivers what it acknowledged
    verdict = check(attempts, load.delivered_ids())
    interval = sampler.interval
    vip, spool, smtp = (_sampled(sampler.violations, what) for what in ("vip", "spool", "smtp"))
    return {
        "scenario": name,
        "system": "keepalived+Postfix",
        "split_brain": bool(vip or spool or smtp),
        "two_vip_holders_s": round(vip * interval, 2),
        "two_mounts_s": round(spool * interval, 2),
        "two_smtp_listeners_s": round(smtp * interval, 2),
        "refused_s": round(unavailability(attempts, fault_at), 3),
        "acked": verdict.acked,
        "lost": len(verdict.lost),
        "note": "no ZooKeeper, no fencing: a cut-off node keeps the VIP while its peer takes it"
        if vip
        else "nothing changed hands",
    }


def main(argv: list[str] | None = None) -> int:
    """Build the lab, run the baseline pair through the partitions, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", default="hpb", help="the lab's namespace prefix")
    parser.add_argument("--subnet", default="198.18.7.0/24", help="the lab's addresses")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="hamta-partition-baseline-"))
    workdir.chmod(0o755)  # Postfix (user postfix) reaches its queue below it
    lab = Lab(workdir / "lab", prefix=args.prefix, subnet=args.subnet)
    results = []
    try:
        lab.down()
        lab.up(wait=120.0, agents=False, monitors=False)
        pair = KeepalivedPostfix(
            lab,
            workdir / "baseline",
            dead_domain=f"{CLIENT}.{DOMAIN}",
            dead_host=lab.address(CLIENT),
        )
        try:
            pair.prepare()
            pair.up(120.0)
            for name in SCENARIOS:
                result = run_scenario(lab, pair, name, workdir)
                print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
                results.append(result)
        finally:
            with shielded():
                pair.stop()
    except (LabError, BaselineError) as exc:
        print(f"partition baseline: {exc}", file=sys.stderr)
        return 1
    finally:
        lab.down()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
