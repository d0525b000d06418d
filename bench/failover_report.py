"""The failover benchmark's figures: distributions, step means, the JSON line and the table."""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from typing import Any, Final

from failover_common import say
from failover_load import verdict_line
from failover_measure import WAITS, Failover, PartResult

STEP_ORDER: Final = ("acquire", "fence", "storage", "epoch", "vip", "relay", "probe", "publish")
BASELINE_STEP_ORDER: Final = ("fsck", "mount", "postfix")


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile, linear between the closest ranks (inclusive method)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * fraction
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """min, median, p95 and max, rounded to the millisecond (None without values)."""
    if not values:
        return {"min": None, "median": None, "p95": None, "max": None}
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "p95": round(percentile(values, 0.95), 3),
        "max": round(max(values), 3),
    }


def phase_means(failovers: Sequence[Failover], order: Sequence[str]) -> dict[str, float]:
    """The mean seconds of each phase seen (``detect`` apart), in ``order`` then as found."""
    names: list[str] = [name for name in order if any(name in f.phases for f in failovers)]
    for failover in failovers:
        names += [n for n in failover.phases if n not in names and n not in WAITS]
    return {
        name: round(statistics.fmean(f.phases[name] for f in failovers if name in f.phases), 4)
        for name in names
    }


def detect_mean(failovers: Sequence[Failover]) -> float | None:
    """The mean detection time, if the pair reported one."""
    found = [f.phases["detect"] for f in failovers if "detect" in f.phases]
    return round(statistics.fmean(found), 3) if found else None


def figures(
    args: argparse.Namespace,
    hamta: PartResult,
    baseline: PartResult | None,
    baseline_missing: str | None,
    ok: bool,
    seconds: float,
) -> dict[str, Any]:
    """The JSON line."""
    ours = distribution(hamta.rtos)
    theirs = distribution(baseline.rtos if baseline else [])
    ratio = None
    if ours["median"] and theirs["median"]:
        ratio = round(ours["median"] / theirs["median"], 3)
    verdict = hamta.verdict
    base_verdict = baseline.verdict if baseline else None
    return {
        "iterations": len(hamta.failovers),
        "rto_min_s": ours["min"],
        "rto_median_s": ours["median"],
        "rto_p95_s": ours["p95"],
        "rto_max_s": ours["max"],
        "switchover_s": None if hamta.switchover is None else round(hamta.switchover, 3),
        "acked": verdict.acked if verdict else None,
        "lost": len(verdict.lost) if verdict else None,
        "baseline_rto_median_s": theirs["median"],
        "baseline_rto_min_s": theirs["min"],
        "baseline_rto_p95_s": theirs["p95"],
        "baseline_rto_max_s": theirs["max"],
        "ratio_median": ratio,
        "detect_mean_s": detect_mean(hamta.failovers),
        "steps_mean_s": phase_means(hamta.failovers, STEP_ORDER),
        "anomalies": sum(len(f.anomalies) for f in hamta.failovers),
        "rto_clean_median_s": distribution([f.rto for f in hamta.failovers if not f.anomalies])[
            "median"
        ],
        "baseline_detect_mean_s": detect_mean(baseline.failovers) if baseline else None,
        "baseline_steps_mean_s": (
            phase_means(baseline.failovers, BASELINE_STEP_ORDER) if baseline else None
        ),
        "switchover_command_s": (
            None if hamta.switchover_command is None else round(hamta.switchover_command, 3)
        ),
        "false_failovers": hamta.false_failovers,
        "fast_takeover": getattr(args, "fast_takeover", "on"),
        "silent_fences": hamta.silent_fences,
        "fast_takeovers": hamta.fast_takeovers,
        "queued": hamta.queued,
        "queue_depth": hamta.queue_depth,
        "unknown": verdict.unknown if verdict else None,
        "duplicated": verdict.duplicated if verdict else None,
        "unexpected": len(verdict.unexpected) if verdict else None,
        "baseline_iterations": len(baseline.failovers) if baseline else 0,
        "baseline_queued": baseline.queued if baseline else None,
        "baseline_acked": base_verdict.acked if base_verdict else None,
        "baseline_lost": len(base_verdict.lost) if base_verdict else None,
        "baseline_missing": baseline_missing,
        "rate": args.rate,
        "connections": args.connections,
        "ok": ok,
        "seconds": round(seconds, 1),
    }


def _cell(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.3f}{unit}"


def report(hamta: PartResult, baseline: PartResult | None, data: dict[str, Any]) -> None:
    """The table for people."""
    say()
    say(f"{'RTO (end of kill to 250)':<28}{'min':>10}{'median':>10}{'p95':>10}{'max':>10}  n")
    for part in (hamta, baseline):
        if part is None:
            continue
        dist = distribution(part.rtos)
        say(
            f"{part.name:<28}{_cell(dist['min']):>10}{_cell(dist['median']):>10}"
            f"{_cell(dist['p95']):>10}{_cell(dist['max']):>10}  {len(part.rtos)}"
        )
    if data["ratio_median"] is not None:
        say(
            f"median RTO hamta/baseline: {data['ratio_median']:.3f} "
            f"(baseline/hamta {1 / data['ratio_median']:.2f})"
        )
    for part, order in ((hamta, STEP_ORDER), (baseline, BASELINE_STEP_ORDER)):
        if part is None or not part.failovers:
            continue
        detect = detect_mean(part.failovers)
        means = phase_means(part.failovers, order)
        say(
            f"{part.name} mean: detect {_cell(detect)}; "
            + " ".join(f"{name} {seconds * 1000:.1f}ms" for name, seconds in means.items())
            + f" (sum {sum(means.values()) * 1000:.0f}ms)"
        )
        troubled = [f for f in part.failovers if f.anomalies]
        if troubled:
            lost = statistics.fmean(f.phases.get("retry", 0.0) for f in troubled)
            clean = distribution([f.rto for f in part.failovers if not f.anomalies])["median"]
            say(
                f"{part.name}: {len(troubled)} of {len(part.failovers)} takeovers went wrong "
                f"first (mean {lost:.3f}s lost to it; median RTO of the others "
                f"{_cell(clean)}): {troubled[0].anomalies[0]}"
            )
    say(
        f"hamta switchover: clients unavailable {_cell(data['switchover_s'])}, "
        f"command {_cell(data['switchover_command_s'])}"
    )
    for part in (hamta, baseline):
        if part is not None and part.verdict is not None:
            say(f"{part.name} load: {verdict_line(part.verdict)}")
        if part is not None and part.error:
            say(f"{part.name} FAILED: {part.error}")
    if data["baseline_missing"]:
        say(f"baseline missing: {data['baseline_missing']}")
