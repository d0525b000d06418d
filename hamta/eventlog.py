"""The event log: one JSON object a line, through structlog.

Mail events carry the names operators grep for (Reception, Delivery, TransientFailure, Bounce,
Expiration) with the same fields every time, so a message's whole story can be pulled out of the
log by its queue id.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import IO, Any, BinaryIO

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _ends_mid_line(file: Path) -> bool:
    with open(file, "rb") as existing:
        if existing.seek(0, 2) == 0:
            return False
        existing.seek(-1, 2)
        return existing.read(1) != b"\n"


def _add_pid(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Looked up per line, so that the line says which process wrote it even where a process
    # forked after configure() ran.
    event["pid"] = os.getpid()
    return event


def _standard_stream() -> BinaryIO:
    # A process started without file descriptors 1 and 2 (DRBD runs its handlers so, from the
    # kernel) has sys.stdout and sys.stderr set to None: its lines go nowhere rather than
    # crash the command that logs them.
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            return stream.buffer
    return open(os.devnull, "wb")  # lives as long as the process


class LogFileError(Exception):
    """The log file cannot be created or appended to; the message names it and why."""


def log_file_problem(file: Path) -> str | None:
    """Why ``configure`` could not open ``file`` (None: it could), creating nothing.

    For ``hamta config check``: the nearest existing ancestor must be a writable directory.
    """
    if file.is_dir():
        return f"log file {file} is a directory"
    if file.exists():
        return None if os.access(file, os.W_OK) else f"log file {file}: not writable"
    ancestor = file.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"log file {file}: cannot create its directory: {ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"log file {file}: cannot create it: {ancestor} is not writable"
    return None


def _open_log_file(file: Path) -> BinaryIO:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: each event is one write(2) of one whole line, so several processes may
        # append to one file. A kill -9 can still cut a write short (the kernel stops a write
        # at a page boundary for a fatal signal): a process starts on a line of its own, so
        # that only the dead process's last line is damaged, never the next one's first.
        stream = open(file, "ab", buffering=0)  # noqa: SIM115 - lives as long as the process
        if _ends_mid_line(file):
            stream.write(b"\n")
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(file) else ""
        raise LogFileError(f"log file {file}: cannot open it: {exc.strerror}{where}") from None
    return stream


class _IntoEvents(logging.Handler):
    """A library's standard-library log records as event lines (kazoo's reconnection notes)."""

    def emit(self, record: logging.LogRecord) -> None:
        log = get_logger(library=record.name)
        method = log.error if record.levelno >= logging.ERROR else log.warning
        method("LibraryMessage", message=record.getMessage())


def route_library(name: str, level: int = logging.WARNING) -> None:
    """Send library ``name``'s records of ``level`` and above to the event log, not stderr.

    Left alone, Python prints them on standard error, where an operator would see a library's
    retry chatter in place of the one line that says what went wrong.
    """
    library = logging.getLogger(name)
    library.handlers = [_IntoEvents()]
    library.setLevel(level)
    library.propagate = False


def quiet_library(name: str) -> None:
    """Drop library ``name``'s records: a command whose own error line says it all."""
    library = logging.getLogger(name)
    library.handlers = [logging.NullHandler()]
    library.propagate = False


def _dumps(event: Any, **kwargs: Any) -> bytes:
    """orjson's JSON, and a line even for text no UTF-8 can carry.

    A client's bytes reach events as text decoded with surrogate escapes (an invalid UTF-8
    byte in a command); orjson refuses such a string, and an event that cannot be written must
    not turn into an error of the session that logged it (once a 500 after the 250's spool
    write). Those characters are written as backslash escapes instead.
    """
    try:
        return orjson.dumps(event, **kwargs)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return orjson.dumps(_escaped(event), **kwargs)


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    return value


def configure(level: str = "info", file: Path | None = None) -> IO[bytes]:
    """Send JSON lines to ``file`` (appended, a line at a time) or standard output.

    LogFileError when ``file`` cannot be created or opened.
    """
    stream: BinaryIO = _standard_stream() if file is None else _open_log_file(file)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _add_pid,  # tells apart the processes sharing a file (agent, watchdog, workers)
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            # orjson: a third of the cost of the json module, on two events per message.
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.BytesLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    # aiosmtpd and aiohttp log through the standard library; keep their chatter out.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return stream


def get_logger(**bound: Any) -> Any:
    """A structlog logger with ``bound`` fields on every line."""
    if sys.stdout is None and not structlog.is_configured():
        # structlog's default prints to sys.stdout, which such a process does not have.
        configure()
    return structlog.get_logger("hamta").bind(**bound)
