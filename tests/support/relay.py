"""A real ``hamta serve`` process for tests: configured, started, probed, killed, restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from cluster.lab.configs import render_toml

from .ports import free_port
from .started import Started

__all__ = ["HAMTA", "RelayProcess", "read_events", "render_toml"]

HAMTA = [sys.executable, "-m", "hamtactl"]
# A cap, not a goal: a relay is ready within a second or two on an idle machine, but under the
# parallel suite on two loaded cores its interpreter alone took over 14 s to start. The wait
# ends as soon as the relay answers; only a relay that never starts costs the whole cap.
READY_TIMEOUT = 90.0


def read_events(path: Path, name: str | None = None) -> list[dict[str, Any]]:
    """The JSON lines of an event log (relay or agent), optionally only events called ``name``."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:  # blank, or the last line of a process killed mid-write
            continue
        if name is None or event.get("event") == name:
            events.append(event)
    return events


class RelayProcess(Started):
    """``hamta serve`` in a subprocess, with its own spool, ports, log and control socket.

    ``overrides`` is merged into the generated configuration section by section, e.g.
    ``{"delivery": {"routes": {...}}, "retry": {"first_delay": "200ms"}}``.
    """

    def __init__(
        self,
        workdir: Path,
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        host: str = "127.0.0.1",
        standby: bool = False,
        prelude: str | None = None,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        # Python run in the child before hamtactl's main: process limits, or a fault injected
        # where no input can cause one (a bug in a long-lived task, a disk that hangs).
        self.prelude = prelude
        # Another interpreter (tests/test_privileges.py: one an unprivileged user may run).
        self.command = command or HAMTA
        self.env = env
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = free_port(host)
        self.admin_port = free_port("127.0.0.1")
        self.spool = workdir / "spool"
        self.log_path = workdir / "hamta.log"
        self.control = workdir / "relay.sock"
        self.standby = standby
        sections: dict[str, dict[str, Any]] = {
            # Tests run as root in directories root owns; tests/test_privileges.py drops.
            # One process unless a test asks for more (tests/test_workers.py): the default
            # follows the CPUs, which would make every test's figures depend on the machine.
            "node": {
                "hostname": "relay.hamta.test",
                "stop_timeout": "5s",
                "user": "root",
                "workers": 1,
            },
            "smtp": {"listen": [f"{host}:{self.port}"]},
            "spool": {"path": self.spool},
            "delivery": {"connect_timeout": "3s", "command_timeout": "10s"},
            "retry": {"first_delay": "300ms", "max_delay": "2s", "jitter": 0.1},
            "dns": {"nameservers": [], "timeout": "2s"},
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
            "control": {"socket": self.control},
            "log": {"file": self.log_path, "level": "info"},
        }
        for section, keys in (overrides or {}).items():
            sections.setdefault(section, {}).update(keys)
        if "listeners" in sections["smtp"]:  # the listeners name their own addresses
            sections["smtp"].pop("listen", None)
        # Where a test put them instead (tests/test_privileges.py).
        self.control = Path(sections["control"]["socket"])
        self.log_path = Path(sections["log"]["file"])
        self.config_path = workdir / "hamta.toml"
        self.config_path.write_text(render_toml(sections))
        self.proc: subprocess.Popen[bytes] | None = None

    # -------------------------------------------------------------- lifecycle

    def start(self, *, wait_ready: bool = True, timeout: float = READY_TIMEOUT) -> None:
        """Start the process; unless told otherwise, wait until it reports ready."""
        args = [*self.command, "serve", "--config", str(self.config_path)]
        if self.prelude is not None:
            main = "import sys, hamtactl; sys.exit(hamtactl.main(sys.argv[1:]))"
            args = [self.command[0], "-c", f"{self.prelude}\n{main}", *args[len(self.command) :]]
        if self.standby:
            args.append("--standby")
        self.stderr_path = self.workdir / f"stderr.{int(time.time() * 1000)}"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=stderr, cwd=self.workdir, env=self.env
            )
        if wait_ready:
            try:
                self.wait_ready(timeout, live_only=self.standby)
            except BaseException:
                # A fixture whose relay never became ready never reaches its own stop(): the
                # process would outlive the test run (seen after a start that timed out under
                # load).
                self.stop()
                raise

    def wait_ready(self, timeout: float = READY_TIMEOUT, *, live_only: bool = False) -> None:
        """Poll the health endpoint (an external process has no event to wait on)."""
        path = "/health/live" if live_only else "/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}: {self.stderr()}")
            try:
                with urllib.request.urlopen(self.admin_url + path, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"relay not ready after {timeout}s: {self.stderr()}")

    def stderr(self) -> str:
        """What the process wrote to standard error."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except (AttributeError, OSError):
            return ""

    def kill(self) -> None:
        """SIGKILL: the crash every durability promise is about."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful stop; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Stop whatever is running, gracefully if possible."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.terminate(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    # ------------------------------------------------------------------ views

    @property
    def admin_url(self) -> str:
        """Base URL of the admin endpoint."""
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        """The relay's pid."""
        assert self.proc is not None
        return self.proc.pid

    def get(self, path: str) -> tuple[int, bytes]:
        """GET a path of the admin endpoint: (status, body)."""
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics``; 0 when the sample is not there yet."""
        status, body = self.get("/metrics")
        assert status == 200, body
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def queue(self) -> dict[str, Any]:
        """``GET /api/queue``."""
        status, body = self.get("/api/queue")
        assert status == 200, body
        data: dict[str, Any] = json.loads(body)
        return data

    def wait_queue_empty(self, timeout: float = 30.0) -> dict[str, Any]:
        """Poll until the spool holds nothing; return the last summary."""
        deadline = time.monotonic() + timeout
        summary = self.queue()
        while summary["depth"] or summary.get("recovering"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not empty after {timeout}s: {summary}")
            time.sleep(0.05)
            summary = self.queue()
        return summary

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON event log, optionally only events called ``name``."""
        return read_events(self.log_path, name)

    def wait_events(self, name: str, count: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Poll the event log until ``count`` events called ``name`` are there; return them."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.events(name)
            if len(events) >= count:
                return events
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(events)} of {count} {name} events after {timeout}s")
            time.sleep(0.03)

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a ``hamta`` command against this relay's configuration."""
        env = dict(os.environ)
        return subprocess.run(
            [*HAMTA, *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=self.workdir,
        )
