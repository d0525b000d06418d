"""How soon HAProxy sends clients to the new active node after a failover.

``python bench/haproxy_switch.py [--runs N] [--prefix P --subnet S]`` (as root) builds a lab of
its own with HAProxy on the client host (``hamta lab up --haproxy``: TCP mode in front of both
nodes' SMTP, ``option httpchk GET /active`` against each agent's API every 200 ms), then N
times: kill -9 the active node, time until the other node's /active answers 200 and until an
SMTP client through HAProxy is greeted by it (``cluster.lab.haproxy.measure_switch``), and start
the killed node again as the passive one. It prints a line per run and ends with one JSON line:
``haproxy_switch_s`` (median, kill to HAProxy's switch), ``active_s`` (median, kill to the new
node serving), ``lag_s`` (median of their difference: HAProxy's own part) and every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from cluster.lab import probes
from cluster.lab.haproxy import CHECK_INTERVAL_MS, measure_switch
from cluster.lab.lab import Lab, LabError
from cluster.lab.topology import API_PORT, CLIENT


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prefix", default="hbh", help="the lab's namespace prefix")
    parser.add_argument("--subnet", default="198.19.182.0/24", help="inside 198.18.0.0/15")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="haproxy-switch-"))
    lab = Lab(directory / "lab", prefix=args.prefix, subnet=args.subnet)
    runs: list[dict[str, Any]] = []
    try:
        lab.up(wait=120.0, monitors=False, haproxy=True)
        client = lab.namespace(CLIENT)
        for run in range(1, args.runs + 1):
            active = lab.wait_active()
            switch = measure_switch(lab.topology, client, lab.kill_node, active)
            runs.append(
                {
                    "from": switch.old,
                    "to": switch.new,
                    "active_s": round(switch.active_s, 3),
                    "haproxy_switch_s": round(switch.switch_s, 3),
                    "lag_s": round(switch.switch_s - switch.active_s, 3),
                }
            )
            print(
                f"run {run}: {switch.old} killed; {switch.new} serving after "
                f"{switch.active_s:.3f}s, HAProxy sends clients there after {switch.switch_s:.3f}s",
                flush=True,
            )
            lab.start_agent(active)  # back as the passive node for the next run
            address = lab.address(active)

            def passive(address: str = address) -> bool:
                body = probes.http_json(client, address, API_PORT, "/passive") or {}
                return body.get("role") == "passive"

            if not probes.wait_for(passive, 60):
                raise LabError(f"{active} did not come back as the passive node")
    except (LabError, TimeoutError) as exc:
        print(f"haproxy_switch: {exc}", file=sys.stderr)
        return 1
    finally:
        lab.down()
    print(
        json.dumps(
            {
                "check_interval_ms": CHECK_INTERVAL_MS,
                "haproxy_switch_s": statistics.median(r["haproxy_switch_s"] for r in runs),
                "active_s": statistics.median(r["active_s"] for r in runs),
                "lag_s": statistics.median(r["lag_s"] for r in runs),
                "runs": runs,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
