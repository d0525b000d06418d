"""``hamta dkim keygen`` and ``hamta suppression list|add|remove``: the sender-reputation tools.

``hamta suppression`` acts through the running relay's control socket when the relay is active
(the list is then open there, and one process writing it is simplest to reason about), and on
the SQLite file in the spool directory when no relay is active on this node, as ``hamta queue``
reads the spool when the relay is down.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hamta.commands import load_or_exit
from hamta.control_client import ControlError, send_command
from hamta.suppression import SuppressionError, SuppressionStore

_ACTIONS = ("list", "add", "remove")


# --------------------------------------------------------------------- dkim


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    """``hamta dkim keygen DOMAIN SELECTOR``: a new key file (0600) and its DNS record."""
    from hamta.dkim_signing import dns_record_line, generate_key  # noqa: PLC0415

    try:
        key = generate_key(args.directory, args.domain, args.selector, args.algorithm, args.bits)
    except FileExistsError as exc:
        print(
            f"hamta: {exc.filename} exists; a published key is never overwritten", file=sys.stderr
        )
        return 1
    except OSError as exc:
        print(f"hamta: cannot write the key in {args.directory}: {exc.strerror}", file=sys.stderr)
        return 1
    print(
        f"hamta: wrote {key.path} ({key.algorithm}, mode 0600); configure it with:\n"
        f'  [[dkim.keys]]\n  domain = "{key.domain}"\n  selector = "{key.selector}"\n'
        f'  key = "{key.path.resolve()}"\n  algorithm = "{key.algorithm}"\n'
        "and publish this record before signing with it:",
        file=sys.stderr,
    )
    print(dns_record_line(key.dns_name, key.txt_value))
    return 0


# -------------------------------------------------------------- suppression


def _through_relay(socket: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The relay's reply, or None when no active relay answers on ``socket``."""
    try:
        status = send_command(socket, {"command": "status"}, timeout=10)
    except ControlError:
        return None
    if status.get("state") != "active":
        return None
    return send_command(socket, request, timeout=60)  # its refusal is the answer: raise


def _in_spool(spool: Path, action: str, address: str, detail: str) -> dict[str, Any]:
    store = SuppressionStore.in_spool(spool)
    try:
        if action == "list":
            return {"entries": [entry.as_dict() for entry in store.entries()]}
        if action == "add":
            entry, added = store.add(address, "manual", detail)
            return {"added": added, "entry": entry.as_dict()}
        return {"removed": store.remove(address)}
    finally:
        store.close()


def _print(action: str, address: str, reply: dict[str, Any]) -> None:
    if action == "list":
        entries: list[dict[str, Any]] = reply["entries"]
        print(f"{len(entries)} suppressed ({reply['source']})")
        if entries:
            width = max(len("address"), *(len(e["address"]) for e in entries))
            print(f"{'address':<{width}}  {'reason':<14}  {'since':<10}  detail")
            for e in entries:
                print(f"{e['address']:<{width}}  {e['reason']:<14}  {e['date']:<10}  {e['detail']}")
    elif action == "add":
        entry = reply["entry"]
        verb = "suppressed" if reply["added"] else "already suppressed"
        print(
            f"{verb}: {entry['address']} ({entry['reason']} on {entry['date']}) [{reply['source']}]"
        )
    else:
        verb = "removed" if reply["removed"] else "was not suppressed"
        print(f"{verb}: {address.strip().lower()} [{reply['source']}]")


def cmd_suppression(args: argparse.Namespace) -> int:
    """``hamta suppression list|add|remove``: through the running relay, else in the spool."""
    config = load_or_exit(args.config)
    action: str = args.action
    address = args.address or ""
    if action != "list" and not address:
        print(f"hamta: suppression {action} needs an ADDRESS", file=sys.stderr)
        return 2
    request = {"command": f"suppression-{action}", "address": address, "detail": args.detail}
    socket = args.socket or config.control.socket
    try:
        reply = _through_relay(socket, request)
        if reply is not None:
            reply["source"] = f"relay at {socket}"
        else:
            spool: Path = args.spool or config.spool.path
            if not (spool / "journal").is_dir():
                print(
                    f"hamta: no active relay answers on {socket} and no spool at {spool}",
                    file=sys.stderr,
                )
                return 1
            reply = _in_spool(spool, action, address, args.detail)
            reply["source"] = f"spool {spool}, no relay active"
    except (ControlError, SuppressionError, ValueError) as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        _print(action, address, reply)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``hamta dkim`` and ``hamta suppression`` on the top-level subparsers."""
    dkim = sub.add_parser("dkim", help="DKIM keys")
    dkim_sub = dkim.add_subparsers(dest="dkim_command", required=True)
    keygen = dkim_sub.add_parser(
        "keygen", help="write a new private key (0600) and print its DNS TXT record"
    )
    keygen.add_argument("domain")
    keygen.add_argument("selector")
    keygen.add_argument(
        "--algorithm", choices=["rsa-sha256", "ed25519-sha256"], default="rsa-sha256"
    )
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--directory", type=Path, default=Path("."), help="where the key goes")
    keygen.set_defaults(func=cmd_dkim_keygen)

    suppression = sub.add_parser("suppression", help="recipients refused at RCPT")
    suppression.add_argument("action", choices=_ACTIONS)
    suppression.add_argument("address", nargs="?", help="the recipient (add, remove)")
    suppression.add_argument("--detail", default="", help="why (add), kept with the entry")
    suppression.add_argument("--config", type=Path, help="TOML file (default: built-in)")
    suppression.add_argument("--socket", type=Path, help="control socket (default: from config)")
    suppression.add_argument("--spool", type=Path, help="spool directory when no relay is active")
    suppression.add_argument("--json", action="store_true", help="print JSON")
    suppression.set_defaults(func=cmd_suppression)
