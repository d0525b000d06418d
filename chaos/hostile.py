"""A hostile SMTP client: every input a security review found harmful, played against a relay.

Run inside the lab's client namespace as ``python -m chaos.hostile --to VIP:25 --domain D``; it
prints one JSON line per session, then a summary line, and exits 0 when every session got the
replies it should. The chaos scenario ``hostile-client`` runs it through the virtual IP while the
usual load goes on, and judges the pair as for any fault: nothing acknowledged lost, no stall,
and the relay's readiness true to the facts.

Each session is a script of commands, each with the class of reply it must get. A reply must
come within ``REPLY_DEADLINE`` (a stall is the worst outcome: it is how one invalid byte once
stopped every client of the relay), and no reply may carry an exception's text or a file path.
The module uses only the standard library: it runs with the lab's Python in another namespace.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

REPLY_DEADLINE = 10.0
# What an internal error must never show a client (aiosmtpd's default is "500 Error: (Type) …").
LEAKS = ("Error: (", "Traceback", "Exception", "/spool", "/var/", "/tmp/")


@dataclass(frozen=True)
class Step:
    """One command and the reply classes it may get ("2", "4", "5", "45": any refusal)."""

    send: bytes
    expect: str


@dataclass(frozen=True)
class Script:
    """A session: what it sends, and why it is hostile."""

    name: str
    why: str
    steps: tuple[Step, ...]


@dataclass
class Outcome:
    """What one session got."""

    name: str
    replies: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def record(self) -> dict[str, object]:
        return {"session": self.name, "replies": self.replies, "problems": self.problems}


def _ok(step: bytes, expect: str = "2") -> Step:
    return Step(step, expect)


def _refused(step: bytes) -> Step:
    return Step(step, "45")


def _message(domain: str, name: str, body: bytes = b"hostile\r\n") -> tuple[Step, ...]:
    """MAIL, RCPT, DATA and a small message marked with the session's name."""
    head = (
        f"From: <hostile@client.{domain}>\r\nTo: <sink@{domain}>\r\n"
        f"Subject: hostile {name}\r\nX-Hostile-Session: {name}\r\n\r\n"
    ).encode()
    return (
        _ok(f"MAIL FROM:<hostile@client.{domain}>".encode()),
        _ok(f"RCPT TO:<sink@{domain}>".encode()),
        Step(b"DATA", "3"),
        Step(head + body + b".", "25"),  # 5xx is fine for what a relay may refuse whole
    )


def scripts(domain: str) -> list[Script]:
    """The hostile sessions, in the order the review listed them."""
    long_label = "a" * 64
    long_domain = ".".join(["b" * 60] * 5) + "." + domain
    rcpt = f"RCPT TO:<sink@{domain}>".encode()
    nested = b"".join(
        b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
        for i in range(1000)
    )
    subjects = b"".join(b"Subject: again %d\r\n" % i for i in range(20_000))
    ehlo = b"EHLO client." + domain.encode()
    return [
        Script(
            "invalid-utf8-sender",
            "an invalid UTF-8 byte in MAIL FROM once stopped every client's mail",
            (_ok(ehlo), _refused(b"MAIL FROM:<j\xe9@client.test>"), *_message(domain, "utf8")),
        ),
        Script(
            "invalid-utf8-sender-nel",
            "the same with a C1 byte (0x85, NEL in Latin-1)",
            (_ok(ehlo), _refused(b"MAIL FROM:<j\x85@client.test>"), *_message(domain, "nel")),
        ),
        Script(
            "ehlo-header-injection",
            "bare CRs in EHLO once put header lines into the Received: header",
            (
                _refused(b"EHLO client.test\rX-Injected-Via-EHLO: yes\rBcc: boss@sink.test"),
                _refused(b"EHLO a\r\x00.\rb"),
                _refused(b"EHLO cli\xe9nt.test"),
                _ok(ehlo),
                *_message(domain, "ehlo"),
            ),
        ),
        Script(
            "bad-addresses",
            "addresses past RFC 5321's syntax and lengths once crashed the delivery task",
            (
                _ok(ehlo),
                _ok(f"MAIL FROM:<hostile@client.{domain}>".encode()),
                _refused(b"RCPT TO:<a@x..test>"),
                _refused(f"RCPT TO:<a@{long_label}.test>".encode()),
                _refused(f"RCPT TO:<a@{long_domain}>".encode()),
                _refused(b"RCPT TO:<" + b"l" * 300 + b"@" + domain.encode() + b">"),
                _refused(b"RCPT TO:<a b@" + domain.encode() + b">"),
                _refused(b"RCPT TO:sink@" + domain.encode()),
                _ok(rcpt),
                Step(b"RSET", "2"),
            ),
        ),
        Script(
            "utf8-without-smtputf8",
            "a UTF-8 address needs the SMTPUTF8 parameter (RFC 6531 3.4)",
            (
                _ok(ehlo),
                _refused(f"MAIL FROM:<jos\u00e9@client.{domain}>".encode()),
                _ok(f"MAIL FROM:<hostile@client.{domain}>".encode()),
                _refused(f"RCPT TO:<m\u00fcller@{domain}>".encode()),
                Step(b"RSET", "2"),
            ),
        ),
        Script(
            "nested-mime",
            "a message nested 1,000 MIME levels deep once raised RecursionError in a parser",
            (_ok(ehlo), *_message(domain, "nested", nested + b"end\r\n")),
        ),
        Script(
            "repeated-headers",
            "20,000 Subject: lines once made a DKIM-Signature of hundreds of kilobytes",
            (_ok(ehlo), *_message(domain, "subjects", subjects)),
        ),
        Script(
            "too-many-recipients",
            "a pipelined burst of RCPTs beyond the limit",
            (
                _ok(ehlo),
                _ok(f"MAIL FROM:<hostile@client.{domain}>".encode()),
                *(Step(rcpt, "24") for _ in range(1100)),
                Step(b"RSET", "2"),
            ),
        ),
        Script(
            "overlong-line",
            "a command line far past RFC 5321's 512 octets",
            (_ok(ehlo), _refused(b"NOOP " + b"x" * 20_000), _ok(b"NOOP")),
        ),
        Script(
            "smuggling",
            "a bare LF end-of-data inside DATA (SMTP smuggling)",
            (
                _ok(ehlo),
                _ok(f"MAIL FROM:<hostile@client.{domain}>".encode()),
                _ok(rcpt),
                Step(b"DATA", "3"),
                _refused(b"Subject: smuggled\r\n\r\nhello\n.\nMAIL FROM:<x@y.test>\r\n."),
            ),
        ),
        Script(
            "unoffered-commands",
            "AUTH and BDAT where neither is offered; a second EHLO; STARTTLS without TLS",
            (
                _ok(ehlo),
                _refused(b"AUTH PLAIN AGJvc3MAc2VjcmV0"),
                _refused(b"BDAT 10 LAST"),
                _ok(ehlo),
                _ok(b"NOOP"),
            ),
        ),
    ]


class _Connection:
    """A line-oriented SMTP client with a deadline on every reply."""

    def __init__(self, host: str, port: int, deadline: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=deadline)
        self.sock.settimeout(deadline)
        self.buffer = b""

    def reply(self) -> str:
        """One whole (possibly multi-line) reply, decoded for the record."""
        lines: list[bytes] = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("connection closed by the relay")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"\n".join(lines).decode("utf-8", "replace")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data + b"\r\n")

    def close(self) -> None:
        self.sock.close()


def play(script: Script, host: str, port: int, deadline: float = REPLY_DEADLINE) -> Outcome:
    """Play one session; every reply judged against its step."""
    outcome = Outcome(script.name)
    try:
        connection = _Connection(host, port, deadline)
    except OSError as exc:
        outcome.problems.append(f"connect: {exc}")
        return outcome
    try:
        for step in (Step(b"", "2"), *script.steps, Step(b"QUIT", "2")):
            if step.send:
                connection.send(step.send)
            started = time.monotonic()
            try:
                text = connection.reply()
            except TimeoutError:
                outcome.problems.append(
                    f"stall: no reply to {_shown(step.send)} within {deadline:g}s"
                )
                return outcome
            except (ConnectionError, OSError) as exc:
                if step.send == b"QUIT":
                    return outcome  # a server may close first; nothing more was asked
                outcome.problems.append(f"after {_shown(step.send)}: {exc}")
                return outcome
            outcome.replies.append(f"{time.monotonic() - started:.3f}s {text}")
            outcome.problems += _judge(step, text)
    finally:
        connection.close()
    return outcome


def _judge(step: Step, reply: str) -> list[str]:
    problems = []
    if reply[:1] not in step.expect:
        problems.append(f"{_shown(step.send)} got {reply[:80]!r}, wanted {step.expect}xx")
    if any(leak in reply for leak in LEAKS):
        problems.append(f"{_shown(step.send)}: the reply shows internals: {reply[:120]!r}")
    return problems


def _shown(data: bytes) -> str:
    text = data[:60].decode("ascii", "backslashreplace")
    return (text + "…") if len(data) > 60 else (text or "(banner)")


def idle_flood(host: str, port: int, count: int, hold: float) -> Iterator[str]:
    """Open ``count`` connections and hold them idle; yield what went wrong meanwhile.

    The others' mail must go on beside them: whatever limits the relay sets, it must not run out
    of file descriptors or stop answering its clients while a crowd sits idle.
    """
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            try:
                opened.append(socket.create_connection((host, port), timeout=5.0))
            except OSError:
                break  # a limit refusing more is the point of one
        time.sleep(hold)  # the idle crowd is the fault; the load beside it is what is watched
    finally:
        for sock in opened:
            sock.close()
    if not opened:
        yield "idle flood: not one connection opened"


def run(host: str, port: int, domain: str, flood: int, say: Callable[[str], None]) -> list[Outcome]:
    """Every session once, then the idle crowd; each outcome said as a JSON line."""
    outcomes = []
    for script in scripts(domain):
        outcome = play(script, host, port)
        say(json.dumps(outcome.record()))
        outcomes.append(outcome)
    if flood:
        crowd = Outcome("idle-flood", problems=list(idle_flood(host, port, flood, 5.0)))
        say(json.dumps(crowd.record()))
        outcomes.append(crowd)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m chaos.hostile``."""
    parser = argparse.ArgumentParser(prog="python -m chaos.hostile", description=__doc__)
    parser.add_argument("--to", required=True, help="HOST:PORT of the relay (the virtual IP)")
    parser.add_argument("--domain", required=True, help="a mail domain the relay delivers")
    parser.add_argument("--idle", type=int, default=200, help="idle connections to hold")
    args = parser.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    outcomes = run(host, int(port), args.domain, args.idle, print)
    problems = sum(len(o.problems) for o in outcomes)
    print(json.dumps({"sessions": len(outcomes), "problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
