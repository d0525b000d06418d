"""The relay benchmark's load and sink: smtp-source in, smtp-sink out, driven to completion."""

import contextlib
import dataclasses
import os
import pwd
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from relay_common import (
    HELO_NAME,
    LOCALHOST,
    POLL_SECONDS,
    RECIPIENT,
    SENDER,
    SINK_BACKLOG,
    SINK_HOST,
    START_TIMEOUT,
    SUBMIT_POLL_SECONDS,
    BenchError,
    log_tail,
    postfix_tool,
    shielded,
    stop_child,
    wait_for_smtp,
)


@dataclasses.dataclass(frozen=True)
class Result:
    """One relay's figures for one load."""

    submitted: int
    delivered: int
    submit_seconds: float
    end_to_end_seconds: float
    msgs_per_s: float
    peak_rss_kib: int | None
    sink_received: int | None = None
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    #: CPU (user + system) of every process of the relay, per delivered message (hamta only:
    #: Postfix's short-lived processes are gone before they can be read).
    cpu_ms_per_msg: float | None = None
    processes: int | None = None  # the relay's processes (hamta: worker 0 and its workers)

    @property
    def submit_msgs_per_s(self) -> float:
        return self.submitted / self.submit_seconds if self.submit_seconds > 0 else 0.0


@dataclasses.dataclass
class Sink:
    """A running smtp-sink on SINK_HOST:port with its running counter in ``counter_file``."""

    port: int
    proc: subprocess.Popen[bytes]
    counter_file: Path

    def received(self) -> int:
        """Messages received so far: the last ``mesg=N`` of ``smtp-sink -c``."""
        try:
            with open(self.counter_file, "rb") as out:
                out.seek(0, os.SEEK_END)
                out.seek(max(0, out.tell() - 256))
                tail = out.read()
        except OSError:
            return 0
        found = re.findall(rb"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0


@contextlib.contextmanager
def smtp_sink(base: Path, port: int, env: dict[str, str]) -> Iterator[Sink]:
    """Run ``smtp-sink -c SINK_HOST:port BACKLOG``; stop it by its pid on the way out."""
    command = [postfix_tool("smtp-sink")]
    if os.geteuid() == 0:  # smtp-sink insists on dropping privileges when run as root
        command += ["-u", unprivileged_user()]
    command += ["-c", f"{SINK_HOST}:{port}", str(SINK_BACKLOG)]
    counter_file = base / "smtp-sink.out"
    with open(counter_file, "wb") as out, open(base / "smtp-sink.err", "wb") as err:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        wait_for_smtp(
            SINK_HOST, port, time.monotonic() + START_TIMEOUT, lambda: proc.poll() is None
        )
        yield Sink(port, proc, counter_file)
    except BenchError as exc:
        raise BenchError(f"smtp-sink: {exc}: {log_tail(base / 'smtp-sink.err')}") from None
    finally:
        with shielded():
            stop_child(proc)


def unprivileged_user() -> str:
    """The user smtp-sink drops to when run as root."""
    for name in ("nobody", "postfix"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise BenchError("no unprivileged user (nobody/postfix) for smtp-sink -u")


@dataclasses.dataclass(frozen=True)
class Load:
    """What smtp-source sends: messages, parallel sessions, body size, connection reuse."""

    messages: int
    sessions: int
    size: int
    reuse_connections: bool = False

    def command(self, port: int) -> list[str]:
        command = [
            postfix_tool("smtp-source"),
            "-c",
            "-s",
            str(self.sessions),
            "-m",
            str(self.messages),
            "-l",
            str(self.size),
            "-f",
            SENDER,
            "-t",
            RECIPIENT,
            "-M",
            HELO_NAME,
        ]
        if self.reuse_connections:
            command.append("-d")
        return [*command, f"{LOCALHOST}:{port}"]


@dataclasses.dataclass(frozen=True)
class Progress:
    """What a relay reports at one poll."""

    delivered: int
    drained: bool  # queue empty (per the cheap signal; confirmed separately if needed)


def drive(
    load: Load,
    port: int,
    *,
    base: Path,
    env: dict[str, str],
    poll: Callable[[], Progress],
    confirm: Callable[[int], bool],
    timeout: float,
) -> tuple[int, int, float, float]:
    """Submit the load and wait for delivery: (submitted, delivered, submit_s, end_to_end_s).

    While smtp-source runs, ``poll`` is called only every SUBMIT_POLL_SECONDS (to fail fast on
    errors without loading the relay); after that every POLL_SECONDS. Once it shows every
    submitted message delivered and the queue drained, ``confirm(submitted)`` is asked (it may
    be slower); the end time is that of the poll that showed completion.
    """
    counter_file, err_file = base / "smtp-source.out", base / "smtp-source.err"
    with open(counter_file, "wb") as out, open(err_file, "wb") as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            load.command(port),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        submitted: int | None = None
        submit_seconds = 0.0
        deadline = start + timeout
        progress = Progress(delivered=0, drained=False)
        next_poll = start + SUBMIT_POLL_SECONDS
        while True:
            if submitted is None and proc.poll() is not None:
                submit_seconds = time.monotonic() - start
                counts = re.findall(rb"\d+", counter_file.read_bytes())
                submitted = int(counts[-1]) if counts else 0
                if proc.returncode != 0:
                    raise BenchError(
                        f"smtp-source exited {proc.returncode} after {submitted} messages: "
                        f"{log_tail(err_file)}"
                    )
                if submitted != load.messages:
                    raise BenchError(f"smtp-source submitted {submitted} of {load.messages}")
            now = time.monotonic()
            if submitted is None and now < next_poll:
                time.sleep(POLL_SECONDS)
                continue
            next_poll = now + SUBMIT_POLL_SECONDS
            progress = poll()
            now = time.monotonic()
            done = submitted is not None and progress.delivered >= submitted and progress.drained
            if done and submitted is not None and confirm(submitted):
                return submitted, progress.delivered, submit_seconds, now - start
            if now > deadline:
                raise BenchError(
                    f"timed out after {timeout:.0f}s: submitted "
                    f"{'(still running)' if submitted is None else submitted}, "
                    f"delivered {progress.delivered}"
                )
            time.sleep(POLL_SECONDS)
    finally:
        with shielded():
            stop_child(proc)


def checked_result(
    sink: Sink,
    *,
    submitted: int,
    delivered: int,
    submit_s: float,
    total_s: float,
    rss: int | None,
    problems: list[str],
) -> Result:
    """A relay's figures, with the sink's own count checked against what the relay claims."""
    received = sink.received()
    if received < delivered:
        problems.append(f"smtp-sink counted {received} messages, the relay claims {delivered}")
    return Result(
        submitted=submitted,
        delivered=delivered,
        submit_seconds=submit_s,
        end_to_end_seconds=total_s,
        msgs_per_s=delivered / total_s if total_s > 0 else 0.0,
        peak_rss_kib=rss,
        sink_received=received,
        problems=tuple(problems),
    )
