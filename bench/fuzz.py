#!/usr/bin/env python3
"""Protocol fuzzer: mutated SMTP sessions against a real relay, watched for stalls and crashes.

What runs
    A real ``hamta serve`` (tests/support's RelayProcess: its own spool, ports and log, STARTTLS
    with a self-signed certificate, max_message_size 256 KiB so that oversized mail is cheap to
    send), a recording MX (tests/support's RecordingSink) to which static routes send
    ``sink.test`` and ``fuzz.test``, and dnsmasq answering NXDOMAIN for every other domain, all
    on 127.0.0.0/8. ``--clients`` threads each run sessions generated from a seed by
    bench/fuzz_grammar.py (a valid session, then mutations) over raw sockets
    (bench/fuzz_wire.py).

What counts as a finding
    * ``crash``: the relay process exited; ``traceback`` / ``error_log``: a traceback in its
      standard error or log, or an event logged at error level;
    * ``stall``: ``/health/ready`` says ready but the canary gets no reply within the deadline;
      ``unready``: the relay is running but not ready (or its admin endpoint does not answer);
      ``canary_refused``: ready, yet the canary's valid message is refused;
      ``undelivered``: the canary got its 250 but did not reach the sink in time;
      ``stuck``: mail still queued ``--drain-deadline`` after the load (nothing may stay longer
      than the 60 s max_queue_lifetime configured here and a retry);
    * ``no_reply``: a fuzz session waited past the deadline for a reply that was due while the
      canary still worked (one session hangs, the relay does not);
    * ``leak``: a reply holding an exception's name (``Error: (``), a traceback or a path;
      ``protocol``: a reply that breaks RFC 3207 (220 to STARTTLS within TLS, or replies to
      plain text pipelined after STARTTLS);
    * ``injection``: a message at the sink whose headers hold ``X-Fuzz-Injected``, the name the
      fuzzer hides in EHLO names, paths and bare line ends (its value says where and which session).

    The canary (a valid message from 127.0.0.1, a relay network) runs every ``--canary-every``
    sessions, every ``--canary-interval`` seconds and whenever a session hangs. After a crash, a
    stall or a lasting unready state the relay is killed and restarted on its spool (recovery is
    exercised too), or on a fresh one if that fails; clients wait meanwhile.

    Each finding's first occurrences (per kind and signature) get a directory under
    ``--out``/findings with finding.json (kind, signature, detail, run seed, session seeds) and
    transcripts.txt: the sessions of the last seconds, suspects first, as exact bytes. A session
    replays alone against a fresh relay with ``--replay SEED`` (seeds are printed in hex too).

Output
    Progress lines, the figures (sessions, commands/s, findings by kind), then ONE JSON line.
    Exit status 0 without findings, 1 with.

Usage
    .venv/bin/python bench/fuzz.py [--minutes 5] [--clients 4] [--seed 1] [--out DIR]
        [--deadline 10] [--canary-every 50] [--canary-interval 3] [--replay SEED ...]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import email.parser
import email.policy
import json
import os
import re
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fuzz_grammar import BOUNCES, COMPLAINTS, MARKER, SENDER_DOMAIN, SINK_DOMAIN, session
from fuzz_grammar import session_seed as make_session_seed
from fuzz_wire import Session, SessionResult

REPO: Final = Path(__file__).resolve().parent.parent
# The test suite's real relay, sink and DNS server (tests/support), one place for all of them.
sys.path.insert(0, str(REPO))
from tests.support import Delivered, DnsServer, RecordingSink, make_self_signed  # noqa: E402
from tests.support.relay import RelayProcess  # noqa: E402
from tests.support.smtpwire import SmtpWire, SmtpWireError  # noqa: E402

SINK_HOST: Final = "127.0.0.5"
CANARY_HEADER: Final = "X-Fuzz-Canary"
MAX_SAVED: Final = 3  # directories kept per finding signature; later ones are only counted
RECENT: Final = 64  # finished sessions kept for a finding's transcripts
TRIAGED: Final = frozenset({"stall", "unready", "crash", "no_reply"})
TRIAGE_MAX: Final = 6  # findings whose suspects are replayed alone after a run
OTHERS: Final = 16  # of which a finding's transcripts hold the last, after its suspects
RESTART_TIMEOUT: Final = 30.0
# Numbers that differ between occurrences of one fault (ports, positions, ids).
# The marker's value: the field that carried it and the session's seed in hex.
_ORIGIN = re.compile(r"\s*([a-z0-9]+)-([0-9a-f]+)")
_DIGITS = re.compile(
    r"\b0x[0-9a-fA-F]+|\b[0-9a-fA-F]{8,}\b|\b\d{5,}\b"
    r"|(?<=position )\d+(?:-\d+)?|(?<=\\udc)[0-9a-f]{2}"  # where, and which bad byte
)


def say(text: str) -> None:
    """Print one progress line (stdout, flushed)."""
    print(text, flush=True)


@dataclass(frozen=True)
class Options:
    """The command line, checked."""

    minutes: float
    clients: int
    seed: int
    out: Path
    deadline: float
    canary_every: int
    canary_interval: float
    delivery_deadline: float
    drain_deadline: float
    relay_networks: list[str] | None
    replay: list[int]
    triage: bool


# --------------------------------------------------------------------------- the relay


class Target:
    """The relay under test, its sink and DNS; restarted after a crash or a stall."""

    def __init__(self, workdir: Path, options: Options, dns: DnsServer, sink: RecordingSink):
        self.workdir = workdir
        self.options = options
        self.dns = dns
        self.sink = sink
        self.cert, self.key = make_self_signed(workdir / "tls", "relay.hamta.test")
        self.lock = threading.Lock()
        self.up = threading.Event()
        self.generation = 0
        self.restarts = 0
        self.relay = self._new_relay()
        # Bytes of each log already scanned for tracebacks and errors.
        self.scanned: dict[Path, int] = {}

    def _new_relay(self) -> RelayProcess:
        smtp: dict[str, Any] = {
            "tls_cert": self.cert,
            "tls_key": self.key,
            "max_message_size": 256 * 1024,
        }
        if self.options.relay_networks is not None:
            smtp["relay_networks"] = self.options.relay_networks
        sink = f"[{SINK_HOST}]:{self.sink.port}"
        overrides: dict[str, dict[str, Any]] = {
            "smtp": smtp,
            "delivery": {"routes": {SINK_DOMAIN: sink, SENDER_DOMAIN: sink}},
            "dns": {"nameservers": [self.dns.nameserver], "timeout": "2s"},
            # Mail the sink defers expires soon, so that retries do not pile up over a long run.
            "retry": {"max_queue_lifetime": "60s"},
            "suppression": {"complaints_address": COMPLAINTS, "bounces_address": BOUNCES},
        }
        return RelayProcess(self.workdir / f"relay.{self.generation}", overrides)

    def start(self) -> None:
        self.relay.start(timeout=RESTART_TIMEOUT)
        self.up.set()

    @property
    def address(self) -> tuple[str, int, int]:
        """Host, port and generation of the relay now running."""
        with self.lock:
            return self.relay.host, self.relay.port, self.generation

    def alive(self) -> bool:
        return self.relay.proc is not None and self.relay.proc.poll() is None

    def restart(self) -> str:
        """Kill and start again on the same spool, or on a fresh one if that fails."""
        self.up.clear()
        with self.lock:
            self.generation += 1
            self.restarts += 1
            self.relay.kill()
            try:
                self.relay.start(timeout=RESTART_TIMEOUT)
                outcome = "restarted on its spool"
            except (RuntimeError, TimeoutError) as exc:
                self.relay.kill()
                failed = f"restart on its spool failed ({str(exc)[-300:]})"
                self.relay = self._new_relay()
                self.relay.start(timeout=RESTART_TIMEOUT)
                outcome = f"{failed}; started on a fresh spool"
        self.up.set()
        return outcome

    def stop(self) -> None:
        self.up.clear()
        self.relay.stop()

    def ready(self) -> int | None:
        """``/health/ready``'s status, None when the endpoint does not answer in time."""
        url = self.relay.admin_url + "/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=self.options.deadline) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return None

    def new_log_problems(self) -> list[tuple[str, str, str]]:
        """(kind, signature, excerpt) of tracebacks and error events logged since last asked."""
        problems: list[tuple[str, str, str]] = []
        stderr = getattr(self.relay, "stderr_path", None)
        for path in (self.relay.log_path, stderr):
            if path is None or not path.exists():
                continue
            start = self.scanned.get(path, 0)
            with open(path, "rb") as file:
                file.seek(start)
                text = file.read().decode("utf-8", "replace")
            cut = text.rfind("\n") + 1  # only whole lines; the rest is read next time
            self.scanned[path] = start + len(text[:cut].encode("utf-8", "replace"))
            if path == self.relay.log_path:
                problems += _log_events(text[:cut])
            else:
                problems += _tracebacks(text[:cut])
        return problems


def _log_events(text: str) -> list[tuple[str, str, str]]:
    problems = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if "exception" in event or "Traceback" in line:
            last = str(event.get("exception", "")).strip().splitlines()[-1:] or ["?"]
            problems.append(("traceback", f"{event.get('event')}: {last[0]}", line))
        elif event.get("level") in ("error", "critical"):
            problems.append(("error_log", str(event.get("event")), line))
    return problems


def _tracebacks(text: str) -> list[tuple[str, str, str]]:
    """Tracebacks in standard error: each with its exception line as signature."""
    problems = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = i + 1
            while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end]):
                end += 1
            last = lines[end] if end < len(lines) else "?"
            problems.append(("traceback", last, "\n".join(lines[max(0, i - 3) : end + 1])))
    return problems


# --------------------------------------------------------------------------- findings


class Findings:
    """Every finding counted; the first few per signature written out with transcripts."""

    def __init__(self, out: Path, seed: int) -> None:
        self.dir = out / "findings"
        self.seed = seed
        self.lock = threading.Lock()
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.by_signature: collections.Counter[tuple[str, str]] = collections.Counter()
        self.recent: collections.deque[SessionResult] = collections.deque(maxlen=RECENT)
        self.saved = 0
        # Findings whose suspects --triage replays one by one: (directory, session seeds).
        self.to_triage: list[tuple[Path, list[int]]] = []

    def session_done(self, result: SessionResult) -> None:
        with self.lock:
            self.recent.append(result)

    def report(
        self, kind: str, signature: str, detail: str, suspects: Sequence[SessionResult] = ()
    ) -> None:
        signature = _DIGITS.sub("N", signature.replace("characters in", "character in"))[:160]
        with self.lock:
            self.by_kind[kind] += 1
            self.by_signature[(kind, signature)] += 1
            count = self.by_signature[(kind, signature)]
            if count > MAX_SAVED:
                return
            self.saved += 1
            where = self.dir / f"{self.saved:03d}-{kind}"
            others = [r for r in self.recent if all(r is not s for s in suspects)]
            sessions = list(suspects) + others[::-1][:OTHERS]
            if kind in TRIAGED and suspects:
                self.to_triage.append((where, [r.seed for r in suspects]))
        where.mkdir(parents=True, exist_ok=True)
        record = {
            "kind": kind,
            "signature": signature,
            "detail": detail,
            "run_seed": self.seed,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "suspects": [f"{r.seed:#x}" for r in suspects],
            "sessions": [f"{r.seed:#x}" for r in sessions],
            "replay": [f"bench/fuzz.py --replay {r.seed:#x}" for r in suspects],
        }
        (where / "finding.json").write_text(json.dumps(record, indent=2) + "\n")
        (where / "transcripts.txt").write_text("\n\n".join(r.text() for r in sessions) + "\n")
        say(f"FINDING {kind}: {signature} -- {detail[:300]} [{where}]")

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


def _injections(message: Delivered) -> list[str]:
    """The marker's values in a delivered message's own headers (not in its body or parts)."""
    end = message.data.find(b"\r\n\r\n")
    head = message.data if end < 0 else message.data[: end + 2]
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    found = [str(value) for name, value in parsed.items() if name.lower() == MARKER.lower()]
    # A marker after a bare CR, which a header parser takes as part of the previous line but a
    # next hop that splits lines on CR would not.
    after_cr = re.findall(rb"\r(?!\n)" + MARKER.encode() + rb":([^\r\n]*)", head)
    found += [match.decode("ascii", "replace") for match in after_cr]
    return found


# --------------------------------------------------------------------------- the run


class Run:
    """Clients, the watchdog and the figures of one fuzz run."""

    def __init__(self, options: Options, target: Target, findings: Findings) -> None:
        self.options = options
        self.target = target
        self.findings = findings
        self.stop = threading.Event()
        self.poke = threading.Event()  # a session hung, or canary_every sessions went by
        # Guards the figures and the sessions in flight; notified when a session ends.
        self.changed = threading.Condition()
        self.inflight: dict[int, float] = {}  # client -> when its current session started
        self.sessions = 0
        self.commands = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.hung: list[tuple[int, SessionResult]] = []
        self.canaries = 0
        self.pending: dict[str, float] = {}  # canary id -> when its 250 came

    # ---------------------------------------------------------------- clients

    def client(self, index: int) -> None:
        number = 0
        while not self.stop.is_set():
            if not self.target.up.wait(0.5):
                continue
            seed = make_session_seed(self.options.seed, index, number)
            number += 1
            with self.changed:
                self.inflight[index] = time.monotonic()
            try:
                result, generation = self.one_session(seed)
                if not self.stop.is_set():
                    self.account(result, generation)
            finally:
                with self.changed:
                    del self.inflight[index]
                    self.changed.notify_all()

    def one_session(self, seed: int) -> tuple[SessionResult, int]:
        """Run session ``seed``; its result and the relay generation it ran against."""
        steps, mutations = session(seed)
        host, port, generation = self.target.address
        result = SessionResult(seed, mutations)
        Session(host, port, result, deadline=self.options.deadline, wait=self.stop.wait).run(steps)
        return result, generation

    def account(self, result: SessionResult, generation: int) -> None:
        with self.changed:
            self.sessions += 1
            self.commands += result.commands
            self.outcomes[result.outcome] += 1
            if result.outcome == "no_reply":
                self.hung.append((generation, result))
            due = result.outcome == "no_reply" or self.sessions % self.options.canary_every == 0
        self.findings.session_done(result)
        for line, reply in result.leaks:
            text = reply.decode("utf-8", "replace").strip()
            self.findings.report(
                "leak",
                _leak_signature(line, text),
                f"reply {text!r} to {line[:200]!r} in session {result.seed:#x}",
                [result],
            )
        for line, reply, rule in result.violations:
            self.findings.report(
                "protocol",
                rule,
                f"reply {reply!r} to {line[:200]!r} in session {result.seed:#x}",
                [result],
            )
        if due:
            self.poke.set()

    def take_hung(self, generation: int | None = None) -> list[SessionResult]:
        """The sessions that hung (against ``generation`` only, when given), forgotten here."""
        with self.changed:
            hung, self.hung = self.hung, []
        return [r for g, r in hung if generation is None or g == generation]

    # ---------------------------------------------------------------- watchdog

    def watchdog(self) -> None:
        while not self.stop.is_set():
            self.poke.wait(self.options.canary_interval)
            self.poke.clear()
            if self.stop.is_set():
                return
            self.check()

    def check(self) -> None:
        """Process, logs, readiness, canary, sink: a finding for each disagreement."""
        target = self.target
        for kind, signature, excerpt in target.new_log_problems():
            self.findings.report(kind, signature, excerpt[-2000:])
        if not target.alive():
            code = target.relay.proc.returncode if target.relay.proc else None
            detail = f"relay exited with {code}: {target.relay.stderr()[-1500:]}"
            self.findings.report("crash", f"exit {code}", detail, self.take_hung())
            self.restart("crash")
            return
        generation = target.address[2]
        asked = time.monotonic()
        status = target.ready()
        verdict, reply = self.canary()
        if status == 200 and verdict == "ok":
            for result in self.take_hung(generation):
                self.findings.report(
                    "no_reply",
                    _DIGITS.sub("N", repr(result.waiting_for))[:100],
                    f"session {result.seed:#x} got no reply to {result.waiting_for!r} within "
                    f"{self.options.deadline}s while the relay served the canary",
                    [result],
                )
        elif status == 200 and verdict == "stall":
            self.findings.report(
                "stall",
                "canary got no reply",
                f"ready, but the canary waited: {reply}",
                self.suspects(asked),
            )
            self.restart("stall")
            return
        elif status == 200:
            self.findings.report("canary_refused", reply, f"ready, but the canary got {reply}")
        else:
            said = "no answer" if status is None else f"HTTP {status}"
            detail = f"/health/ready: {said}; canary: {verdict} {reply}"
            self.findings.report("unready", said, detail, self.suspects(asked))
            if status is None or verdict != "ok":
                self.restart("unready")
                return
        self.check_sink()

    def suspects(self, since: float) -> list[SessionResult]:
        """The sessions that hung, once every session running at ``since`` has ended.

        A relay that stops answering leaves the sessions of that moment waiting for their
        deadline; the one that broke it is among them, so they are waited for (bounded).
        """
        with self.changed:
            self.changed.wait_for(
                lambda: all(start > since for start in self.inflight.values()),
                timeout=self.options.deadline + 5.0,
            )
        return self.take_hung()

    def check_drained(self) -> None:
        """Once the load stops, every message must leave the queue: delivered, bounced or expired.

        The relay is configured so that nothing stays longer than max_queue_lifetime (60 s) plus
        a retry, so a message still queued after the drain deadline is stuck for good (a delivery
        task that died on it, a DSN that could not be built).
        """
        if not self.target.alive():
            return
        try:
            self.target.relay.wait_queue_empty(timeout=self.options.drain_deadline)
        except TimeoutError as exc:
            self.findings.report("stuck", "queue not empty after the load", str(exc)[:1500])
        except (AssertionError, OSError, ValueError) as exc:
            self.findings.report("unready", "no queue summary", f"/api/queue: {exc}")

    def restart(self, why: str) -> None:
        say(f"restarting the relay after {why}...")
        try:
            outcome = self.target.restart()
        except (RuntimeError, TimeoutError) as exc:
            self.findings.report("crash", "restart failed", str(exc)[-1500:])
            self.stop.set()
            return
        if "fresh" in outcome:
            self.findings.report("crash", "restart on its spool failed", outcome)
            self.pending.clear()  # their spool is gone with the old relay
        say(f"relay {outcome}")

    def canary(self) -> tuple[str, str]:
        """Send one valid message: ("ok", reply), ("refused", reply), ("stall", what) or error."""
        host, port, _ = self.target.address
        with self.changed:
            self.canaries += 1
            ident = f"c{self.canaries}"
        deadline = self.options.deadline
        step = "connect"
        try:
            with SmtpWire(host, port, timeout=deadline) as wire:
                for step, line in (
                    ("EHLO", "EHLO canary.fuzz.test"),
                    ("MAIL", f"MAIL FROM:<canary@{SENDER_DOMAIN}>"),
                    ("RCPT", f"RCPT TO:<canary-{ident}@{SINK_DOMAIN}>"),
                    ("DATA", "DATA"),
                ):
                    reply = wire.command(line)
                    if reply.code >= 400:
                        return "refused", f"{step}: {reply.text}"
                step = "end of data"
                message = (
                    f"From: <canary@{SENDER_DOMAIN}>\r\n{CANARY_HEADER}: {ident}\r\n"
                    f"Subject: canary\r\n\r\nalive?\r\n.\r\n"
                )
                wire.send(message.encode())
                reply = wire.read_reply()
                wire.command("QUIT")
        except TimeoutError:
            return "stall", f"no reply to {step} within {deadline}s"
        except (OSError, SmtpWireError) as exc:
            return "stall", f"{step}: {type(exc).__name__}: {exc}"
        if reply.code != 250:
            return "refused", f"{step}: {reply.text}"
        with self.changed:
            self.pending[ident] = time.monotonic()
        return "ok", reply.text

    def check_sink(self) -> None:
        for message in self.target.sink.take():
            for value in _injections(message):
                origin = _ORIGIN.match(value)
                field = origin.group(1) if origin else "?"
                self.findings.report(
                    "injection",
                    f"{MARKER} via {field}",
                    f"delivered headers hold {value!r}; message head: {message.data[:1500]!r}",
                    self._sessions_of(value),
                )
            canary = _canary_id(message.data)
            if canary is not None:
                with self.changed:
                    self.pending.pop(canary, None)
        now = time.monotonic()
        with self.changed:
            late = [
                k for k, at in self.pending.items() if now - at > self.options.delivery_deadline
            ]
            for ident in late:
                del self.pending[ident]
        for ident in late:
            self.findings.report(
                "undelivered",
                "canary not at the sink",
                f"canary {ident} got 250 but was not delivered in "
                f"{self.options.delivery_deadline}s; queue: {self._queue()}",
            )

    def _sessions_of(self, value: str) -> list[SessionResult]:
        origin = _ORIGIN.match(value)
        tag = origin.group(2) if origin else ""
        with self.findings.lock:
            return [r for r in self.findings.recent if f"{r.seed:x}" == tag]

    def _queue(self) -> str:
        try:
            return json.dumps(self.target.relay.queue())[:500]
        except (AssertionError, OSError, ValueError) as exc:
            return f"unavailable ({exc})"

    # ---------------------------------------------------------------- figures

    def figures(self, seconds: float) -> dict[str, Any]:
        return {
            "bench": "fuzz",
            "seed": self.options.seed,
            "clients": self.options.clients,
            "seconds": round(seconds, 1),
            "sessions": self.sessions,
            "commands": self.commands,
            "commands_per_s": round(self.commands / seconds, 1) if seconds > 0 else 0.0,
            "sessions_per_s": round(self.sessions / seconds, 1) if seconds > 0 else 0.0,
            "outcomes": dict(self.outcomes),
            "canaries": self.canaries,
            "restarts": self.target.restarts,
            "findings": dict(self.findings.by_kind),
            "distinct_findings": len(self.findings.by_signature),
            "out": str(self.options.out),
        }


def _leak_signature(line: bytes, reply: str) -> str:
    """The command and the exception's name: one signature per place that leaks."""
    verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper()[:16]
    match = re.search(r"Error: \((\w+)\)", reply)
    return f"{verb.decode('ascii', 'replace')} -> {match.group(1) if match else reply[:80]}"


def _canary_id(data: bytes) -> str | None:
    match = re.search(rb"^" + CANARY_HEADER.encode() + rb": (\S+)", data, re.MULTILINE)
    return match.group(1).decode() if match else None


@contextlib.contextmanager
def environment(options: Options) -> Iterator[Target]:
    """DNS, sink and relay, started in order and stopped in reverse."""
    # The relay's process runs this tree's hamta, whatever the virtualenv has installed.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if paths[:1] != [str(REPO)]:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
    with (
        DnsServer(mx={}, a={}) as dns,
        RecordingSink(SINK_HOST) as sink,
        tempfile.TemporaryDirectory(prefix="hamta-fuzz-") as tmp,
    ):
        target = Target(Path(tmp), options, dns, sink)
        target.start()
        try:
            yield target
        finally:
            target.stop()


def fuzz(options: Options) -> int:
    findings = Findings(options.out, options.seed)
    with environment(options) as target:
        run = Run(options, target, findings)
        say(
            f"relay on {target.relay.host}:{target.relay.port}, sink {SINK_HOST}:"
            f"{target.sink.port}; seed {options.seed}, {options.clients} clients, "
            f"{options.minutes} min; findings under {options.out}"
        )
        started = time.monotonic()
        threads = [
            threading.Thread(target=run.client, args=(i,), daemon=True)
            for i in range(options.clients)
        ]
        threads.append(threading.Thread(target=run.watchdog, daemon=True))
        for thread in threads:
            thread.start()
        end = started + options.minutes * 60
        try:
            while not run.stop.wait(min(30.0, max(0.0, end - time.monotonic()))):
                if time.monotonic() >= end:
                    break
                elapsed = time.monotonic() - started
                say(
                    f"{elapsed:6.0f} s: {run.sessions} sessions, {run.commands / elapsed:.0f} "
                    f"commands/s, findings {dict(findings.by_kind)}"
                )
        except KeyboardInterrupt:
            say("interrupted")
        run.stop.set()
        for thread in threads:
            thread.join(timeout=options.deadline + 5)
        run.check()  # a last look: the end of the run is watched like the rest
        seconds = time.monotonic() - started
        say(f"waiting up to {options.drain_deadline:.0f} s for the queue to drain...")
        run.check_drained()
        run.check()  # what the drain delivered (injections, canaries) and logged
        figures = run.figures(seconds)
    if options.triage:
        triage(options, findings)
    say(
        f"sessions {figures['sessions']} ({figures['sessions_per_s']}/s), commands "
        f"{figures['commands']} ({figures['commands_per_s']}/s), canaries {figures['canaries']}, "
        f"restarts {figures['restarts']}, outcomes {figures['outcomes']}"
    )
    say(f"findings by kind: {figures['findings'] or 'none'}")
    for (kind, signature), count in sorted(findings.by_signature.items()):
        say(f"  {count:6d}  {kind}: {signature}")
    print(json.dumps(figures), flush=True)
    return 1 if findings.total else 0


def triage(options: Options, findings: Findings) -> None:
    """Replay each hang's suspects one by one against a fresh relay: which one alone does it.

    The first suspect that gets no reply (or kills the relay) is the trigger; whether the
    canary then stalls too tells a relay-wide stall from one hung session. The answer goes into
    the finding's finding.json as ``reproduced_alone``.
    """
    for where, seeds in findings.to_triage[:TRIAGE_MAX]:
        culprit: dict[str, str] | None = None
        with environment(options) as target, tempfile.TemporaryDirectory() as scratch:
            run = Run(options, target, Findings(Path(scratch), options.seed))
            for seed in seeds:
                result, _ = run.one_session(seed)
                if result.outcome == "no_reply" or not target.alive():
                    verdict, reply = run.canary() if target.alive() else ("crash", "")
                    culprit = {
                        "session": f"{seed:#x}",
                        "waiting_for": repr(result.waiting_for),
                        "canary": f"{verdict} {reply}".strip(),
                    }
                    break
        record = json.loads((where / "finding.json").read_text())
        record["reproduced_alone"] = culprit
        (where / "finding.json").write_text(json.dumps(record, indent=2) + "\n")
        say(
            f"triage {where.name}: "
            + (
                f"session {culprit['session']} alone hangs on {culprit['waiting_for']}; "
                f"canary after it: {culprit['canary']}"
                if culprit
                else f"no suspect alone reproduces it ({', '.join(f'{s:#x}' for s in seeds)})"
            )
        )


def replay(options: Options) -> int:
    """Run the given sessions one after another against a fresh relay, then the canary."""
    findings = Findings(options.out, options.seed)
    with environment(options) as target:
        run = Run(options, target, findings)
        for seed in options.replay:
            result, generation = run.one_session(seed)
            say(result.text())
            run.account(result, generation)
        run.check_drained()
        run.check()
        figures = run.figures(1.0)
    print(json.dumps(figures), flush=True)
    return 1 if findings.total else 0


def parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"))
    parser.add_argument(
        "--deadline",
        type=float,
        default=10.0,
        help="seconds a due reply may take before it counts as a stall",
    )
    parser.add_argument("--canary-every", type=int, default=50, help="sessions between canaries")
    parser.add_argument("--canary-interval", type=float, default=3.0)
    parser.add_argument("--delivery-deadline", type=float, default=30.0)
    parser.add_argument(
        "--drain-deadline",
        type=float,
        default=120.0,
        help="seconds the queue may take to empty after the load",
    )
    parser.add_argument(
        "--relay-networks",
        nargs="+",
        default=None,
        help="the relay's smtp.relay_networks (default: its own, loopback)",
    )
    parser.add_argument(
        "--replay",
        nargs="+",
        default=[],
        type=lambda s: int(s, 0),
        help="session seeds to run alone against a fresh relay",
    )
    parser.add_argument(
        "--no-triage",
        dest="triage",
        action="store_false",
        help="do not replay the suspects of hangs alone after the run",
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.deadline <= 0 or args.canary_every < 1:
        parser.error("--minutes, --deadline must be > 0; --clients, --canary-every >= 1")
    return Options(
        minutes=args.minutes,
        clients=args.clients,
        seed=args.seed,
        out=args.out.resolve(),
        deadline=args.deadline,
        canary_every=args.canary_every,
        canary_interval=args.canary_interval,
        delivery_deadline=args.delivery_deadline,
        drain_deadline=args.drain_deadline,
        relay_networks=args.relay_networks,
        replay=args.replay,
        triage=args.triage,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    return replay(options) if options.replay else fuzz(options)


if __name__ == "__main__":
    sys.exit(main())
