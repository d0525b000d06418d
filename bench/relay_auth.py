"""What SMTP AUTH costs: sessions per second with AUTH PLAIN over implicit TLS (465), argon2id.

``hamta serve`` with one ``submissions`` listener and a password file of one argon2id user
(``hamta auth add``, argon2-cffi's defaults: 64 MiB, 3 passes, 4 lanes). ``clients`` threads
open sessions one after another: TLS handshake, EHLO, AUTH PLAIN, QUIT. The same run without
the AUTH gives the TLS-only rate beside it, so that the difference is the login's own cost
(the argon2id verification, in a thread, dominates). Figures: sessions per second, each run
lasting ``seconds``.
"""

import smtplib
import ssl
import subprocess
import threading
import time
from pathlib import Path

from relay_common import LOCALHOST, BenchError, child_env, free_ports, say, shielded, stop_child
from relay_hamta import wait_ready

from cluster.lab.configs import render_toml
from cluster.lab.submission import self_signed

USER = "bench@bench.test"
PASSWORD = "bench-password-1"


def _sessions(port: int, seconds: float, clients: int, login: bool) -> tuple[int, list[str]]:
    """Sessions completed by ``clients`` threads in ``seconds``, and the first errors."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + seconds
    done = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        while time.monotonic() < deadline:
            try:
                with smtplib.SMTP_SSL(LOCALHOST, port, timeout=30, context=context) as session:
                    session.ehlo("bench.test")
                    if login:
                        session.user, session.password = USER, PASSWORD
                        session.auth("PLAIN", session.auth_plain)
            except (smtplib.SMTPException, OSError) as exc:
                with lock:
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0], errors


def run_auth(
    base: Path, hamta: Path, *, seconds: float = 10.0, clients: int = 8
) -> dict[str, float]:
    """``auth_sessions_per_s`` and ``tls_sessions_per_s`` of one relay process."""
    env = child_env()
    base.mkdir(parents=True, exist_ok=True)
    cert, key = self_signed(["hamta.bench.test"])
    (base / "tls.crt").write_bytes(cert)
    (base / "tls.key").write_bytes(key)
    users = base / "users"
    subprocess.run(
        [str(hamta), "auth", "add", USER, "--file", str(users)],
        input=PASSWORD + "\n",
        text=True,
        env=env,
        check=True,
        capture_output=True,
    )
    smtp_port, admin_port = free_ports(LOCALHOST, 2, set())
    config = base / "hamta.toml"
    config.write_text(
        render_toml(
            {
                "node": {"hostname": "hamta.bench.test", "user": "root"},
                "smtp": {
                    "listeners": [
                        {"listen": f"{LOCALHOST}:{smtp_port}", "role": "submissions", "auth": "f"}
                    ],
                    "tls_cert": base / "tls.crt",
                    "tls_key": base / "tls.key",
                    "max_connections_per_client": 1000,
                },
                # Every login is good: no backoff, no lockout in the way of the figure.
                "auth": {"backends": {"f": {"type": "password_file", "path": users}}},
                "spool": {"path": base / "spool"},
                "admin": {"listen": f"{LOCALHOST}:{admin_port}"},
                "control": {"socket": base / "relay.sock"},
                "log": {"file": base / "hamta.log", "level": "warning"},
            }
        )
    )
    err_file = base / "hamta.stderr"
    with open(err_file, "wb") as err:
        proc = subprocess.Popen(
            [str(hamta), "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=base,
            start_new_session=True,
        )
    try:
        wait_ready(proc, f"http://{LOCALHOST}:{admin_port}/health/ready", err_file)
        figures = {}
        for name, login in (("tls_sessions_per_s", False), ("auth_sessions_per_s", True)):
            count, errors = _sessions(smtp_port, seconds, clients, login)
            if errors:
                raise BenchError(f"{name}: {errors}")
            figures[name] = round(count / seconds, 1)
            label = name.replace("_", " ")
            say(f"{label}: {figures[name]} ({count} in {seconds:g}s, {clients} clients)")
        return figures
    finally:
        with shielded():
            stop_child(proc)
