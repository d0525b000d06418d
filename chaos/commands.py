"""``hamta chaos run``: the chaos suite from the command line (``hamtactl`` dispatches)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chaos import report
from chaos.faults import FAULTS
from chaos.runner import Settings, run, schedule
from cluster.lab.lab import Lab, LabError
from cluster.lab.topology import MAX_PAIRS, PAIR_CLUSTER

PROFILES = ("short", "full")
FULL_ITERATIONS = 20


def profile_scenarios() -> list[str]:
    """The scenarios a profile runs: every one whose goal the lab meets (``Fault.pending``)."""
    return [name for name, fault in FAULTS.items() if fault.pending is None]


def cmd_chaos(args: argparse.Namespace) -> int:
    """Build a lab of the suite's own, run the plan, print the verdict, write the report."""
    scenarios = args.scenario or profile_scenarios()
    unknown = [name for name in scenarios if name not in FAULTS]
    if unknown:
        print(
            f"hamta: unknown scenario {', '.join(unknown)} (known: {', '.join(FAULTS)})",
            file=sys.stderr,
        )
        return 2
    iterations = args.iterations or (FULL_ITERATIONS if args.profile == "full" else 1)
    output = (args.output or Path("var/chaos") / time.strftime("%Y%m%d-%H%M%S")).absolute()
    output.mkdir(parents=True, exist_ok=True)
    plan = schedule(scenarios, iterations, args.seed)
    if not args.scenario:
        for name, fault in FAULTS.items():
            if fault.pending is not None:
                print(
                    f"chaos: {name} left out of the profile ({fault.pending}); run it with"
                    f" --scenario {name}",
                    flush=True,
                )
    print(
        f"chaos: {len(plan)} iterations of {len(scenarios)} scenarios"
        f"{f' (seed {args.seed}, random order)' if args.seed is not None else ''}; "
        f"report in {output}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="hamta-chaos-", dir=args.workdir))
    # --pair: a lab of several pairs (2 unless --pairs says more); the fault goes to that pair,
    # the load to every pair, and the others must see nothing of it (chaos.other_pairs).
    pairs = args.pairs if args.pairs is not None else (2 if args.pair is not None else 1)
    try:
        lab = Lab(
            workdir / "lab",
            prefix=args.prefix,
            subnet=args.subnet,
            pairs=pairs,
            pair=args.pair or PAIR_CLUSTER,
        )
    except LabError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 2
    try:
        lab.down()  # what an interrupted run may have left with this prefix
        # By default the pair alone: no check load on the machine during the faults, so the
        # figures measure the pair. --monitors: the lab's monitors too, their alerts reported.
        lab.up(wait=120.0, monitors=args.monitors)
        print(f"lab {args.prefix} ({args.subnet}) up in {workdir / 'lab'}", flush=True)
        if pairs > 1:
            others = ", ".join(p for p in lab.pair_names if p != lab.pair)
            print(f"faults on pair {lab.pair}; load on every pair; watched: {others}", flush=True)
        results = run(
            lab,
            plan,
            output / "histories",
            Settings(rate=args.rate, monitors=args.monitors),
            progress=lambda line: print(line, flush=True),
        )
    except LabError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1
    finally:
        lab.down()
    baseline = _partition_baseline(args.prefix, args.subnet) if args.baseline else None
    summaries = report.summarize(results)
    print()
    print(report.verdict_table(summaries))
    for pair, figures in report.other_pairs_totals(results).items():
        print(f"pair {pair} (not faulted): " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    if baseline is not None:
        print("\nkeepalived + Postfix under the same partitions:")
        for item in baseline:
            print(f"  {item.get('scenario')}: {json.dumps(item)}")
    report.write_json_history(output / "history.jsonl", results)
    report.write_html(output / "report.html", results, title="hamta chaos run", baseline=baseline)
    line = report.summary_line(results)
    (output / "summary.json").write_text(json.dumps(line) + "\n")
    print(f"report: {output / 'report.html'}")
    print(json.dumps(line))
    return 0 if all(result.ok for result in results) else 1


BASELINE_SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "partition_baseline.py"


def _partition_baseline(prefix: str, subnet: str) -> list[dict[str, object]] | None:
    """The partition scenarios against keepalived + Postfix (bench/partition_baseline.py).

    It runs in a lab of its own, beside where hamta's was (the next /24, another prefix).
    """
    if not BASELINE_SCRIPT.exists():
        print(f"hamta: no {BASELINE_SCRIPT} (the baseline runs from a checkout)", file=sys.stderr)
        return None
    network = ipaddress.ip_network(subnet)
    other = ipaddress.ip_network((int(network.network_address) + network.num_addresses, 24))
    print("baseline: keepalived + Postfix through the partition scenarios", flush=True)
    done = subprocess.run(
        [
            sys.executable,
            str(BASELINE_SCRIPT),
            "--prefix",
            f"{prefix[:2]}b",
            "--subnet",
            str(other),
        ],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        timeout=900,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        print("hamta: the baseline run failed (see its output above)", file=sys.stderr)
        return None
    results: list[dict[str, object]] = json.loads(lines[-1])
    return results


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``chaos run`` on the ``hamta`` command's subparsers."""
    chaos = sub.add_parser("chaos", help="the chaos suite: faults under load in a lab")
    actions = chaos.add_subparsers(dest="chaos_action", required=True)
    runner = actions.add_parser(
        "run", help="run scenarios; exit 1 when one loses mail or shows split brain"
    )
    runner.add_argument(
        "--scenario", action="append", help="a scenario to run (repeat for more; default: all)"
    )
    profile_help = f"short: each scenario once; full: {FULL_ITERATIONS} each"
    runner.add_argument("--profile", choices=PROFILES, default="short", help=profile_help)
    runner.add_argument("--iterations", type=int, help="iterations per scenario")
    runner.add_argument("--seed", type=int, help="run the iterations in a random order")
    runner.add_argument("--rate", type=float, default=20.0, help="client attempts per second")
    runner.add_argument("--output", type=Path, help="report directory (default: var/chaos/TIME)")
    baseline_help = "also run the partition scenarios against keepalived + Postfix"
    runner.add_argument("--baseline", action="store_true", help=baseline_help)
    monitors_help = (
        "run the lab's monitors too, and report per scenario which alerts fired and when"
        " (off by default: the figures then measure the pair alone)"
    )
    runner.add_argument("--monitors", action="store_true", help=monitors_help)
    pair_help = (
        "build a lab of several pairs and fault this one (lab, lab2, lab3); the run fails if"
        " any other pair sees a failover, a refusal or a loss under its own load"
    )
    runner.add_argument("--pair", help=pair_help)
    runner.add_argument(
        "--pairs", type=int, help=f"pairs in the lab, 1 to {MAX_PAIRS} (default: 2 with --pair)"
    )
    runner.add_argument("--workdir", help="where the lab's directory goes (default: /tmp)")
    runner.add_argument("--prefix", default="hcs", help="the lab's namespace prefix")
    runner.add_argument("--subnet", default="198.18.6.0/24", help="the lab's addresses")
    runner.set_defaults(func=cmd_chaos)
