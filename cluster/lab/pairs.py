"""The lab's fleet (``hamta lab up --pairs N``): each pair's root made by the administrator,
and the fleet read with the reader's credentials, both through ``hamta fleet`` as an operator
would run it (docs/fleet.md), from the client host: the ensemble is reachable only inside the
lab's namespaces.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any, Final

from cluster.lab.inspection import Inspection
from cluster.lab.site import LabError, LabSite
from cluster.lab.topology import CLIENT

_TIMEOUT: Final = 30.0


def create_pairs(site: LabSite, inspection: Inspection) -> None:
    """``hamta fleet create-pair`` for every pair, as the ensemble's administrator: each pair's
    root gets its own digest user's ACL and READ for the fleet's reader."""
    for pair in site.topology.pair_names:
        done = _fleet(
            site,
            inspection,
            "create-pair",
            pair,
            "--credentials",
            str(site.admin_credentials_path),
            "--owner",
            str(site.pair_credentials(pair)),
            "--reader",
            str(site.reader_credentials_path),
        )
        if done.returncode != 0:
            raise LabError(f"hamta fleet create-pair {pair} failed: {done.stderr.strip()}")


def fleet_status(site: LabSite, inspection: Inspection) -> dict[str, Any]:
    """``hamta fleet status --json`` with the reader's credentials; LabError if it fails."""
    if site.topology.pairs == 1:
        raise LabError("the lab has one pair and no fleet reader: bring it up with --pairs 2")
    done = _fleet(
        site, inspection, "status", "--json", "--credentials", str(site.reader_credentials_path)
    )
    if done.returncode != 0:
        raise LabError(f"hamta fleet status failed: {done.stderr.strip()}")
    try:
        parsed = json.loads(done.stdout)
    except ValueError as exc:
        raise LabError(f"hamta fleet status: not JSON ({exc}): {done.stdout[:200]!r}") from None
    if not isinstance(parsed, dict):
        raise LabError(f"hamta fleet status: not a JSON object: {done.stdout[:200]!r}")
    return parsed


def fleet_argv(site: LabSite, *args: str) -> list[str]:
    """``hamta fleet ARGS --zookeeper <the lab's ensemble>`` (run in the client namespace)."""
    return site.module_argv(
        "hamtactl", "fleet", *args, "--zookeeper", site.topology.zookeeper_hosts
    )


def _fleet(site: LabSite, inspection: Inspection, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return inspection.exec(CLIENT, fleet_argv(site, *args), timeout=_TIMEOUT, env=site.env())
    except subprocess.TimeoutExpired:
        raise LabError(f"hamta fleet {args[0]} took over {_TIMEOUT:g}s") from None
