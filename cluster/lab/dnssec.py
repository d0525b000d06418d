"""Signed zones and a validating resolver's configuration: ldns-keygen, ldns-signzone, unbound.

DANE (RFC 7672) trusts only what a validating resolver vouches for (the AD bit). The lab's
internet host and the tests (tests/support/dnssec.py) serve their zones from unbound's
``auth-zone`` as if fetched from upstream, so that its validator checks them against the signed
zones' keys, configured as trust anchors. A zone without an anchor is insecure (no AD).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Final

UNBOUND: Final = "/usr/sbin/unbound"
UNBOUND_CHECKCONF: Final = "/usr/sbin/unbound-checkconf"


class ZoneError(RuntimeError):
    """The ldns tools or unbound-checkconf failed; the message quotes their output."""


def _run(argv: Sequence[str], cwd: Path) -> str:
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            check=False,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ZoneError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise ZoneError(f"{argv[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def write_zone(directory: Path, zone: str, ns_address: str, records: Sequence[str]) -> Path:
    """``<zone>.zone`` in ``directory``: SOA, NS (``ns.<zone>`` at ``ns_address``), ``records``."""
    origin = zone.rstrip(".") + "."
    lines = [
        f"$ORIGIN {origin}",
        "$TTL 60",
        f"@ IN SOA ns.{origin} hostmaster.{origin} 1 3600 600 86400 60",
        f"@ IN NS ns.{origin}",
        f"ns.{origin} IN A {ns_address}",
        *records,
    ]
    path = directory / f"{origin}zone"
    path.write_text("\n".join(lines) + "\n")
    return path


def sign_zone(zone: str, path: Path, tamper: Sequence[str] = ()) -> tuple[Path, Path]:
    """Sign the zone file at ``path`` with a new key; return the signed file and its trust
    anchor (the key's DS record). ``tamper`` lines are added after signing: those RRsets then
    fail validation (bogus), as a forged answer would."""
    keygen, signzone = shutil.which("ldns-keygen"), shutil.which("ldns-signzone")
    if keygen is None or signzone is None:
        raise ZoneError("ldns-keygen/ldns-signzone are not installed (Debian's ldnsutils)")
    origin = zone.rstrip(".") + "."
    directory = path.parent
    # One key signing the whole zone (KSK flag): enough for a validator, quick to make.
    base = _run([keygen, "-a", "ECDSAP256SHA256", "-k", origin], directory)
    _run([signzone, "-o", origin, str(path), base], directory)
    signed = path.with_name(path.name + ".signed")
    if tamper:
        with signed.open("a") as out:
            out.write("\n".join(tamper) + "\n")
    return signed, directory / f"{base}.ds"


def unbound_config(
    directory: Path,
    listen: str,
    port: int,
    anchors: Sequence[Path],
    zones: Sequence[tuple[str, Path]],
    allow: Sequence[str],
) -> Path:
    """unbound.conf in ``directory``: validating, serving ``zones`` from files, checked."""
    lines = [
        "server:",
        f"  interface: {listen}",
        f"  port: {port}",
        "  do-daemonize: no",
        '  username: ""',
        '  chroot: ""',
        f'  directory: "{directory}"',
        '  pidfile: ""',
        '  logfile: ""',
        "  use-syslog: no",
        "  verbosity: 1",
        "  val-log-level: 2",
        *(f"  access-control: {network} allow" for network in allow),
        '  module-config: "validator iterator"',
        "  do-not-query-localhost: no",
        # unbound's own local zone for test. (RFC 6761) would answer before the auth zones.
        '  local-zone: "test." nodefault',
        # ... and its defaults for private and documentation reverse zones (RFC 6303).
        *(f'  local-zone: "{zone}." nodefault' for zone, _ in zones if zone.endswith(".arpa")),
        # Each answer fresh from the zones: a test or the lab sees a changed zone at once.
        "  cache-max-ttl: 0",
        "  cache-max-negative-ttl: 0",
        *(f'  trust-anchor-file: "{anchor}"' for anchor in anchors),
    ]
    for zone, path in zones:
        lines += [
            "auth-zone:",
            f'  name: "{zone}"',
            f'  zonefile: "{path}"',
            "  for-downstream: no",
            "  for-upstream: yes",
            "  fallback-enabled: no",
        ]
    conf = directory / "unbound.conf"
    conf.write_text("\n".join(lines) + "\n")
    _run([UNBOUND_CHECKCONF, str(conf)], directory)
    return conf


def unbound_argv(conf: Path) -> list[str]:
    """unbound in the foreground (its pid is ours to end), logging to stderr."""
    return [UNBOUND, "-d", "-c", str(conf)]
