"""What bench/monitor_alerts.py breaks and listens with: real peers, certificates, DNS, a namespace.

* certificates made with ``cryptography`` (a CA, and leaves valid or already expired);
* SMTP peers: ``python -m aiosmtpd`` processes (with STARTTLS when given a certificate),
  optionally inside a network namespace;
* dnsmasq (cluster/lab/dns.py's command line) answering from a records file, restarted with
  other records;
* a namespace ``hh5mon`` joined by a veth pair on 198.19.225.0/24, where nftables drops port 25;
* a webhook receiver (http.server in a thread) that notes when each trigger arrives;
* a real ``hamta serve``.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from relay_common import BenchError, child_env, log_tail, stop_child, wait_for_smtp

from cluster.lab.configs import render_toml
from cluster.lab.dns import dnsmasq_argv

NETNS = "hh5mon"
HOST_SIDE, NS_SIDE = "hh5a", "hh5b"
HOST_ADDRESS, NS_ADDRESS = "198.19.225.1", "198.19.225.2"
START_SECONDS = 20.0


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


class Certificates:
    """A throw-away CA in ``directory`` and the leaves it signs."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.ca = (
            x509.CertificateBuilder()
            .subject_name(_name("hamta bench CA"))
            .issuer_name(_name("hamta bench CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=400))
            .not_valid_after(now + datetime.timedelta(days=400))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.crt"
        self.ca_file.write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))

    def issue(self, label: str, name: str, start_days: float, end_days: float) -> tuple[Path, Path]:
        """A leaf for ``name`` valid from now+start_days to now+end_days: (cert, key)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=start_days))
            .not_valid_after(now + datetime.timedelta(days=end_days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert, key_file = self.dir / f"{label}.crt", self.dir / f"{label}.key"
        cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_file)
        return cert, key_file


class Peer:
    """``python -m aiosmtpd`` on ``host:port`` (in ``netns`` when given); STARTTLS with a cert."""

    def __init__(self, log: Path, host: str, port: int, *, netns: str | None = None) -> None:
        self.log, self.host, self.port, self.netns = log, host, port, netns
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cert: tuple[Path, Path] | None = None) -> None:
        argv = [sys.executable, "-m", "aiosmtpd", "-n", "-c", "aiosmtpd.handlers.Sink"]
        argv += ["-l", f"{self.host}:{self.port}"]
        if cert is not None:
            argv += ["--tlscert", str(cert[0]), "--tlskey", str(cert[1]), "--no-requiretls"]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, env=child_env(), stdout=subprocess.DEVNULL, stderr=log
            )
        _started(self.proc, self.host, self.port, self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_child(self.proc)
        self.proc = None


def _started(proc: subprocess.Popen[bytes], host: str, port: int, log: Path) -> None:
    """Wait for the 220 of what ``proc`` serves; a BenchError quotes its stderr if it died."""
    try:
        wait_for_smtp(host, port, time.monotonic() + START_SECONDS, lambda: proc.poll() is None)
    except BenchError as exc:
        raise BenchError(f"{exc}: {log_tail(log)}") from None


def _run(*argv: str, stdin: str | None = None) -> None:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


class Namespace:
    """``hh5mon``, joined to this host by a veth pair: a peer there can be firewalled alone."""

    @staticmethod
    def usable() -> str | None:
        """Why a namespace cannot be made here (None: it can)."""
        if os.geteuid() != 0:
            return "not root"
        for tool in ("/usr/sbin/ip", "/usr/sbin/nft"):
            if not os.access(tool, os.X_OK):
                return f"no {tool}"
        return None

    def __enter__(self) -> Namespace:
        self.remove()  # what a crashed earlier run left
        _run("ip", "netns", "add", NETNS)
        try:
            _run("ip", "link", "add", HOST_SIDE, "type", "veth", "peer", "name", NS_SIDE)
            _run("ip", "link", "set", NS_SIDE, "netns", NETNS)
            _run("ip", "addr", "add", f"{HOST_ADDRESS}/24", "dev", HOST_SIDE)
            _run("ip", "link", "set", HOST_SIDE, "up")
            _run("ip", "-n", NETNS, "addr", "add", f"{NS_ADDRESS}/24", "dev", NS_SIDE)
            _run("ip", "-n", NETNS, "link", "set", NS_SIDE, "up")
            _run("ip", "-n", NETNS, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @staticmethod
    def remove() -> None:
        # Either may be gone already (the veth goes with the namespace): not an error.
        for argv in (["ip", "netns", "del", NETNS], ["ip", "link", "del", HOST_SIDE]):
            subprocess.run(argv, capture_output=True, timeout=30, check=False)

    def block(self, port: int) -> None:
        """Drop what arrives for ``port`` in the namespace: a firewall change, not a crash."""
        rules = (
            "table inet hh5 {\n chain input {\n  type filter hook input priority 0;\n"
            f"  tcp dport {port} drop\n }}\n}}\n"
        )
        _run("ip", "netns", "exec", NETNS, "nft", "-f", "-", stdin=rules)


class Dnsmasq:
    """dnsmasq on 127.0.0.1:``port`` serving ``records`` (dnsmasq option lines); restartable."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir, self.port = workdir, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, records: list[str]) -> None:
        config = self.workdir / "dnsmasq.conf"
        config.write_text("no-resolv\nno-hosts\naddress=/#/\n" + "\n".join(records) + "\n")
        argv = dnsmasq_argv(config, "127.0.0.1", self.port, self.workdir / "dnsmasq.log")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_child(self.proc)
        self.proc = None


class Relay:
    """A real ``hamta serve`` with its own spool, on ``port`` (admin on ``admin_port``)."""

    def __init__(self, workdir: Path, port: int, admin_port: int) -> None:
        self.workdir, self.port = workdir, port
        workdir.mkdir(parents=True, exist_ok=True)
        sections: dict[str, dict[str, Any]] = {
            "node": {"hostname": "relay.bench.test", "stop_timeout": "2s", "user": "root"},
            "smtp": {"listen": [f"127.0.0.1:{port}"]},
            "spool": {"path": workdir / "spool"},
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "control": {"socket": workdir / "relay.sock"},
            "log": {"file": workdir / "hamta.log"},
        }
        self.config = workdir / "hamta.toml"
        self.config.write_text(render_toml(sections))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "hamtactl", "serve", "--config", str(self.config)]
        log_path = self.workdir / "stderr"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, env=child_env(), stdout=subprocess.DEVNULL, stderr=log
            )
        _started(self.proc, "127.0.0.1", self.port, log_path)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Receiver:
    """An HTTP server taking the monitor's webhook POSTs; the monotonic time of each trigger."""

    def __init__(self) -> None:
        self.triggers: dict[str, float] = {}
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the name http.server looks up
                arrived = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"] or 0)))
                with receiver._lock:
                    receiver.bodies.append(body)
                    if body.get("event") == "trigger":
                        receiver.triggers.setdefault(str(body.get("check")), arrived)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass  # the bench prints its own lines

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def trigger(self, check: str) -> float | None:
        with self._lock:
            return self.triggers.get(check)

    def forget(self) -> None:
        with self._lock:
            self.triggers.clear()
