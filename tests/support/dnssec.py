"""A validating resolver for tests: unbound serving zones, one of them signed with ldns.

DANE (RFC 7672) trusts only answers a validating resolver vouches for (the AD bit), so its tests
need a real one: :class:`ValidatingResolver` signs the ``signed`` zones with ``ldns-keygen`` and
``ldns-signzone``, serves them and the ``unsigned`` ones from unbound's ``auth-zone`` (as if
fetched from upstream, so the validator checks them) and trusts the signed zones' keys as
anchors. A signed zone's answers carry AD; an unsigned zone's do not (insecure: no anchor covers
it); a record edited after signing (``tamper``) fails validation, and unbound answers SERVFAIL
(bogus). Nothing is forwarded anywhere: a name outside the zones gets no answer.
The zones and unbound's configuration are made by cluster.lab.dnssec, as for the lab.
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode

from cluster.lab.dnssec import ZoneError, sign_zone, unbound_argv, unbound_config, write_zone

from .ports import free_port
from .started import Started, end_process


class ResolverError(RuntimeError):
    """unbound or the ldns tools failed; the message quotes their output."""


class ValidatingResolver(Started):
    """unbound on ``listen`` (a loopback address) serving and validating the given zones.

    ``signed``/``unsigned`` map a zone name to its records, each a line of zone-file text
    relative to nothing (``"mx.dane.test. 60 IN A 127.0.0.1"``); SOA and NS are added. ``tamper``
    lines are appended to a signed zone after signing: their RRsets then fail validation.
    """

    def __init__(
        self,
        dir: Path,
        signed: Mapping[str, Sequence[str]],
        unsigned: Mapping[str, Sequence[str]] | None = None,
        tamper: Mapping[str, Sequence[str]] | None = None,
        *,
        listen: str = "127.0.0.1",
        start_timeout: float = 10.0,
    ) -> None:
        if not ipaddress.ip_address(listen).is_loopback:
            raise ValueError(f"ValidatingResolver listens on loopback addresses only: {listen!r}")
        self.dir = dir
        self.host = listen
        self.port = 0
        self.start_timeout = start_timeout
        self._signed = signed
        self._unsigned = unsigned or {}
        self._tamper = tamper or {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def nameserver(self) -> str:
        """``host:port`` for a relay's ``[dns] nameservers``."""
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        """Make and sign the zones, start unbound, return once it answers with AD."""
        if self._proc is not None:
            raise RuntimeError("ValidatingResolver already started")
        self.dir.mkdir(parents=True, exist_ok=True)
        anchors: list[Path] = []
        auth: list[tuple[str, Path]] = []
        try:
            for zone, records in self._signed.items():
                path = write_zone(self.dir, zone, self.host, records)
                signed, anchor = sign_zone(zone, path, self._tamper.get(zone, ()))
                anchors.append(anchor)
                auth.append((zone, signed))
            for zone, records in self._unsigned.items():
                auth.append((zone, write_zone(self.dir, zone, self.host, records)))
            self.port = free_port(self.host, udp=True)
            conf = unbound_config(
                self.dir, self.host, self.port, anchors, auth, [f"{self.host}/32"]
            )
        except ZoneError as exc:
            raise ResolverError(str(exc)) from None
        log = (self.dir / "unbound.log").open("wb")
        self._proc = subprocess.Popen(unbound_argv(conf), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_ready(next(iter(self._signed)))

    def _wait_ready(self, zone: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        query = dns.message.make_query(zone, "SOA", want_dnssec=True)
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                break
            try:
                answer = dns.query.udp(query, self.host, port=self.port, timeout=0.2)
            except (OSError, dns.exception.Timeout):
                continue
            if answer.rcode() == dns.rcode.NOERROR and answer.flags & dns.flags.AD:
                return
            time.sleep(0.05)  # polling an external process until it serves: no event to await
        self.stop()
        raise ResolverError(f"unbound did not validate {zone}: {self.log()}")

    def log(self) -> str:
        """unbound's output so far."""
        path = self.dir / "unbound.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        """Stop unbound (idempotent)."""
        proc, self._proc = self._proc, None
        end_process(proc, 5)
