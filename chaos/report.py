"""The chaos suite's report: per-scenario figures, a verdict table, one JSON line, an HTML page.

Everything here is pure: it reads ``IterationResult``s and writes text. The HTML page is one
self-contained file (inline CSS, inline SVG drawn here, no script) so that it can be attached
to an issue or opened from a CI artefact without a network. Every text that came from a run
(problems, mark texts, node names) is escaped: a relay's error message is not trusted markup.

Percentiles are nearest-rank (the value at rank ``ceil(p * n)`` of the sorted values): with a
handful of iterations per scenario an interpolated p95 would be a value no iteration had.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from chaos.results import IterationResult, Mark
from cluster.decision_data import Role
from cluster.lab.history import Attempt

KILL_SCENARIOS: Final = ("kill-relay", "kill-agent", "kill-node")


@dataclass(frozen=True, slots=True)
class ScenarioSummary:
    """Every iteration of one scenario, added up."""

    scenario: str
    iterations: int
    failed: int  # iterations not ok
    sent: int
    acked: int
    refused: int
    unknown: int
    delivered: int
    lost: int
    unexpected: int
    duplicated: int
    recovered: int
    split_brain: int  # iterations with split brain
    rto_min_s: float | None
    rto_median_s: float | None
    rto_p95_s: float | None
    rto_max_s: float | None
    refused_s_max: float
    ok: bool
    demotions: int = 0  # of a node that was active, after the fault (agents' logs)
    rtos: tuple[float, ...] = ()  # sorted; the TOTAL row's distribution needs the values


@dataclass(frozen=True, slots=True)
class _Distribution:
    low: float
    median: float
    p95: float
    high: float


def nearest_rank(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile by nearest rank: the value at rank ceil(fraction * n)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _distribution(values: Sequence[float]) -> _Distribution | None:
    if not values:
        return None
    return _Distribution(
        low=min(values),
        median=statistics.median(values),
        p95=nearest_rank(values, 0.95),
        high=max(values),
    )


def _by_scenario(results: Iterable[IterationResult]) -> dict[str, list[IterationResult]]:
    groups: dict[str, list[IterationResult]] = {}
    for result in results:
        groups.setdefault(result.scenario, []).append(result)
    return groups


def _summarize_one(scenario: str, results: Sequence[IterationResult]) -> ScenarioSummary:
    rtos = sorted(r.rto_s for r in results if r.rto_s is not None)
    dist = _distribution(rtos)
    return ScenarioSummary(
        scenario=scenario,
        iterations=len(results),
        failed=sum(1 for r in results if not r.ok),
        sent=sum(r.verdict.sent for r in results),
        acked=sum(r.verdict.acked for r in results),
        refused=sum(r.verdict.refused for r in results),
        unknown=sum(r.verdict.unknown for r in results),
        delivered=sum(r.verdict.delivered for r in results),
        lost=sum(len(r.verdict.lost) for r in results),
        unexpected=sum(len(r.verdict.unexpected) for r in results),
        duplicated=sum(r.verdict.duplicated for r in results),
        recovered=sum(r.verdict.recovered for r in results),
        split_brain=sum(1 for r in results if r.split_brain),
        rto_min_s=dist.low if dist else None,
        rto_median_s=dist.median if dist else None,
        rto_p95_s=dist.p95 if dist else None,
        rto_max_s=dist.high if dist else None,
        refused_s_max=max((r.refused_s for r in results), default=0.0),
        ok=all(r.ok for r in results),
        rtos=tuple(rtos),
        demotions=sum(r.demotions for r in results),
    )


def summarize(results: Iterable[IterationResult]) -> list[ScenarioSummary]:
    """One summary per scenario, in the order the scenarios first appear in ``results``."""
    return [_summarize_one(name, group) for name, group in _by_scenario(results).items()]


# ------------------------------------------------------------------ the verdict table

_HEADER: Final = (
    "scenario",
    "iterations",
    "sent",
    "acknowledged",
    "delivered",
    "lost",
    "duplicated",
    "RTO min/median/p95/max (s)",
    "verdict",
)


def _rto_cell(rtos: Sequence[float]) -> str:
    dist = _distribution(rtos)
    if dist is None:
        return "-"
    return f"{dist.low:.2f}/{dist.median:.2f}/{dist.p95:.2f}/{dist.high:.2f}"


def _row(summary: ScenarioSummary) -> list[str]:
    return [
        summary.scenario,
        str(summary.iterations),
        str(summary.sent),
        str(summary.acked),
        str(summary.delivered),
        str(summary.lost),
        str(summary.duplicated),
        _rto_cell(summary.rtos),
        "ok" if summary.ok else "FAIL",
    ]


def _total_row(summaries: Sequence[ScenarioSummary]) -> list[str]:
    rtos = [rto for s in summaries for rto in s.rtos]
    return [
        "TOTAL",
        str(sum(s.iterations for s in summaries)),
        str(sum(s.sent for s in summaries)),
        str(sum(s.acked for s in summaries)),
        str(sum(s.delivered for s in summaries)),
        str(sum(s.lost for s in summaries)),
        str(sum(s.duplicated for s in summaries)),
        _rto_cell(rtos),
        "ok" if all(s.ok for s in summaries) else "FAIL",
    ]


def verdict_table(summaries: Sequence[ScenarioSummary]) -> str:
    """A fixed-width table, one row per scenario and a TOTAL row (its RTOs: every iteration's)."""
    body = [_row(s) for s in summaries]
    total = _total_row(summaries)
    rows = [list(_HEADER), *body, total]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]

    def line(cells: Sequence[str]) -> str:
        # The scenario reads best left-aligned, the figures right-aligned under their header.
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(_HEADER), rule, *(line(r) for r in body), rule, line(total)])


# ------------------------------------------------------------------ the JSON line


def summary_line(results: Sequence[IterationResult]) -> dict[str, Any]:
    """The run in one JSON-ready dict; its RTOs are the kill scenarios' when any of them ran.

    The kill scenarios are the failovers the RTO is promised for; a partition's or a
    switchover's recovery time measures something else and would blur the figure.
    """
    killed = [r for r in results if r.scenario in KILL_SCENARIOS]
    timed = killed or list(results)
    rtos = [r.rto_s for r in timed if r.rto_s is not None]
    line: dict[str, Any] = {
        "scenarios": len({r.scenario for r in results}),
        "iterations": len(results),
        "acked": sum(r.verdict.acked for r in results),
        "lost": sum(len(r.verdict.lost) for r in results),
        "duplicated": sum(r.verdict.duplicated for r in results),
        "split_brain": sum(1 for r in results if r.split_brain),
        "demotions": sum(r.demotions for r in results),
        "false_failovers": sum(r.false_failovers for r in results),
        "rto_median_s": round(statistics.median(rtos), 3) if rtos else None,
        "rto_max_s": round(max(rtos), 3) if rtos else None,
    }
    if any(r.other_pairs for r in results):
        line["other_pairs"] = other_pairs_totals(results)
    return line


def other_pairs_totals(results: Sequence[IterationResult]) -> dict[str, dict[str, int]]:
    """``--pair``: per pair the fault was not aimed at, its figures over the run (each must
    show no role change, refusal, cut-off session or loss)."""
    totals: dict[str, dict[str, int]] = {}
    for result in results:
        for outcome in result.other_pairs:
            pair = totals.setdefault(str(outcome["pair"]), dict.fromkeys(_OTHER_FIGURES, 0))
            for figure in _OTHER_FIGURES:
                value = outcome[figure]
                pair[figure] += len(value) if isinstance(value, list) else int(value)
    return totals


_OTHER_FIGURES: Final = ("sent", "acked", "refused", "failed", "lost", "role_changes")


# ------------------------------------------------------------------ JSON history


def write_json_history(path: Path | str, results: Iterable[IterationResult]) -> None:
    """One JSON line per iteration, with its raw attempts (``IterationResult.as_dict``)."""
    with open(path, "w", encoding="utf-8") as out:
        for result in results:
            out.write(json.dumps(result.as_dict(with_attempts=True)) + "\n")


# ------------------------------------------------------------------ the timeline plot

WIDTH: Final = 900  # pixels, the whole plot
ROW_HEIGHT: Final = 18
_LEFT: Final = 70  # row labels
_RIGHT: Final = 14
_TOP: Final = 20  # the RTO's label above the rows
_AXIS: Final = 34  # ticks, their labels and the axis title
_PLOT_WIDTH: Final = WIDTH - _LEFT - _RIGHT
MAX_ATTEMPT_MARKS: Final = 2000  # above this, attempts closer than a pixel share a mark
DEFAULT_NODES: Final = ("node1", "node2")

OUTCOME_COLOURS: Final = {"acked": "#2e9d4a", "refused": "#f08c00", "unknown": "#d62728"}
FAULT_COLOUR: Final = "#d62728"
HEAL_COLOUR: Final = "#1f63c6"
RTO_FILL: Final = "#ffd8a8"
ROLE_COLOURS: Final = {
    Role.ACTIVE.value: "#2e9d4a",
    Role.PASSIVE.value: "#8c96a3",
    Role.STARTING.value: "#9bbbe0",
    Role.PROMOTING.value: "#f0b400",
    Role.DEMOTING.value: "#c77c00",
    Role.FAILED.value: "#d62728",
}
KIND_COLOURS: Final = {
    "fault": FAULT_COLOUR,
    "heal": HEAL_COLOUR,
    "fenced": "#7b3fb3",
    "watchdog": "#8c564b",
    "note": "#555555",
}
_OTHER_COLOUR: Final = "#555555"


def _role_of(text: str) -> str | None:
    """The role a "role" mark names (its text may say more: "active (epoch 7)")."""
    words = text.lower().replace("(", " ").replace(":", " ").split()
    return next((w for w in words if w in ROLE_COLOURS), None)


def _nice_step(span: float, target_ticks: int = 10) -> float:
    """A tick step of 1, 2 or 5 times a power of ten giving about ``target_ticks`` ticks."""
    raw = span / target_ticks
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text.replace("-", "\u2212")


def _fmt(value: float) -> str:
    return f"{value:.1f}"


def _attempt_marks(
    attempts: Sequence[Attempt], x_of: Callable[[float], float], low: float, high: float
) -> dict[str, list[float]]:
    """The x of each attempt's mark, by outcome; one per pixel and outcome when there are many."""
    marks: dict[str, list[float]] = {outcome: [] for outcome in OUTCOME_COLOURS}
    thin = len(attempts) > MAX_ATTEMPT_MARKS
    seen: set[tuple[str, int]] = set()
    for attempt in attempts:
        if attempt.outcome not in marks or not low <= attempt.start <= high:
            continue
        x = x_of(attempt.start)
        if thin:
            key = (attempt.outcome, round(x))
            if key in seen:
                continue
            seen.add(key)
        marks[attempt.outcome].append(x)
    return marks


def timeline_svg(result: IterationResult) -> str:
    """An iteration's timeline as inline SVG: attempts, fault, heal, RTO and marks, by row."""
    fault = result.fault_at
    low = min(result.started, fault)
    rto_from = result.rto_from if result.rto_from is not None else fault
    high = max(result.ended, result.heal_at or fault, rto_from + (result.rto_s or 0.0))
    if high - low < 1e-6:
        high = low + 1.0
    nodes = list(DEFAULT_NODES)
    nodes += sorted({m.node for m in result.marks if m.kind == "role"} - set(nodes))
    rows = ["clients", *nodes, "cluster"]
    row_of = {name: i for i, name in enumerate(rows)}
    bottom = _TOP + ROW_HEIGHT * len(rows)
    height = bottom + _AXIS

    def x_of(t: float) -> float:
        return _LEFT + (t - low) / (high - low) * _PLOT_WIDTH

    def y_mid(row: str) -> float:
        return _TOP + ROW_HEIGHT * row_of[row] + ROW_HEIGHT / 2

    esc = html.escape
    label = f"{result.scenario} iteration {result.iteration}"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{WIDTH}" '
        f'height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="{esc(label)} timeline">',
        f"<title>{esc(label)}</title>",
    ]
    # Rows: alternate shading so a mark's row is easy to follow across 900 pixels.
    for i, name in enumerate(rows):
        y = _TOP + ROW_HEIGHT * i
        if i % 2 == 0:
            out.append(
                f'<rect x="{_LEFT}" y="{y}" width="{_PLOT_WIDTH}" height="{ROW_HEIGHT}" '
                'fill="#f4f6f8"/>'
            )
        out.append(
            f'<text x="{_LEFT - 6}" y="{_fmt(y + ROW_HEIGHT / 2 + 4)}" text-anchor="end" '
            f'class="row">{esc(name)}</text>'
        )
    # RTO band under everything else it overlaps.
    if result.rto_s is not None:
        x0, x1 = x_of(rto_from), x_of(rto_from + result.rto_s)
        out.append(
            f'<rect x="{_fmt(x0)}" y="{_TOP}" width="{_fmt(max(x1 - x0, 1.0))}" '
            f'height="{bottom - _TOP}" fill="{RTO_FILL}" fill-opacity="0.6">'
            f"<title>RTO {result.rto_s:.3f} s</title></rect>"
        )
        out.append(
            f'<text x="{_fmt(x0 + 3)}" y="{_TOP - 6}" class="note">RTO {result.rto_s:.2f} s</text>'
        )
    else:
        out.append(
            f'<text x="{_fmt(x_of(fault) + 3)}" y="{_TOP - 6}" class="note bad">'
            "no 250 after the fault</text>"
        )
    # Ticks and grid.
    step = _nice_step(high - low)
    first = math.ceil((low - fault) / step - 1e-9)
    last = math.floor((high - fault) / step + 1e-9)
    for k in range(first, last + 1):
        rel = k * step
        x = _fmt(x_of(fault + rel))
        out.append(
            f'<line x1="{x}" y1="{_TOP}" x2="{x}" y2="{bottom + 4}" stroke="#d0d5db" '
            'stroke-width="0.6"/>'
        )
        out.append(
            f'<text x="{x}" y="{bottom + 16}" text-anchor="middle" class="tick">'
            f"{_tick_label(rel, step)}</text>"
        )
    out.append(
        f'<line x1="{_LEFT}" y1="{bottom}" x2="{WIDTH - _RIGHT}" y2="{bottom}" stroke="#666"/>'
    )
    out.append(
        f'<text x="{WIDTH - _RIGHT}" y="{bottom + 30}" text-anchor="end" class="tick">'
        "seconds from the fault</text>"
    )
    # Client attempts: one path per outcome. Failures are drawn over the 250s, refusals in the
    # upper half and cut-offs in the lower, so that a stretch mixing both shows both.
    top = y_mid("clients") - 6
    counts = Counter(a.outcome for a in result.attempts if low <= a.start <= high)
    by_outcome = _attempt_marks(result.attempts, x_of, low, high)
    lanes: tuple[tuple[str, float, int], ...] = (
        ("acked", top, 12),
        ("refused", top, 6),
        ("unknown", top + 6, 6),
    )
    for outcome, lane_top, length in lanes:
        xs = by_outcome[outcome]
        if xs:
            d = "".join(f"M{_fmt(x)} {_fmt(lane_top)}v{length}" for x in xs)
            out.append(
                f'<path class="attempts {outcome}" d="{d}" stroke="{OUTCOME_COLOURS[outcome]}" '
                f'stroke-width="1.4" fill="none"><title>{counts[outcome]} {outcome}</title></path>'
            )
    # Role bands: a role holds from its mark to the node's next one, so two active bands
    # overlapping are a split brain seen at a glance.
    for node in nodes:
        changes = sorted(
            (m for m in result.marks if m.kind == "role" and m.node == node), key=lambda m: m.at
        )
        for i, mark in enumerate(changes):
            role = _role_of(mark.text)
            start = max(mark.at, low)
            end = min(changes[i + 1].at if i + 1 < len(changes) else high, high)
            if role is None or end <= start:
                continue
            out.append(
                f'<rect x="{_fmt(x_of(start))}" y="{_fmt(y_mid(node) - 5)}" '
                f'width="{_fmt(x_of(end) - x_of(start))}" height="10" '
                f'fill="{ROLE_COLOURS[role]}" fill-opacity="0.28"/>'
            )
    # Fault and heal lines.
    out.append(_vline(x_of(fault), bottom, FAULT_COLOUR, "fault"))
    if result.heal_at is not None:
        out.append(_vline(x_of(result.heal_at), bottom, HEAL_COLOUR, "heal"))
    # Marks, each labelled in the room left before the next mark of its row (the tooltip has
    # the whole text): overlapping labels would be unreadable.
    by_row: dict[str, list[Mark]] = {}
    for mark in sorted(result.marks, key=lambda m: m.at):
        if low <= mark.at <= high:
            row = mark.node if mark.kind == "role" and mark.node in row_of else "cluster"
            by_row.setdefault(row, []).append(mark)
    for row, marks in by_row.items():
        xs = [x_of(m.at) for m in marks]
        label_end = float(_LEFT)
        for i, mark in enumerate(marks):
            next_x = xs[i + 1] if i + 1 < len(marks) else None
            label, label_end = _mark(mark, xs[i], y_mid(row), fault, label_end, next_x)
            out.append(label)
    out.append("</svg>")
    return "\n".join(out)


def _vline(x: float, bottom: float, colour: str, what: str) -> str:
    return (
        f'<line x1="{_fmt(x)}" y1="{_TOP - 2}" x2="{_fmt(x)}" y2="{bottom}" stroke="{colour}" '
        f'stroke-width="2"><title>{what}</title></line>'
    )


_CHAR_WIDTH: Final = 6.0  # a character of the 10 px labels, roughly
_LABEL_GAP: Final = 6.0
_MIN_LABEL_CHARS: Final = 4


def _mark(
    mark: Mark, x: float, y: float, fault: float, label_end: float, following: float | None
) -> tuple[str, float]:
    """A mark's dot, tooltip and label; and where its row's labels now end."""
    role = _role_of(mark.text) if mark.kind == "role" else None
    colour = ROLE_COLOURS[role] if role else KIND_COLOURS.get(mark.kind, _OTHER_COLOUR)
    text = (role or mark.text) if mark.kind == "role" else f"{mark.kind}: {mark.text}"
    tooltip = f"{mark.kind} {mark.node} at {mark.at - fault:+.3f} s: {mark.text}"
    parts = [
        f'<g><title>{html.escape(tooltip)}</title><circle cx="{_fmt(x)}" cy="{_fmt(y)}" r="4" '
        f'fill="{colour}" stroke="#fff" stroke-width="1"/>'
    ]
    right = (following if following is not None else WIDTH - _RIGHT) - _LABEL_GAP
    room_right = int((right - x - _LABEL_GAP) / _CHAR_WIDTH)
    # The last mark of a row may be labelled on its left, in the room after the labels before.
    room_left = int((x - _LABEL_GAP - label_end) / _CHAR_WIDTH) if following is None else 0
    if room_right >= min(len(text), _MIN_LABEL_CHARS):
        short = _shorten(text, room_right)
        anchor, at = "start", x + _LABEL_GAP
        label_end = at + _CHAR_WIDTH * len(short) + _LABEL_GAP
    elif room_left >= min(len(text), _MIN_LABEL_CHARS):
        short, anchor, at = _shorten(text, room_left), "end", x - _LABEL_GAP
    else:
        short = ""
    if short:
        parts.append(
            f'<text x="{_fmt(at)}" y="{_fmt(y + 3.5)}" text-anchor="{anchor}" class="mark">'
            f"{html.escape(short)}</text>"
        )
    parts.append("</g>")
    return "".join(parts), max(label_end, x + 4)


def _shorten(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: max(chars - 1, 1)] + "\u2026"


# ------------------------------------------------------------------ the HTML page

_CSS: Final = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1d2329; margin: 24px; max-width: 960px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #d0d5db; }
h3 { font-size: 15px; margin: 20px 0 4px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 8px 0; }
th, td { padding: 3px 9px; border-bottom: 1px solid #e3e7eb; text-align: right; }
th { background: #eef1f4; }
td:first-child, th:first-child { text-align: left; }
td.text { text-align: left; }
tr.fail td { background: #fde2e2; }
tr.total td { font-weight: 600; border-top: 2px solid #9aa3ad; }
td.verdict-ok { color: #2e7d32; font-weight: 600; }
td.verdict-fail { color: #c62828; font-weight: 700; }
pre { background: #f4f6f8; padding: 8px 12px; font-size: 13px; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
svg text.row { font-size: 11px; fill: #333; }
svg text.tick { font-size: 10px; fill: #555; }
svg text.mark { font-size: 10px; fill: #222; }
svg text.note { font-size: 11px; fill: #8a4b00; }
svg text.bad { fill: #c62828; }
.iteration { margin: 14px 0 22px; }
.facts { font-size: 13px; margin: 2px 0 0 70px; }
.facts span { margin-right: 14px; white-space: nowrap; }
ul.problems { color: #c62828; font-size: 13px; margin: 4px 0 0 70px; padding-left: 18px; }
.legend { font-size: 12px; color: #333; }
.legend .key { display: inline-block; width: 300px; margin: 2px 0; }
.legend .key i { vertical-align: middle; margin: 0 4px 0 2px; }
table.baseline th.text { text-align: left; }
table.alerts { font-size: 12px; margin: 4px 0 0 70px; }
table.alerts td { text-align: left; } table.alerts td:first-child { text-align: right; }
p.alerts { margin: 4px 0 0 70px; }
.muted { color: #66707a; font-size: 12px; }
"""


def _html_table(summaries: Sequence[ScenarioSummary]) -> str:
    esc = html.escape
    out = ["<table class='verdicts'>", "<thead><tr>"]
    out += [f"<th>{esc(name)}</th>" for name in _HEADER]
    out.append("</tr></thead><tbody>")
    for summary in summaries:
        cells = _row(summary)
        anchor = f"<a href='#{esc(_anchor(summary.scenario))}'>{esc(cells[0])}</a>"
        out.append(_html_row([anchor, *map(esc, cells[1:])], ok=summary.ok))
    total = _total_row(summaries)
    out.append(_html_row(list(map(esc, total)), ok=all(s.ok for s in summaries), extra="total"))
    out.append("</tbody></table>")
    return "\n".join(out)


def _html_row(cells: Sequence[str], *, ok: bool, extra: str = "") -> str:
    classes = " ".join(c for c in (extra, "" if ok else "fail") if c)
    tds = [f"<td>{cell}</td>" for cell in cells[:-1]]
    tds.append(f"<td class='verdict-{'ok' if ok else 'fail'}'>{cells[-1]}</td>")
    return f"<tr class='{classes}'>{''.join(tds)}</tr>" if classes else f"<tr>{''.join(tds)}</tr>"


def _anchor(scenario: str) -> str:
    return "s-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in scenario)


def _legend() -> str:
    """The key to the timelines, in HTML (the page's only SVGs are the iterations')."""
    tick = "display:inline-block;width:2px;height:12px;background:{}"
    line = "display:inline-block;width:2px;height:16px;background:{}"
    band = "display:inline-block;width:16px;height:12px;background:{}"
    role = "display:inline-block;width:16px;height:10px;background:{};opacity:0.28"
    dot = "display:inline-block;width:8px;height:8px;border-radius:50%;background:{}"
    items = [
        (tick, OUTCOME_COLOURS["acked"], "attempt acknowledged (250)"),
        (tick, OUTCOME_COLOURS["refused"], "attempt refused (upper half)"),
        (tick, OUTCOME_COLOURS["unknown"], "attempt cut off, outcome unknown (lower half)"),
        (line, FAULT_COLOUR, "fault"),
        (line, HEAL_COLOUR, "heal"),
        (band, RTO_FILL, "RTO: from the fault (or the outage, or the heal) to the first 250"),
        (role, ROLE_COLOURS[Role.ACTIVE.value], "role held until the node's next role mark"),
        (dot, ROLE_COLOURS[Role.ACTIVE.value], "node became active"),
        (dot, ROLE_COLOURS[Role.PASSIVE.value], "node became passive"),
        (dot, ROLE_COLOURS[Role.PROMOTING.value], "node promoting"),
        (dot, KIND_COLOURS["fenced"], "fenced"),
        (dot, KIND_COLOURS["note"], "other event"),
    ]
    return "\n".join(
        f"<span class='key'><i style='{style.format(colour)}'></i> {html.escape(text)}</span>"
        for style, colour, text in items
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _iteration_html(result: IterationResult) -> str:
    esc = html.escape
    verdict = result.verdict
    fault_wall = datetime.fromtimestamp(result.fault_at + result.wall_offset, UTC)
    facts = [
        ("scenario", result.scenario),
        ("iteration", str(result.iteration)),
        ("seed", str(result.seed)),
        ("fault at", fault_wall.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"),
        ("sent", str(verdict.sent)),
        ("acked", str(verdict.acked)),
        ("refused", str(verdict.refused)),
        ("unknown", str(verdict.unknown)),
        ("delivered", str(verdict.delivered)),
        ("lost", str(len(verdict.lost))),
        ("unexpected", str(len(verdict.unexpected))),
        ("duplicated", str(verdict.duplicated)),
        ("recovered", str(verdict.recovered)),
        ("RTO", _seconds(result.rto_s)),
        ("refused for", _seconds(result.refused_s)),
        ("demotions", str(result.demotions)),
        ("verdict", "ok" if result.ok else "FAIL"),
    ]
    problems = [f"split brain: {text}" for text in result.split_brain]
    if verdict.lost:
        problems.append(f"lost ({len(verdict.lost)}): " + ", ".join(_some(verdict.lost)))
    if verdict.unexpected:
        problems.append(
            f"unexpected ({len(verdict.unexpected)}): " + ", ".join(_some(verdict.unexpected))
        )
    problems += result.problems
    if result.alerts is not None:
        facts.insert(-1, ("alerts", str(len(result.alerts))))
    out = [
        f"<div class='iteration' id='{esc(_anchor(result.scenario))}-{result.iteration}'>",
        timeline_svg(result),
        "<div class='facts'>"
        + " ".join(f"<span><b>{esc(k)}</b> {esc(v)}</span>" for k, v in facts)
        + "</div>",
    ]
    if result.alerts is not None:
        out.append(_alerts_html(result.alerts))
    if problems:
        out.append("<ul class='problems'>")
        out += [f"<li>{esc(problem)}</li>" for problem in problems]
        out.append("</ul>")
    out.append("</div>")
    return "\n".join(out)


def _alerts_html(alerts: Sequence[Mapping[str, Any]]) -> str:
    """The monitors' alerts of one iteration (chaos.alerts), with their delay from the fault."""
    esc = html.escape
    if not alerts:
        return "<p class='alerts muted'>no alert from the monitors</p>"
    head = ("after fault", "location", "event", "check", "severity", "state", "detail")
    rows = [
        "<table class='alerts'><thead><tr>",
        *(f"<th>{esc(h)}</th>" for h in head),
        "</tr></thead><tbody>",
    ]
    for alert in alerts:
        cells = (
            f"{float(alert.get('after_s') or 0.0):.2f} s",
            str(alert.get("location") or ""),
            str(alert.get("event") or ""),
            str(alert.get("check") or ""),
            str(alert.get("severity") or ""),
            str(alert.get("state") or ""),
            _shorten(str(alert.get("detail") or ""), 120),
        )
        rows.append(
            f"<tr data-check='{esc(cells[3])}' data-after='{esc(str(alert.get('after_s')))}'>"
            + "".join(f"<td>{esc(c)}</td>" for c in cells)
            + "</tr>"
        )
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _some(ids: Sequence[str], limit: int = 10) -> list[str]:
    return list(ids[:limit]) + ([f"\u2026 {len(ids) - limit} more"] if len(ids) > limit else [])


def _baseline_html(
    summaries: Sequence[ScenarioSummary], baseline: Sequence[Mapping[str, Any]]
) -> str:
    esc = html.escape
    ours = {s.scenario: s for s in summaries}
    columns: list[str] = []
    for entry in baseline:
        columns += [k for k in entry if k != "scenario" and k not in columns]
    header = [
        "scenario",
        "hamta verdict",
        "hamta lost",
        "hamta split brain",
        "hamta RTO median (s)",
        *(f"baseline {c}" for c in columns),
    ]
    out = [
        "<h2 id='baseline'>hamta vs keepalived + Postfix</h2>",
        "<table class='baseline'><thead><tr>",
        *(f"<th>{esc(h)}</th>" for h in header[:5]),
        *(f"<th class='text'>{esc(h)}</th>" for h in header[5:]),
        "</tr></thead><tbody>",
    ]
    for entry in baseline:
        name = str(entry.get("scenario", ""))
        summary = ours.get(name)
        if summary is None:
            hamta = ["not run", "-", "-", "-"]
        else:
            median = summary.rto_median_s
            hamta = [
                "ok" if summary.ok else "FAIL",
                str(summary.lost),
                f"{summary.split_brain}/{summary.iterations}",
                "-" if median is None else f"{median:.2f}",
            ]
        theirs = ["-" if entry.get(c) is None else str(entry.get(c)) for c in columns]
        cells = f"<td>{esc(name)}</td>"
        cells += "".join(f"<td>{esc(v)}</td>" for v in hamta)
        cells += "".join(f"<td class='text'>{esc(v)}</td>" for v in theirs)
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def render_html(
    results: Sequence[IterationResult],
    *,
    title: str,
    baseline: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The whole report page as text (see :func:`write_html`)."""
    esc = html.escape
    summaries = summarize(results)
    out = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p class='muted'>{len(results)} iterations of {len(summaries)} scenarios. "
        "Times are seconds from each iteration's fault.</p>",
        "<h2>Verdicts</h2>",
        _html_table(summaries),
        "<h2>Summary</h2>",
        f"<pre class='summary'>{esc(json.dumps(summary_line(results), indent=2))}</pre>",
    ]
    if baseline:
        out.append(_baseline_html(summaries, baseline))
    out += [
        "<h2>Timelines</h2>",
        "<div class='legend'>",
        _legend(),
        f"<p class='muted'>Each attempt is drawn when it started. Above {MAX_ATTEMPT_MARKS} "
        "attempts in an iteration, attempts less than a pixel apart with the same outcome "
        "share a mark. Hover a mark for its time and text.</p>",
        "</div>",
    ]
    for name, group in _by_scenario(results).items():
        out.append(f"<h3 id='{esc(_anchor(name))}'>{esc(name)}</h3>")
        out += [_iteration_html(result) for result in group]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_html(
    path: Path | str,
    results: Sequence[IterationResult],
    *,
    title: str,
    baseline: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """One self-contained HTML page: verdicts, the JSON summary, a timeline per iteration.

    ``baseline``, when given, adds a table setting each scenario's outcome beside the same
    scenario's on keepalived + Postfix (one dict per scenario, any keys besides "scenario").
    """
    Path(path).write_text(render_html(results, title=title, baseline=baseline), encoding="utf-8")
