"""A private Postfix that relays everything through hamta's submission port with SASL AUTH.

The way a site's own MTA or an application server hands its mail to a smarthost: Postfix's
``smtp_sasl_auth_enable`` with a static login, ``smtp_tls_security_level = encrypt`` (no AUTH
in clear) and ``relayhost`` at hamta's 587. Its own directories under a fresh directory in /tmp
(its daemons run as ``postfix`` and must enter them), never the system instance; stopped with
``postfix -c DIR stop`` and then, by pid, whatever of it is left.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .started import Started

_MAIN_CF = """\
# A test's private Postfix (tests/support/postfix_client.py); not the system one.
compatibility_level = 3.6
config_directory = {etc}
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = client-mta.hamta.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled in this instance
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{relay_port}
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = static:{user}:{password}
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
smtp_tls_security_level = encrypt
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
maillog_file = {log}
maillog_file_prefixes = /var, /dev/stdout, {base}
biff = no
"""

_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""


class PostfixClient(Started):
    """A private Postfix on 127.0.0.1:``port`` relaying through hamta at ``relay_port``."""

    def __init__(self, port: int, relay_port: int, user: str, password: str) -> None:
        if shutil.which("postfix") is None:
            raise FileNotFoundError("postfix is not installed")
        pwd.getpwnam("postfix")  # mail_owner
        self.port = port
        self.base = Path(tempfile.mkdtemp(prefix="hamta-postfix-", dir="/tmp"))
        self.base.chmod(0o755)
        self.etc, self.queue = self.base / "etc", self.base / "queue"
        data = self.base / "data"
        for directory in (self.etc, self.queue):
            directory.mkdir(mode=0o755)
        data.mkdir(mode=0o700)
        shutil.chown(data, "postfix", "postfix")
        self.log = self.base / "postfix.log"
        fields = {
            "etc": self.etc,
            "queue": self.queue,
            "data": data,
            "log": self.log,
            "base": self.base,
            "port": port,
            "relay_port": relay_port,
            "user": user,
            "password": password,
        }
        (self.etc / "main.cf").write_text(_MAIN_CF.format(**fields))
        (self.etc / "master.cf").write_text(_MASTER_CF.format(**fields))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.etc), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def start(self, timeout: float = 30.0) -> None:
        """``postfix start`` and wait for its SMTP port."""
        started = self._postfix("start")
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stdout}{started.stderr}")
        deadline = time.monotonic() + timeout
        while not (self.queue / "pid" / "master.pid").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"postfix did not start: {self.log_text()}")
            time.sleep(0.05)

    def log_text(self) -> str:
        """Its maillog_file."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def _pids(self) -> list[int]:
        # Every daemon of the instance works inside its queue directory, and nothing else does.
        pids = []
        prefix = str(self.base) + "/"
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    cwd = os.readlink(f"/proc/{entry}/cwd")
                except OSError:
                    continue
                if (cwd + "/").startswith(prefix):
                    pids.append(int(entry))
        return pids

    def stop(self) -> None:
        """``postfix stop``; any of its processes left are killed by pid."""
        self._postfix("stop")
        deadline = time.monotonic() + 10
        while self._pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)
