"""A Prometheus server on loopback for the tests of the alert rules and the Grafana panels."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.ports import free_port

PROMETHEUS = shutil.which("prometheus")


class Prometheus:
    """A Prometheus server on loopback scraping the given targets as job ``job`` ("hamta", the
    relays, unless told), every second."""

    def __init__(self, workdir: Path, targets: list[str], rules: Path, job: str = "hamta") -> None:
        self.port = free_port("127.0.0.1")
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(rules))}\n"
            f"scrape_configs:\n  - job_name: {json.dumps(job)}\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.data = workdir / "data"
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        assert PROMETHEUS is not None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_for(lambda: self._get("/-/ready") is not None, timeout, "Prometheus ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                body: bytes = r.read()
                return body
        except (urllib.error.URLError, OSError):
            return None

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH; its ``data``."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        body = self._get(f"/api/v1/{path}{query}")
        assert body is not None, f"Prometheus did not answer /api/v1/{path}: {self.logs()}"
        reply = json.loads(body)
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector."""
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def alerts(self) -> dict[str, list[dict[str, Any]]]:
        """Active (pending or firing) alerts by name."""
        found: dict[str, list[dict[str, Any]]] = {}
        for alert in self.api("alerts")["alerts"]:
            found.setdefault(alert["labels"]["alertname"], []).append(alert)
        return found

    def wait_for(self, check: Any, timeout: float, what: str) -> Any:
        """Poll ``check`` until it returns something true; return that."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.logs()}")
            value = check()
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"no {what} after {timeout}s: {self.logs()}")

    def firing(self, name: str, timeout: float = 30.0, at_least: int = 1) -> list[dict[str, Any]]:
        """Wait until ``at_least`` alerts of ``name`` fire (each series is evaluated on its own:
        they need not fire in one evaluation); its firing alerts."""

        def check() -> list[dict[str, Any]]:
            fired = [a for a in self.alerts().get(name, []) if a["state"] == "firing"]
            return fired if len(fired) >= at_least else []

        result: list[dict[str, Any]] = self.wait_for(check, timeout, f"{name} firing")
        return result

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def shorten_waits(rules: Path, target: Path) -> Path:
    """``rules`` with every ``for:`` cut to 1s, written to ``target``: a test sees them fire."""
    target.write_text(re.sub(r"(?m)^(\s+for:) \S+$", r"\1 1s", rules.read_text()))
    return target
