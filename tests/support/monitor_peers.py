"""Peers for the monitor's tests: a CA and its certificates, SMTP servers, a tarpit, DNS.

Certificates are issued by a test CA with ``openssl ca``, which (unlike ``req -x509``) takes
any start and end dates: a valid one, one expiring in 10 days, one expired last year, one for
another host name. The SMTP peer is aiosmtpd with STARTTLS or implicit TLS and AUTH after TLS.
"""

from __future__ import annotations

import datetime
import shutil
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from .dns import DnsServer, _name
from .ports import free_port

_CA_CONFIG = """\
[ca]
default_ca = test
[test]
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = anything
unique_subject = no
[anything]
commonName = supplied
[leaf]
basicConstraints = CA:FALSE
subjectAltName = DNS:{name}
"""


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("the openssl command line tool is not installed")
    subprocess.run([openssl, *args], check=True, stdin=subprocess.DEVNULL, capture_output=True)


_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


class TestCa:
    """A CA made at test time; :meth:`issue` signs a leaf for a name with chosen dates."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = directory / "ca.crt", directory / "ca.key"
        _openssl(
            "req",
            "-x509",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            "/CN=hamta monitor test CA",
            *_EC,
            "-keyout",
            str(self.key),
            "-out",
            str(self.cert),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
        (directory / "index.txt").touch()
        (directory / "serial").write_text("01\n")

    def issue(self, label: str, name: str, start_days: float, end_days: float) -> tuple[Path, Path]:
        """A leaf for ``name`` valid from now+start_days to now+end_days: (cert, key)."""
        now = datetime.datetime.now(datetime.UTC)
        dates = [
            (now + datetime.timedelta(days=d)).strftime("%Y%m%d%H%M%SZ")
            for d in (start_days, end_days)
        ]
        cert, key, csr = (self.dir / f"{label}.{ext}" for ext in ("crt", "key", "csr"))
        config = self.dir / f"{label}.cnf"
        config.write_text(_CA_CONFIG.format(dir=self.dir, name=name))
        _openssl(
            "req",
            "-new",
            "-nodes",
            "-subj",
            f"/CN={name}",
            *_EC,
            "-keyout",
            str(key),
            "-out",
            str(csr),
        )
        _openssl(
            "ca",
            "-batch",
            "-config",
            str(config),
            "-cert",
            str(self.cert),
            "-keyfile",
            str(self.key),
            "-in",
            str(csr),
            "-out",
            str(cert),
            "-startdate",
            dates[0],
            "-enddate",
            dates[1],
            "-extensions",
            "leaf",
            "-notext",
        )
        return cert, key


def server_context(
    cert: Path, key: Path, *, maximum: ssl.TLSVersion | None = None, weak_only: bool = False
) -> ssl.SSLContext:
    """A server's TLS; ``maximum`` caps the protocol, ``weak_only`` offers one CBC cipher."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if weak_only:  # TLS 1.3's suites cannot be weakened: stop at 1.2
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE-ECDSA-AES128-SHA")
    if maximum is not None:
        # Old protocols need OpenSSL's security level 0 to be offered at all.
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        # The TLS 1.0-only peer is the point of the test that asks for it (the monitor must
        # refuse it): Python's warning about the old version is expected here, and only here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "ssl.TLSVersion.TLSv1", DeprecationWarning)
            context.maximum_version = maximum
        context.set_ciphers("ALL:@SECLEVEL=0")
    return context


class _Accept:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        return "250 OK"


class SmtpPeer:
    """aiosmtpd on 127.0.0.1: STARTTLS with ``starttls``, implicit TLS with ``implicit``.

    With ``users``, AUTH PLAIN/LOGIN is offered after TLS and checks those passwords.
    """

    def __init__(
        self,
        *,
        starttls: ssl.SSLContext | None = None,
        implicit: ssl.SSLContext | None = None,
        users: dict[str, str] | None = None,
        port: int = 0,
    ) -> None:
        self.port = port or free_port()
        self.users = users or {}
        kwargs: dict[str, Any] = {
            "hostname": "127.0.0.1",
            "port": self.port,
            "server_hostname": "peer.test",
            "ready_timeout": 10.0,
        }
        if starttls is not None:
            kwargs["tls_context"] = starttls
        if implicit is not None:
            kwargs["ssl_context"] = implicit
        if users:
            kwargs["authenticator"] = self._authenticate
            # aiosmtpd counts only STARTTLS as TLS; implicit TLS is TLS from the first byte.
            kwargs["auth_require_tls"] = implicit is None
        else:  # aiosmtpd offers its built-in mechanisms after TLS unless told not to
            kwargs["auth_exclude_mechanism"] = ["LOGIN", "PLAIN"]
        self.controller = Controller(_Accept(), **kwargs)

    def _authenticate(
        self, server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            user, password = data.login.decode(), data.password.decode()
            return AuthResult(success=self.users.get(user) == password, handled=False)
        return AuthResult(success=False, handled=False)

    def __enter__(self) -> Self:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


class Tarpit:
    """A TCP server that waits ``delay`` seconds before each SMTP reply (banner included)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _reply(self, conn: socket.socket, text: bytes) -> None:
        if not self._stop.wait(self.delay):
            conn.sendall(text)

    def _session(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._reply(conn, b"220 tarpit.test ESMTP\r\n")
                for line in conn.makefile("rb"):
                    if line.upper().startswith(b"QUIT"):
                        self._reply(conn, b"221 bye\r\n")
                        return
                    self._reply(conn, b"250 tarpit.test\r\n")
            except OSError:
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


def _quoted(strings: Sequence[str]) -> str:
    return ",".join('"' + text + '"' for text in strings)


class RecordsDnsServer(DnsServer):
    """dnsmasq with TXT and PTR records too; :meth:`replace` restarts it on the same port.

    ``txt`` maps a name to its records: a string is a record of one character-string, a list
    of strings one record of several (a DKIM key longer than 255 bytes).
    """

    def __init__(
        self,
        *,
        txt: dict[str, Sequence[str | Sequence[str]]] | None = None,
        ptr: dict[str, str] | None = None,
        **records: Any,
    ) -> None:
        super().__init__(**records)
        self._records.extend(self._extra_lines(txt or {}, ptr or {}))

    @staticmethod
    def _extra_lines(
        txt: dict[str, Sequence[str | Sequence[str]]], ptr: dict[str, str]
    ) -> list[str]:
        # dnsmasq makes each quoted text one character-string of the record.
        # One txt-record line per record; a record given as a list is several strings.
        lines = [
            f"txt-record={_name(n)},{_quoted([r] if isinstance(r, str) else r)}"
            for n, records in txt.items()
            for r in records
        ]
        lines += [f"ptr-record={_name(n)},{_name(target)}" for n, target in ptr.items()]
        return lines

    def replace(self, **records: Any) -> None:
        """Serve these records instead (the same port), e.g. to change an MX."""
        txt, ptr = records.pop("txt", {}), records.pop("ptr", {})
        self._records = self._config_lines(
            records.get("mx", {}), records.get("a", {}), records.get("aaaa", {}), ()
        ) + self._extra_lines(txt, ptr)
        self.stop()
        self.start()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_checks(checks: list[dict[str, Any]], **sections: dict[str, Any]) -> str:
    """A monitor.toml: ``sections`` as tables (``relay_config`` at the top), then the checks."""
    lines = []
    relay = sections.pop("top", {})
    lines += [f"{k} = {_toml_value(v)}" for k, v in relay.items()]
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in keys.items()]
    for check in checks:
        lines.append("[[checks]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in check.items()]
    return "\n".join(lines) + "\n"
