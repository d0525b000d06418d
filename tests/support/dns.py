"""A real DNS server for tests: dnsmasq answering only from the records it is given.

The relay resolves MX, A and AAAA records through an ordinary resolver, so its tests point it
at this server instead of mocking dnspython. dnsmasq is configured so that nothing it is asked
can leave the machine: it reads no resolv.conf and no hosts file, and ``address=/#/`` turns every
name it has no record for into NXDOMAIN instead of a forward to an upstream server.
"""

from __future__ import annotations

import ipaddress
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.resolver
import dns.reversename

from .ports import free_port
from .started import Started, end_process

DNSMASQ = Path("/usr/sbin/dnsmasq")

# Any name dnsmasq has no record for answers NXDOMAIN; an answer of any kind proves it serves.
_PROBE_NAME = "hamta-readiness-probe.invalid."
# How long one readiness probe waits for an answer; also the polling interval.
_PROBE_TIMEOUT = 0.05
# A port picked by free_port() can be taken by someone else before dnsmasq binds it.
_BIND_ATTEMPTS = 5


class DnsServerError(RuntimeError):
    """dnsmasq could not be started or did not answer in time; the message quotes its log."""


def _name(name: str) -> str:
    """Normalise a domain for dnsmasq's option syntax, which has no quoting."""
    bare = name.strip().rstrip(".").lower()
    if not bare or any(c in bare for c in ",/#= \t\n"):
        raise ValueError(f"unusable domain name for dnsmasq: {name!r}")
    return bare


def _address(text: str, version: int) -> str:
    address = ipaddress.ip_address(text)
    if address.version != version:
        raise ValueError(f"{text!r} is not an IPv{version} address")
    return str(address)


def _format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DnsServer(Started):
    """A dnsmasq process serving exactly the given records on a loopback address.

    ``mx`` maps a domain to ``(preference, exchange)`` pairs, ``a``/``aaaa`` map a name to its
    addresses and ``null_mx`` lists domains that publish the RFC 7505 null MX ``0 .``. Every
    other name is NXDOMAIN; a name that has records of some other type answers NOERROR with an
    empty answer (e.g. MX for a domain that only has an A record, so a relay falls back to A).
    Records have TTL 0, so no resolver caches them between test steps.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Point a resolver at
    :attr:`nameserver` (``"127.0.0.1:PORT"``) or take one from :meth:`resolver`.
    """

    def __init__(
        self,
        mx: Mapping[str, Sequence[tuple[int, str]]] | None = None,
        a: Mapping[str, Sequence[str]] | None = None,
        aaaa: Mapping[str, Sequence[str]] | None = None,
        null_mx: Iterable[str] = (),
        listen: str = "127.0.0.1",
        ptr: Mapping[str, str] | None = None,
        *,
        port: int = 0,
        log_queries: bool = False,
        start_timeout: float = 10.0,
    ) -> None:
        if not ipaddress.ip_address(listen).is_loopback:
            # Tests must never serve (or be reachable) beyond this machine.
            raise ValueError(f"DnsServer listens on loopback addresses only, not {listen!r}")
        self.host = listen
        self.port = port
        self.log_queries = log_queries
        self.start_timeout = start_timeout
        self._records = self._config_lines(mx or {}, a or {}, aaaa or {}, null_mx)
        # ``ptr``: address -> name, PTR records of their own (an ``a`` record already brings
        # the matching PTR; these make the ones that do not match).
        self._records += [
            f"ptr-record={dns.reversename.from_address(address).to_text(omit_final_dot=True)},"
            f"{_name(name)}"
            for address, name in (ptr or {}).items()
        ]
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _config_lines(
        mx: Mapping[str, Sequence[tuple[int, str]]],
        a: Mapping[str, Sequence[str]],
        aaaa: Mapping[str, Sequence[str]],
        null_mx: Iterable[str],
    ) -> list[str]:
        lines = []
        for domain, exchanges in mx.items():
            for preference, exchange in exchanges:
                if not 0 <= preference <= 65535:
                    raise ValueError(f"MX preference out of range: {preference}")
                target = "." if exchange.strip() == "." else _name(exchange)
                lines.append(f"mx-host={_name(domain)},{target},{preference}")
        for domain in null_mx:
            # dnsmasq 2.90 takes "." as the exchange literally and serves "MX 0 ." (checked
            # with dnspython in tests/test_support.py), and unlike a raw dns-rr record an
            # mx-host makes the name exist, so A/AAAA queries for it get NODATA, not NXDOMAIN.
            lines.append(f"mx-host={_name(domain)},.,0")
        # host-record rather than address=/name/ip: the latter would also answer every
        # subdomain, and host-record names answer NODATA for the types they lack.
        for name, addresses in a.items():
            lines.extend(f"host-record={_name(name)},{_address(x, 4)}" for x in addresses)
        for name, addresses in aaaa.items():
            lines.extend(f"host-record={_name(name)},{_address(x, 6)}" for x in addresses)
        return lines

    @property
    def nameserver(self) -> str:
        """``host:port`` (``[v6]:port`` for IPv6) of the running server."""
        return _format_hostport(self.host, self.port)

    @property
    def log_path(self) -> Path | None:
        """dnsmasq's own log file (queries too with ``log_queries=True``) while running."""
        return Path(self._tmp.name, "dnsmasq.log") if self._tmp is not None else None

    @property
    def running(self) -> bool:
        """Whether the dnsmasq process this object started is still alive."""
        return self._proc is not None and self._proc.poll() is None

    def resolver(self, lifetime: float = 2.0) -> dns.resolver.Resolver:
        """A dnspython resolver that asks this server only (no system configuration)."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.lifetime = lifetime
        resolver.timeout = lifetime
        return resolver

    def start(self) -> None:
        """Start dnsmasq and return once it answers queries; raise DnsServerError if not."""
        if self._proc is not None:
            raise RuntimeError("DnsServer already started")
        self._tmp = tempfile.TemporaryDirectory(prefix="hamta-dnsmasq-")
        try:
            pick_port = self.port == 0
            for attempt in range(_BIND_ATTEMPTS):
                if pick_port:
                    self.port = free_port(self.host, udp=True)
                try:
                    self._launch_and_wait()
                    return
                except DnsServerError as exc:
                    in_use = "Address already in use" in str(exc)
                    if not (pick_port and in_use) or attempt == _BIND_ATTEMPTS - 1:
                        raise
        except BaseException:
            self.stop()
            if pick_port:
                self.port = 0
            raise

    def _launch_and_wait(self) -> None:
        assert self._tmp is not None
        tmp = Path(self._tmp.name)
        conf = tmp / "dnsmasq.conf"
        conf.write_text("\n".join(["address=/#/", *self._records]) + "\n")
        argv = [
            str(DNSMASQ),
            # Stays our child (its pid is Popen's pid) but still drops root privileges.
            "--keep-in-foreground",
            # Our file instead of /etc/dnsmasq.conf, which could pull in conf-dir and servers.
            f"--conf-file={conf}",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            f"--listen-address={self.host}",
            f"--port={self.port}",
            f"--pid-file={tmp / 'dnsmasq.pid'}",
            f"--log-facility={tmp / 'dnsmasq.log'}",
        ]
        if self.log_queries:
            argv.append("--log-queries")
        with (tmp / "stderr").open("wb") as stderr:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        probe = dns.message.make_query(_PROBE_NAME, "A")
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                dns.query.udp(probe, self.host, port=self.port, timeout=_PROBE_TIMEOUT)
                return
            except (dns.exception.Timeout, OSError):
                pass
            if self._proc.poll() is not None:
                self._proc = None
                raise DnsServerError(f"dnsmasq exited during start: {self._diagnostics()}")
            if time.monotonic() > deadline:
                self._terminate()
                raise DnsServerError(
                    f"dnsmasq did not answer within {self.start_timeout}s: {self._diagnostics()}"
                )

    def _diagnostics(self) -> str:
        if self._tmp is None:
            return ""
        texts = []
        for name in ("stderr", "dnsmasq.log"):
            path = Path(self._tmp.name, name)
            if path.exists():
                texts.append(path.read_text(errors="replace").strip())
        return " | ".join(t for t in texts if t)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        end_process(proc, 5)

    def stop(self) -> None:
        """Terminate the dnsmasq this object started (by its pid) and remove its files."""
        self._terminate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
