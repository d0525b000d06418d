"""The relay benchmark's report: one line per relay, and the figures of the JSON line."""

import argparse
from typing import Any

from relay_common import say
from relay_load import Result


def describe_result(name: str, result: Result) -> None:
    """Print one relay's figures, notes and problems."""
    rss = "n/a" if result.peak_rss_kib is None else f"{result.peak_rss_kib / 1024:.1f} MiB"
    say(
        f"{name}: submitted {result.submitted} in {result.submit_seconds:.2f}s "
        f"({result.submit_msgs_per_s:.0f} msg/s), delivered {result.delivered} "
        f"(sink counted {result.sink_received}) in {result.end_to_end_seconds:.2f}s "
        f"end to end -> {result.msgs_per_s:.1f} msg/s; peak RSS {rss}"
    )
    if result.cpu_ms_per_msg is not None:
        say(
            f"{name}: {result.cpu_ms_per_msg:.3f} ms of CPU per message "
            f"({result.processes} processes, reception and delivery)"
        )
    for note in result.notes:
        say(f"{name}: {note}")
    for problem in result.problems:
        say(f"{name}: PROBLEM: {problem}")


def summary(
    args: argparse.Namespace,
    hamta: Result | None,
    postfix: Result | None,
    ok: bool,
    recovery: dict[int, dict[str, float]],
    *,
    dkim: Result | None = None,
) -> dict[str, Any]:
    """The figures of the JSON line: rates, ratio, peak RSS, recovery, times, ok."""

    def rate(result: Result | None) -> float | None:
        return None if result is None else round(result.msgs_per_s, 1)

    def against_postfix(result: Result | None) -> float | None:
        if result is None or postfix is None or postfix.msgs_per_s <= 0:
            return None
        return round(result.msgs_per_s / postfix.msgs_per_s, 3)

    def cpu(result: Result | None) -> float | None:
        return (
            None
            if result is None or result.cpu_ms_per_msg is None
            else round(result.cpu_ms_per_msg, 3)
        )

    ratio = against_postfix(hamta)
    figures: dict[str, Any] = {
        "messages": args.messages,
        "sessions": args.sessions,
        "size": args.size,
        "reuse_connections": args.reuse_connections,
        "hamta_msgs_per_s": rate(hamta),
        "postfix_msgs_per_s": rate(postfix),
        "ratio": ratio,
        "hamta_peak_rss_mib": None
        if hamta is None or hamta.peak_rss_kib is None
        else round(hamta.peak_rss_kib / 1024, 1),
        "recovery_100k_s": _recovery_figure(recovery, 100_000, "recovery_s"),
        "recovery_1m_s": _recovery_figure(recovery, 1_000_000, "recovery_s"),
        "recovery_100k_rss_mib": _recovery_figure(recovery, 100_000, "peak_rss_mib"),
        "recovery_1m_rss_mib": _recovery_figure(recovery, 1_000_000, "peak_rss_mib"),
    }
    for name, result in (("hamta", hamta), ("postfix", postfix)):
        figures[f"{name}_end_to_end_s"] = (
            None if result is None else round(result.end_to_end_seconds, 3)
        )
        figures[f"{name}_submit_s"] = None if result is None else round(result.submit_seconds, 3)
        figures[f"{name}_delivered"] = None if result is None else result.delivered
    # Added later: the relay's processes, its CPU per message, and the run that DKIM-signs
    # every message (rsa-sha256), whose ratio is against Postfix without signing.
    figures["hamta_workers"] = None if hamta is None else hamta.processes
    figures["hamta_cpu_ms_per_msg"] = cpu(hamta)
    figures["hamta_dkim_msgs_per_s"] = rate(dkim)
    figures["dkim_ratio"] = against_postfix(dkim)
    figures["hamta_dkim_cpu_ms_per_msg"] = cpu(dkim)
    figures["ok"] = ok
    return figures


def _recovery_figure(recovery: dict[int, dict[str, float]], depth: int, key: str) -> float | None:
    figures = recovery.get(depth)
    return None if figures is None else round(figures[key], 3)
