"""A raw-socket SMTP client for tests that must put exact bytes on the wire.

:mod:`smtplib` normalises line ends and dot-stuffs what it sends, which is right for a mail client
and wrong for a test of what a server does with a bare CR, a bare LF or an overlong line. This
client sends bytes as given and reads replies (multi-line ones included) as the server wrote them.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from types import TracebackType
from typing import Self

_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$", re.DOTALL)


class SmtpWireError(Exception):
    """The server closed the connection or sent something that is not an SMTP reply."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: its code and the text of each line (without code and separator)."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The last line as sent, e.g. ``"250 2.0.0 Ok: queued as ABC"``."""
        return f"{self.code} {self.lines[-1]}"

    @property
    def all_lines(self) -> list[str]:
        """Every line as sent, code and separator included, without the CRLF."""
        last = len(self.lines) - 1
        return [
            f"{self.code}{' ' if i == last else '-'}{line}" for i, line in enumerate(self.lines)
        ]


class SmtpWire:
    """A blocking SMTP client on a plain TCP socket that sends bytes unchanged."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        source_address: tuple[str, int] | None = None,
    ) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=source_address
        )
        self._file = self.sock.makefile("rb")
        self.greeting = self.read_reply()

    def read_reply(self) -> Reply:
        """Read one (possibly multi-line) reply."""
        code: bytes | None = None
        lines: list[str] = []
        while True:
            raw = self._file.readline(65536)
            if not raw:
                raise SmtpWireError(f"connection closed after {lines!r}")
            match = _REPLY_LINE.match(raw.rstrip(b"\r\n"))
            if match is None:
                raise SmtpWireError(f"not an SMTP reply line: {raw!r}")
            if code is not None and match.group(1) != code:
                raise SmtpWireError(f"reply code changed within a reply: {raw!r}")
            code = match.group(1)
            lines.append(match.group(3).decode("utf-8", errors="replace"))
            if match.group(2) == b" ":
                return Reply(int(code), tuple(lines))

    def send(self, data: bytes) -> None:
        """Send ``data`` exactly as given."""
        self.sock.sendall(data)

    def command(self, line: str | bytes) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        data = line.encode("utf-8") if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.read_reply()

    def close(self) -> None:
        """Close the connection without QUIT."""
        self._file.close()
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
