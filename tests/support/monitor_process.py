"""A real ``hamta monitor run`` in a subprocess, on a free loopback port, with its own store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

from .monitor_peers import render_checks
from .ports import free_port
from .started import end_process

ROOT = Path(__file__).resolve().parent.parent.parent


class MonitorProcess:
    """``hamta monitor run`` over ``checks`` (dicts as in monitor.toml); stopped by SIGTERM."""

    def __init__(
        self,
        workdir: Path,
        checks: list[dict[str, Any]],
        extra: str = "",
        top: dict[str, Any] | None = None,
        **sections: dict[str, Any],
    ) -> None:
        """``extra``: more monitor.toml, as text (``[[maintenance]]`` windows, say); ``top`` and
        ``sections``: its top-level keys and tables (``cluster={...}``, say)."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.listen = f"127.0.0.1:{free_port()}"
        self.url = f"http://{self.listen}"
        self.config = workdir / "monitor.toml"
        self.config.write_text(
            render_checks(
                checks,
                server={"listen": self.listen},
                store={"path": str(workdir / "monitor.sqlite")},
                log={"file": str(workdir / "monitor.log")},
                top=top or {},
                **sections,
            )
            + extra
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hamtactl", "monitor", "run", "--config", str(self.config)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.PIPE,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        end_process(self.proc, 15)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return json.load(response)

    def wait_states(self, wanted: dict[str, str], timeout: float = 20.0) -> dict[str, Any]:
        """Poll /api/checks until every check in ``wanted`` is in its state; the rows."""
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode() if self.proc.stderr else "")
            try:
                rows = self.get("/api/checks")["checks"]
                states = {row["name"]: row for row in rows}
                if all(states[name]["state"] == state for name, state in wanted.items()):
                    return states
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"not {wanted} after {timeout}s: {rows}")
            time.sleep(0.05)
