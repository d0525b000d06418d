"""bench/monitor_alerts.py --quick end to end: every fault alerted, its JSON line, no leftovers.

As root it makes the namespace hh5mon (198.19.225.0/24) for the port-blocked fault and must
remove it; without root it says it used a closed port instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "monitor_alerts.py"
FAULTS = ("port-blocked", "cert-expired", "mx-changed", "relay-stopped")


def _namespaces() -> str:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return listed.stdout


def _scratch() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("hamta-bench-monitor-*"))


def test_quick_run_alerts_every_fault_and_cleans_up() -> None:
    # Its own scratch directory (a short path: the relay's control socket lives there).
    before = _scratch()
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["quick"] is True and figures["bound_s"] == 2.0
    for fault in FAULTS:
        # Alerted, and not long after interval x threshold (plus a timeout and the tick).
        assert 0 < figures[f"{fault}_alert_s"] < figures["bound_s"] + 3, (fault, figures)
    root = os.geteuid() == 0
    assert figures["blocked_by"].startswith("nftables" if root else "closed port")
    assert figures["load_checks"] == figures["load_up"] == 20
    assert figures["load_cpu_s_per_min"] > 0 and figures["load_max_rss_mib"] > 10
    assert "port blocked by:" in done.stdout and "CPU s/min" in done.stdout
    assert "hh5mon" not in _namespaces()
    # Its scratch directory (peers, dnsmasq, relay spool, monitor store) is gone.
    assert _scratch() == before
