"""bench/fuzz.py end to end, briefly: a real relay, sink and dnsmasq, its findings and JSON line.

The fuzzer is judged by what it reports. A relay whose relay networks leave out the canary's
address refuses the canary's valid message while /health/ready says ready: the run must report
that (so the watchdog's checks can fail), write the finding with its seed and transcripts, and
still end with its JSON line. A valid session replayed alone must report nothing (no false
alarms), and sessions must be reproducible from their seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "fuzz.py"
sys.path.insert(0, str(BENCH.parent))
from fuzz_grammar import MUTATIONS, session  # noqa: E402

# A session the grammar leaves valid (no mutation): EHLO, MAIL, RCPT, DATA, a message, QUIT.
VALID_SESSION = "0x9"


def run_fuzz(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run bench/fuzz.py with ``args``; the process and its last line's JSON."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, str(BENCH), "--out", str(tmp_path / "out"), "--deadline", "3", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr
    figures: dict[str, Any] = json.loads(lines[-1])
    return done, figures


def test_a_refused_canary_is_a_finding_with_seed_and_transcripts(tmp_path: Path) -> None:
    done, figures = run_fuzz(
        tmp_path,
        "--minutes",
        "0.1",
        "--clients",
        "2",
        "--seed",
        "7",
        "--canary-interval",
        "1",
        "--relay-networks",
        "192.0.2.0/24",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert figures["bench"] == "fuzz" and figures["seed"] == 7
    assert figures["sessions"] > 0 and figures["commands"] > 0 and figures["canaries"] > 0
    assert figures["findings"].get("canary_refused", 0) > 0, figures
    found = [
        json.loads(path.read_text())
        for path in sorted((tmp_path / "out" / "findings").glob("*/finding.json"))
    ]
    refused = [f for f in found if f["kind"] == "canary_refused"]
    assert refused and refused[0]["run_seed"] == 7
    assert "554 5.7.1" in refused[0]["detail"]
    transcripts = (tmp_path / "out" / "findings").glob("*-canary_refused/transcripts.txt")
    assert any("# session " in path.read_text() for path in transcripts)


def test_a_valid_session_replayed_alone_reports_nothing(tmp_path: Path) -> None:
    done, figures = run_fuzz(tmp_path, "--replay", VALID_SESSION)
    assert done.returncode == 0, done.stdout + done.stderr
    assert figures["findings"] == {} and figures["sessions"] == 1
    assert figures["outcomes"] == {"done": 1} and figures["canaries"] == 1
    assert "250 2.0.0 Ok: queued as" in done.stdout


def test_sessions_are_reproducible_and_cover_every_mutation() -> None:
    assert session(0x9) == session(0x9)
    assert session(0x9)[1] == []  # VALID_SESSION stays valid
    applied: set[str] = set()
    for seed in range(3000):
        steps, mutations = session(seed)
        assert steps == session(seed)[0]
        applied.update(mutations)
    expected = {
        "bytes",
        "utf8",
        "inject-ehlo",
        "inject-helo",
        "inject-mail",
        "inject-rcpt",
        "odd-ehlo",
        "path",
        "overlong",
        "line-end",
        "command",
        "rcpt-flood",
        "pipeline",
        "starttls",
        "data-hazard",
        "data-big",
        "drip",
        "disconnect",
        "disconnect-data",
        "truncate",
    }
    assert applied == expected
    assert len(MUTATIONS) == 16
