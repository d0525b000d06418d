"""Debian's Dovecot as a test's own auth service: a passwd-file, a private base_dir, no protocols.

Started in the foreground as a child of the test (``dovecot -F``), ended by its pid. Only the
auth service matters: its ``auth-client`` socket is what hamta's dovecot backend talks to.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from .started import Started, end_process

_CONFIG = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
protocols = none
ssl = no
auth_mechanisms = plain login
# hamta gets TLS-only logins; the test's connection to Dovecot is a unix socket.
disable_plaintext_auth = no
# Dovecot's own delay after a failure: hamta has its own backoff, and tests need no wait.
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = {dir}/passwd
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth {{
  # The passwd-file lies in the test's directory, which only root may enter.
  user = {auth_user}
  unix_listener auth-client {{
    mode = 0600
  }}
}}
"""


class Dovecot(Started):
    """``dovecot -F`` with ``users`` (name → plain password) in its passwd-file.

    ``readable=False`` runs its auth service as Dovecot's own user, which cannot enter the
    test's directory: every lookup fails inside Dovecot (a temporary failure, not a refusal).
    """

    def __init__(self, dir: Path, users: dict[str, str], *, readable: bool = True) -> None:
        if shutil.which("dovecot") is None:
            raise FileNotFoundError("dovecot is not installed (Debian's dovecot-core)")
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        (dir / "passwd").write_text(
            "".join(f"{user}:{{PLAIN}}{password}\n" for user, password in users.items())
        )
        self.config = dir / "dovecot.conf"
        self.config.write_text(_CONFIG.format(dir=dir, auth_user="root" if readable else "dovecot"))
        self.socket = dir / "run" / "auth-client"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Start it and wait for its auth-client socket."""
        self.proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "stderr", "wb"),  # noqa: SIM115 - the child holds it
        )
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "stderr").read_text(errors="replace")
                raise RuntimeError(f"dovecot did not start: {log}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM by pid (its master ends its own children), then wait."""
        end_process(self.proc, 10)
