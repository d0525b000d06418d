"""The chaos report, on iteration results made by hand and judged by the real checker."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path

import pytest

from chaos.faults import FAULTS
from chaos.holds import Event
from chaos.report import (
    KILL_SCENARIOS,
    MAX_ATTEMPT_MARKS,
    ScenarioSummary,
    nearest_rank,
    render_html,
    summarize,
    summary_line,
    verdict_table,
    write_html,
    write_json_history,
)
from chaos.results import IterationResult, Mark
from chaos.runner import demotions, steady_problems
from cluster.lab.history import Attempt, check

T0 = 5000.0  # the monotonic clock of these made-up runs


def iteration(
    scenario: str,
    number: int,
    *,
    rto: float | None = 2.0,
    attempts: int = 20,
    lost: int = 0,
    duplicated: int = 0,
    failures: Sequence[str] = ("refused", "unknown"),
    split_brain: Sequence[str] = (),
    problems: Sequence[str] = (),
    refused_s: float = 1.5,
    marks: Sequence[Mark] = (),
    heal: float | None = None,
) -> IterationResult:
    """An iteration of ``attempts`` one every 0.5 s from T0, the fault at T0 + 5.

    The attempts right after the fault get the outcomes in ``failures`` (in turn); the first
    ``lost`` acknowledged ones never reach the sink, the next ``duplicated`` reach it twice.
    """
    history = []
    for i in range(attempts):
        start = T0 + 0.5 * i
        outcome = failures[i % len(failures)] if 10 <= i < 10 + len(failures) else "acked"
        code = 451 if outcome == "refused" else (250 if outcome == "acked" else 0)
        history.append(Attempt(f"{scenario}-{number}-{i}", start, start + 0.1, outcome, code))
    acked = [a.id for a in history if a.outcome == "acked"]
    delivered = acked[lost:] + acked[lost : lost + duplicated]
    fault = T0 + 5.0
    return IterationResult(
        scenario=scenario,
        iteration=number,
        seed=1000 + number,
        started=T0,
        fault_at=fault,
        heal_at=None if heal is None else fault + heal,
        ended=T0 + 0.5 * attempts,
        wall_offset=1.7e9,
        verdict=check(history, delivered),
        rto_s=rto,
        refused_s=refused_s,
        split_brain=list(split_brain),
        problems=list(problems),
        marks=list(marks),
        attempts=history,
    )


def figures(summaries: list[ScenarioSummary], name: str) -> ScenarioSummary:
    return next(s for s in summaries if s.scenario == name)


# ------------------------------------------------------------------ summarize


def test_nearest_rank_takes_a_value_some_iteration_had() -> None:
    values = [float(v) for v in range(20, 0, -1)]
    assert nearest_rank(values, 0.95) == 19.0  # rank ceil(19) of 1..20
    assert nearest_rank([3.0, 1.0, 2.0], 0.95) == 3.0
    assert nearest_rank([7.0], 0.95) == 7.0
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    with pytest.raises(ValueError):
        nearest_rank([], 0.95)


def test_summarize_adds_up_each_scenario_in_first_seen_order() -> None:
    results = [
        iteration("kill-node", 1, rto=3.0),
        iteration("partition-zk", 1, rto=None),
        iteration("kill-node", 2, rto=1.0, duplicated=2),
        iteration("kill-node", 3, rto=2.0, refused_s=4.25),
        iteration("partition-zk", 2, rto=None),
    ]
    summaries = summarize(results)
    assert [s.scenario for s in summaries] == ["kill-node", "partition-zk"]

    kill = figures(summaries, "kill-node")
    assert kill.iterations == 3
    assert kill.failed == 0
    assert kill.ok
    assert kill.sent == 60
    assert kill.acked == 54  # 2 failures in each of 3 iterations
    assert kill.refused == 3
    assert kill.unknown == 3
    assert kill.delivered == 54
    assert kill.lost == 0
    assert kill.unexpected == 0
    assert kill.duplicated == 2
    assert kill.recovered == 0
    assert kill.split_brain == 0
    assert (kill.rto_min_s, kill.rto_median_s, kill.rto_p95_s, kill.rto_max_s) == (
        1.0,
        2.0,
        3.0,
        3.0,
    )
    assert kill.rtos == (1.0, 2.0, 3.0)
    assert kill.refused_s_max == 4.25

    zk = figures(summaries, "partition-zk")
    assert zk.iterations == 2
    assert zk.ok
    assert (zk.rto_min_s, zk.rto_median_s, zk.rto_p95_s, zk.rto_max_s) == (None,) * 4
    assert zk.rtos == ()


def test_p95_is_nearest_rank_and_iterations_without_rto_are_left_out() -> None:
    rtos: list[float | None] = [float(v) / 10 for v in range(1, 21)] + [None, None]
    results = [iteration("kill-relay", i, rto=rto) for i, rto in enumerate(rtos)]
    (summary,) = summarize(results)
    assert summary.iterations == 22
    assert summary.rto_min_s == 0.1
    assert summary.rto_p95_s == 1.9
    assert summary.rto_median_s == pytest.approx(1.05)  # an even count: the middle two's mean
    assert summary.rto_max_s == 2.0


def test_a_failing_iteration_fails_its_scenario() -> None:
    results = [
        iteration("kill-agent", 1),
        iteration("kill-agent", 2, lost=3),
        iteration("freeze-node", 1, split_brain=["node1 and node2 both held the VIP at +1.2 s"]),
        iteration("freeze-node", 2, split_brain=["both active"], problems=["agent crashed"]),
        iteration("disk-full", 1, problems=["relay did not come back"]),
        iteration("clock-skew", 1),
    ]
    summaries = summarize(results)
    agent = figures(summaries, "kill-agent")
    assert not agent.ok
    assert agent.failed == 1
    assert agent.lost == 3
    freeze = figures(summaries, "freeze-node")
    assert not freeze.ok
    assert (freeze.failed, freeze.split_brain) == (2, 2)
    assert not figures(summaries, "disk-full").ok
    assert figures(summaries, "clock-skew").ok


def test_unexpected_deliveries_are_counted_and_fail() -> None:
    result = iteration("switchover", 1)
    result.verdict = check(result.attempts, [a.id for a in result.attempts] + ["stranger-1"])
    (summary,) = summarize([result])
    assert summary.unexpected == 1
    assert summary.recovered == 1  # the unknown attempt was delivered all the same
    assert not summary.ok


def test_nothing_to_summarize() -> None:
    assert summarize([]) == []
    assert summary_line([]) == {
        "scenarios": 0,
        "iterations": 0,
        "acked": 0,
        "lost": 0,
        "duplicated": 0,
        "split_brain": 0,
        "demotions": 0,
        "false_failovers": 0,
        "rto_median_s": None,
        "rto_max_s": None,
    }
    assert verdict_table([]).splitlines()[-1].split() == ["TOTAL", *["0"] * 6, "-", "ok"]


# ------------------------------------------------------------------ the table


def test_verdict_table_rows() -> None:
    results = [
        iteration("kill-node", 1, rto=2.31),
        iteration("kill-node", 2, rto=2.95),
        iteration("kill-node", 3, rto=2.46),
        iteration("partition-zk", 1, rto=None, lost=1),
    ]
    table = verdict_table(summarize(results))
    lines = table.splitlines()
    assert lines[0].split()[:8] == [
        "scenario",
        "iterations",
        "sent",
        "acknowledged",
        "delivered",
        "lost",
        "duplicated",
        "RTO",
    ]
    rows = {line.split()[0]: line.split() for line in lines if not line.startswith("-")}
    rto = "2.31/2.46/2.95/2.95"
    assert rows["kill-node"] == ["kill-node", "3", "60", "54", "54", "0", "0", rto, "ok"]
    assert rows["partition-zk"] == ["partition-zk", "1", "20", "18", "17", "1", "0", "-", "FAIL"]
    assert lines[-1].split() == ["TOTAL", "4", "80", "72", "71", "1", "0", rto, "FAIL"]
    # Fixed width: every column's cells end where its header ends.
    assert len({len(line) for line in lines if not line.startswith("-")}) == 1


# ------------------------------------------------------------------ the JSON line


def test_summary_line_prefers_the_kill_scenarios_rto() -> None:
    results = [
        iteration("kill-relay", 1, rto=1.0),
        iteration("kill-node", 1, rto=3.12345),
        iteration("kill-node", 2, rto=None),
        iteration("partition-zk", 1, rto=30.0, split_brain=["both active"]),
        iteration("switchover", 1, rto=0.5, duplicated=1),
        iteration("partition-node", 1, rto=None, lost=2),
    ]
    line = summary_line(results)
    assert set(line) == {
        "scenarios",
        "iterations",
        "acked",
        "lost",
        "duplicated",
        "split_brain",
        "demotions",
        "false_failovers",
        "rto_median_s",
        "rto_max_s",
    }
    assert line["scenarios"] == 5
    assert line["iterations"] == 6
    assert line["acked"] == 6 * 18
    assert line["lost"] == 2
    assert line["duplicated"] == 1
    assert line["split_brain"] == 1
    assert line["rto_median_s"] == 2.062  # kill-relay 1.0 and kill-node 3.12345
    assert line["rto_max_s"] == 3.123
    assert json.loads(json.dumps(line)) == line
    assert set(KILL_SCENARIOS) == {"kill-relay", "kill-agent", "kill-node"}


def test_summary_line_without_kill_scenarios_uses_every_rto() -> None:
    results = [
        iteration("partition-zk", 1, rto=4.0),
        iteration("switchover", 1, rto=1.0),
        iteration("flapping", 1, rto=None),
    ]
    line = summary_line(results)
    assert (line["rto_median_s"], line["rto_max_s"]) == (2.5, 4.0)


def test_summary_line_rto_is_none_when_the_kills_never_recovered() -> None:
    # Falling back on the other scenarios' figures would hide that the failovers never ended.
    results = [iteration("kill-node", 1, rto=None), iteration("switchover", 1, rto=1.0)]
    line = summary_line(results)
    assert (line["rto_median_s"], line["rto_max_s"]) == (None, None)


# ------------------------------------------------------------------ the HTML page


VOID = {"meta", "br", "hr", "img", "input", "link", "wbr", "col", "area", "base"}


class StrictParser(HTMLParser):
    """Checks that every element is closed, innermost first, and collects what the test reads."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.starts: list[tuple[str, dict[str, str | None]]] = []
        self.texts: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.starts.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.starts.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack:
            self.texts.setdefault(self.stack[-1], []).append(data)


def parse(page: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.errors == []
    assert parser.stack == []
    return parser


def sample_results() -> list[IterationResult]:
    marks = [
        Mark(T0 + 0.2, "role", "node1", "active"),
        Mark(T0 + 0.2, "role", "node2", "passive"),
        Mark(T0 + 5.0, "fault", "node1", "kill -9 every process of node1"),
        Mark(T0 + 5.9, "fenced", "node1", 'fenced by node2 "quickly" & <b>firmly</b>'),
        Mark(T0 + 6.4, "role", "node2", "active (epoch 4)"),
        Mark(T0 + 7.0, "note", "zookeeper", "session expired"),
    ]
    return [
        iteration("kill-node", 1, rto=1.4, marks=marks, heal=3.0),
        iteration("kill-node", 2, rto=2.1, marks=marks),
        iteration(
            "partition-zk",
            1,
            rto=None,
            lost=1,
            split_brain=["node1 and node2 both active at +0.8 s"],
            problems=["<script>alert('x')</script> in the relay's log"],
        ),
    ]


def test_html_is_well_formed_with_one_plot_per_iteration(tmp_path: Path) -> None:
    results = sample_results()
    path = tmp_path / "report.html"
    write_html(path, results, title="chaos <nightly>")
    page = path.read_text(encoding="utf-8")
    parser = parse(page)

    assert page.count("<svg") == len(results)
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; in the relay&#x27;s log" in page
    assert "<b>firmly" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert "".join(parser.texts["title"][:1]) == "chaos <nightly>"
    assert "chaos <nightly>" in parser.texts["h1"]

    # The verdict table: one row per scenario, the failing one highlighted, and TOTAL.
    rows = [attrs.get("class") or "" for tag, attrs in parser.starts if tag == "tr"]
    assert "fail" in rows[2] and "fail" not in rows[1] and "total" in rows[3]

    # The JSON summary is on the page as it is returned.
    summary = json.loads("".join(parser.texts["pre"]))
    assert summary == summary_line(results)

    # Each plot: the fault line, the heal line when there is one, the RTO band, the marks'
    # tooltips, and the failures in red below it.
    plots = re.findall(r"<svg.*?</svg>", page, re.S)
    assert all('stroke="#d62728" stroke-width="2"' in plot for plot in plots)
    assert plots[0].count("<title>heal</title>") == 1
    assert plots[1].count("<title>heal</title>") == 0
    assert "<title>RTO 1.400 s</title>" in plots[0]
    assert "no 250 after the fault" in plots[2]
    tooltips = parser.texts["title"]
    assert "role node2 at +1.400 s: active (epoch 4)" in tooltips
    assert 'fenced node1 at +0.900 s: fenced by node2 "quickly" & <b>firmly</b>' in tooltips
    for row in ("clients", "node1", "node2", "cluster"):
        assert all(f'class="row">{row}</text>' in plot for plot in plots)
    problems = parser.texts["li"]
    assert "split brain: node1 and node2 both active at +0.8 s" in problems
    assert any(p.startswith("lost (1): partition-zk-1-") for p in problems)
    assert "hamta vs keepalived + Postfix" not in page


def test_html_axis_runs_from_the_start_of_the_load_to_its_end() -> None:
    result = iteration("kill-relay", 1, attempts=40)  # 0 .. 20 s, fault at 5 s
    plot = re.findall(r"<svg.*?</svg>", render_html([result], title="t"), re.S)[0]
    ticks = re.findall(r'class="tick">([^<]+)</text>', plot)
    # 20 s of load: a tick every 2 s, fault at 0, within -5 .. 15.
    expected = [str(v).replace("-", "\u2212") for v in range(-4, 15, 2)]
    assert ticks == [*expected, "seconds from the fault"]


def test_html_draws_every_attempt_of_a_small_run_and_thins_a_large_one() -> None:
    small = iteration("kill-node", 1, attempts=300)
    large = iteration("kill-node", 2, attempts=20_000)
    large.ended = T0 + 20.0  # 20,000 attempts in 20 s: 25 to a pixel
    for attempt_index, a in enumerate(large.attempts):
        large.attempts[attempt_index] = Attempt(
            a.id, T0 + attempt_index / 1000, T0 + attempt_index / 1000 + 0.1, a.outcome, a.code
        )
    page = render_html([small, large], title="t")
    plots = re.findall(r"<svg.*?</svg>", page, re.S)
    assert plots[0].count("v12") + plots[0].count("v6") == 300
    marks = plots[1].count("v12") + plots[1].count("v6")
    assert 0 < marks <= 3 * 900
    assert "<title>19998 acked</title>" in plots[1]  # the tooltip counts attempts, not marks
    assert len(page) < 100_000
    assert MAX_ATTEMPT_MARKS < 20_000


def test_html_baseline_comparison() -> None:
    baseline = [
        {
            "scenario": "partition-zk",
            "system": "keepalived+Postfix",
            "vip_holders_max": 2,
            "note": "both MASTER <for 4 s>",
        },
        {"scenario": "zk-quorum-loss", "system": "keepalived+Postfix", "vip_holders_max": 1},
    ]
    page = render_html(sample_results(), title="t", baseline=baseline)
    parser = parse(page)
    assert "hamta vs keepalived + Postfix" in parser.texts["h2"]
    section = page[page.index("hamta vs keepalived") :]
    table = section[: section.index("</table>")]
    assert "baseline vip_holders_max" in table
    assert "both MASTER &lt;for 4 s&gt;" in table
    assert "<td>partition-zk</td><td>FAIL</td><td>1</td><td>1/1</td><td>-</td>" in table
    assert "<td>zk-quorum-loss</td><td>not run</td>" in table


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_in_a_real_browser(tmp_path: Path) -> None:
    results = sample_results()
    path = tmp_path / "report.html"
    write_html(path, results, title="chaos", baseline=[{"scenario": "kill-node", "note": "x"}])
    chromium = shutil.which("chromium")
    assert chromium is not None
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert dom.count("<svg") == len(results)
    assert dom.count('class="attempts acked"') == len(results)
    assert "<script" not in dom
    assert "&lt;script&gt;" in dom


# ------------------------------------------------------------------ JSON history


def test_json_history_round_trips(tmp_path: Path) -> None:
    results = sample_results()
    path = tmp_path / "history.jsonl"
    write_json_history(path, results)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(results)
    for line, result in zip(lines, results, strict=True):
        record = json.loads(line)
        assert record == json.loads(json.dumps(result.as_dict(with_attempts=True)))
        assert [Attempt(**a) for a in record["attempts"]] == result.attempts
        assert [Mark(**m) for m in record["marks"]] == result.marks
        assert record["ok"] is result.ok


# ------------------------------------------------------------------ demotions


def test_demotions_are_added_up_per_scenario_and_in_the_summary_line() -> None:
    results = [iteration("zk-rolling-restart", 1), iteration("zk-rolling-restart", 2)]
    results[0].demotions = 2
    (summary,) = summarize(results)
    assert summary.demotions == 2
    assert summary_line(results)["demotions"] == 2
    assert results[0].as_dict()["demotions"] == 2
    assert "<b>demotions</b> 2" in render_html(results, title="zk")


def test_false_failovers_are_the_demotions_under_a_fault_to_ride_out() -> None:
    results = [iteration("zk-rolling-restart", 1), iteration("kill-node", 1)]
    results[0].false_failovers = 1
    results[1].demotions = 1  # a kill's takeover is no false failover
    assert summary_line(results)["false_failovers"] == 1
    assert results[0].as_dict()["false_failovers"] == 1
    assert results[1].as_dict()["false_failovers"] == 0


def decision(at: float, node: str, was: str, role: str) -> Event:
    return Event(at, node, {"event": "Decision", "was": was, "role": role})


def test_demotions_counts_an_active_node_beginning_to_demote_after_the_fault() -> None:
    events = [
        decision(T0 + 1, "node1", "active", "demoting"),  # before the fault: not counted
        decision(T0 + 6, "node1", "active", "demoting"),
        decision(T0 + 6.1, "node1", "demoting", "demoting"),
        decision(T0 + 7, "node2", "promoting", "active"),
        decision(T0 + 9, "node2", "active", "demoting"),
        Event(T0 + 9, "node2", {"event": "StepDone", "was": "active", "role": "demoting"}),
    ]
    assert demotions(events, T0 + 5, T0 + 20) == 2


def test_a_steady_fault_fails_on_a_demotion_or_a_refused_client() -> None:
    ok = iteration("zk-rolling-restart", 1, failures=())
    assert steady_problems(0, ok.attempts, ok.fault_at) == []
    refused = iteration("zk-rolling-restart", 2)
    assert steady_problems(1, refused.attempts, refused.fault_at) == [
        "1 demotion(s) of the active node",
        "2 client attempt(s) not acknowledged after the fault",
    ]
    assert FAULTS["zk-rolling-restart"].steady and not FAULTS["kill-node"].steady
