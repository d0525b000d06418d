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


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    return value


def _dumps(event: Any, **kwargs: Any) -> bytes:
    """orjson, or for a string holding lone surrogates (bytes that were not UTF-8, as aiosmtpd
    hands them over), the same line with those escaped: a log call must never raise."""
    try:
        return orjson.dumps(event, **kwargs)
    except TypeError:
        return orjson.dumps(_escaped(event), **kwargs)


def configure(level: str = "info", file: Path | None = None) -> IO[bytes]:
    """Send JSON lines to ``file`` (appended, a line at a time) or standard output."""
    stream: IO[bytes]
    if file is None:
        stream = _standard_stream()
    else:
        file.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: each event is one write(2) of one whole line, so several processes may
        # append to one file. A kill -9 can still cut a write short (the kernel stops a write
        # at a page boundary for a fatal signal): a process starts on a line of its own, so
        # that only the dead process's last line is damaged, never the next one's first.
        stream = open(file, "ab", buffering=0)  # noqa: SIM115 - lives as long as the process
        if _ends_mid_line(file):
            stream.write(b"\n")
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
