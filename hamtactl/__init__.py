"""The ``hamta`` command: one dispatcher for the sub-commands of every package.

It stands outside the packages it dispatches to, so that none of them imports another for the
command line's sake: each package registers its own sub-commands in a module of its own
(``register(subparsers)``), and the dispatcher imports only the module that owns the first word
it is given. ``hamta serve`` thus loads the relay and nothing of ``cluster``, ``fencing`` or
``chaos``; ``hamta drbd fence-peer`` (DRBD's handler, on a takeover's critical path) nothing of
the relay's runtime. ``hamta --help``, or a word no module owns, loads them all to list them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# The first word of a command line → the module that registers it. Written out, not found by
# importing every module: not importing them is what the table is for. The order is --help's.
COMMANDS: dict[str, str] = {
    "serve": "hamta.serve",
    "relay": "hamta.commands",
    "queue": "hamta.commands",
    "capacity": "hamta.commands",
    "spool": "hamta.commands",
    "config": "hamta.commands",
    "dkim": "hamta.reputation_cli",
    "suppression": "hamta.reputation_cli",
    "auth": "hamta.auth_cli",
    "agent": "cluster.commands",
    "cluster": "cluster.commands",
    "drbd": "cluster.commands",
    "fleet": "cluster.fleet_commands",
    "chaos": "chaos.commands",
    "lab": "cluster.lab.commands",
    "monitor": "monitor.commands",
}


def modules_for(argv: Sequence[str]) -> list[str]:
    """The command modules ``argv`` needs: the one owning its first word, else every one."""
    owner = COMMANDS.get(argv[0]) if argv else None
    return [owner] if owner is not None else list(dict.fromkeys(COMMANDS.values()))


def build_parser(modules: Sequence[str]) -> argparse.ArgumentParser:
    """The ``hamta`` parser with the sub-commands of ``modules``."""
    parser = argparse.ArgumentParser(
        prog="hamta",
        description="hamta: the relay, its cluster agent, the lab and the chaos suite.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in modules:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hamta`` console script and of ``python -m hamtactl``."""
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(modules_for(words)).parse_args(words)
    result: int = args.func(args)
    return result
