"""bench/takeovers.py: the agents' moves counted from their Decision lines (what the failover
benchmark and the soak report as false failovers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from takeovers import Moves, count_moves  # noqa: E402


def decision(ts: str, was: str, role: str, trigger: str = "step_done") -> str:
    line = {"event": "Decision", "ts": ts, "was": was, "role": role, "trigger": trigger}
    return json.dumps(line)


def test_moves_are_counted_from_both_logs_since_a_moment(tmp_path: Path) -> None:
    one, two = tmp_path / "node1.log", tmp_path / "node2.log"
    one.write_text(
        "\n".join(
            [
                decision("2026-12-07T07:00:00.000000Z", "promoting", "active", "promoted"),
                decision("2026-12-07T07:10:00.000000Z", "active", "demoting", "session_lost"),
                "not json",
                json.dumps({"event": "StepDone", "ts": "2026-12-07T07:10:01.000000Z"}),
            ]
        )
    )
    two.write_text(
        "\n".join(
            [
                decision("2026-12-07T07:10:02.000000Z", "passive", "passive", "peer_silent"),
                decision("2026-12-07T07:10:02.300000Z", "passive", "promoting", "peer_fenced"),
                decision("2026-12-07T07:10:03.000000Z", "promoting", "active", "promoted"),
            ]
        )
    )
    logs = [one, two, tmp_path / "absent.log"]
    assert count_moves(logs) == Moves(takeovers=2, demotions=1, silent_fences=1, fast_takeovers=1)
    since = 1_796_627_400.0 - 1  # 2026-12-07T07:10:00Z, less a second
    assert count_moves(logs, since) == Moves(1, 1, 1, 1)
    assert count_moves(logs, since + 10).as_dict() == {
        "takeovers": 0,
        "demotions": 0,
        "silent_fences": 0,
        "fast_takeovers": 0,
    }
