"""Real ``hamta agent`` processes on loopback, for tests of the agent without the lab.

Each node has its own relay configuration (SMTP on its own loopback address), its own agent
configuration, log and state directory; the pair shares one spool directory (the ``directory``
storage driver) and one real ZooKeeper. There is no virtual IP here: the probe goes to the
node's own SMTP address. The lab tests cover the virtual IP and the block device.
"""

from __future__ import annotations

import os
import secrets
import signal
import smtplib
import subprocess
import time
from collections.abc import Callable
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

from .relay import HAMTA, read_events, render_toml
from .sink import RecordingSink


class AgentNode:
    """One node: a relay configuration, an agent configuration and the agent's process."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        *,
        host: str,
        smtp_port: int,
        zookeeper: str,
        shared_spool: Path,
        credentials: Path | None,
        relay: dict[str, dict[str, Any]] | None = None,
        agent: dict[str, Any] | None = None,
        agent_sections: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.name = name
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.smtp_port = smtp_port
        self.relay_log = self.workdir / "relay.log"
        self.agent_log = self.workdir / "agent.log"
        sections: dict[str, dict[str, Any]] = {
            # One relay process (the default follows the CPUs; tests/test_workers.py has more).
            "node": {
                "hostname": f"{name}.hamta.test",
                "stop_timeout": "3s",
                "user": "root",
                "workers": 1,
            },
            "smtp": {"listen": [f"{host}:{smtp_port}"]},
            "delivery": {"connect_timeout": "3s", "command_timeout": "10s"},
            "retry": {"first_delay": "300ms", "max_delay": "1s", "jitter": 0.1},
            "admin": {"listen": ""},
            "control": {"socket": self.workdir / "relay.sock"},
            "log": {"file": self.relay_log},
        }
        for section, keys in (relay or {}).items():
            sections.setdefault(section, {}).update(keys)
        self.relay_config = self.workdir / "relay.toml"
        self.relay_config.write_text(render_toml(sections))
        agent_section: dict[str, Any] = {
            "node": name,
            "cluster": "test",
            "zookeeper": zookeeper,
            "session_timeout": "2s",
            "relay_config": self.relay_config,
            "state_dir": self.workdir,
            "log_file": self.agent_log,
            "min_failover_interval": "1s",
            "cooldown": "5s",
            "drain_timeout": "3s",
        }
        if credentials is not None:
            agent_section["credentials"] = credentials
        agent_section.update(agent or {})
        self.config = self.workdir / "agent.toml"
        self.config.write_text(
            render_toml(
                {
                    "agent": agent_section,
                    "storage": {"driver": "directory", "path": shared_spool},
                    **(agent_sections or {}),  # more of the agent's sections ([api], [hooks], ...)
                }
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ process

    def start(self) -> None:
        """Start the agent (which starts its relay)."""
        stderr = open(self.workdir / "agent.err", "ab")  # noqa: SIM115 - closed below
        with stderr:
            self.proc = subprocess.Popen(
                [*HAMTA, "agent", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self.workdir,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        """The agent process runs."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the agent alone (its relay dies with it by the parent-death signal)."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, sig)
            if sig == signal.SIGKILL:
                self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL; the agent demotes itself on the way out if active."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def relay_pids(self) -> list[int]:
        """Pids of this node's relay processes (children of the agent), from /proc."""
        if self.proc is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and b"serve" in cmdline:
                pids.append(int(entry.name))
        return pids

    # ------------------------------------------------------------------ views

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The agent's JSON log lines, optionally only those called ``name``."""
        return read_events(self.agent_log, name)

    def role(self) -> str | None:
        """The role of the last decision logged."""
        decisions = self.events("Decision")
        return str(decisions[-1]["role"]) if decisions else None

    def send(self, count: int = 1, *, to: str = "user@sink.test", tag: str = "") -> list[str]:
        """Send ``count`` messages to this node's relay; the Message-IDs that got 250."""
        acked = []
        with smtplib.SMTP(self.host, self.smtp_port, timeout=10) as client:
            for _ in range(count):
                message_id = f"<{tag}{secrets.token_hex(8)}@test>"
                body = (
                    f"From: a@client.test\r\nTo: {to}\r\nMessage-ID: {message_id}\r\n"
                    f"Subject: test\r\n\r\nhello\r\n"
                )
                client.sendmail("a@client.test", [to], body)
                acked.append(message_id)
        return acked

    def accepts_mail(self) -> bool:
        """Whether an SMTP session to this node's relay gets a 220 banner."""
        try:
            with smtplib.SMTP(self.host, self.smtp_port, timeout=2) as client:
                code, _ = client.noop()
                return code == 250
        except (OSError, smtplib.SMTPException):
            return False

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``hamta <args> --config <this agent's config>``."""
        return subprocess.run(
            [*HAMTA, *args, "--config", str(self.config)],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def message_ids(sink: RecordingSink) -> set[str]:
    """The Message-IDs of what ``sink`` received."""
    parser = BytesHeaderParser()
    return {str(parser.parsebytes(m.data).get("Message-ID", "")) for m in sink.messages}


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``condition`` (processes outside the test have no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(every)
