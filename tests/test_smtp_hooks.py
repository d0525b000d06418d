"""hamta.smtp against aiosmtpd: every hook found as aiosmtpd itself would, its module untouched.

aiosmtpd finds the protocol's ``smtp_*`` and ``auth_*`` methods and the handler's ``handle_*``
hooks through ``dir()``, which hamta's classes answer from a list made once per class
(``hamta.smtp.HooksOnlyDir``): a hook missing from it would be a command answered 500.
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

import aiosmtpd.smtp

from hamta.config import SmtpConfig
from hamta.metrics import RelayMetrics
from hamta.reception import ReceptionHandler
from hamta.smtp import HamtaSMTP
from hamta.spool import Spool


def test_aiosmtpd_module_is_left_as_it_is() -> None:
    assert vars(aiosmtpd.smtp)["inspect"] is inspect
    assert "dir" not in vars(aiosmtpd.smtp)


def test_aiosmtpd_finds_every_hook_of_protocol_and_handler(tmp_path: Path) -> None:
    async def connection() -> tuple[ReceptionHandler, HamtaSMTP]:
        handler = ReceptionHandler(
            SmtpConfig(), "relay.test", Spool(tmp_path), lambda _: None, RelayMetrics(), None
        )
        return handler, HamtaSMTP(handler, line_length_limit=1002, hostname="relay.test")

    handler, protocol = asyncio.run(connection())

    def found(obj: Any, prefix: str) -> set[str]:  # by the full dir(), as aiosmtpd would
        return {n.removeprefix(prefix) for n in object.__dir__(obj) if n.startswith(prefix)}

    assert set(protocol._smtp_methods) == found(protocol, "smtp_")
    assert {"EHLO", "MAIL", "RCPT", "DATA", "STARTTLS"} <= set(protocol._smtp_methods)
    assert set(protocol._handle_hooks) == found(handler, "handle_")
    assert {"MAIL", "RCPT", "DATA"} <= set(protocol._handle_hooks)
    assert set(protocol._auth_methods) == found(protocol, "auth_") | found(handler, "auth_")
