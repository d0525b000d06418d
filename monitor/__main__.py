"""``python -m monitor ...`` until the monitor is registered in hamta's dispatcher (issue 16)."""

from __future__ import annotations

import argparse
import sys

from monitor.commands import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitor")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["monitor", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
