"""The checks, one module per kind, and ``run_check``: one run, with its timeout, as data.

Each check is ``async def run_KIND(check, context, findings) -> detail``: it returns the detail
of a success and raises ``CheckFailedError``, ``CheckWarningError``, ``CheckStandbyError`` or
``CertificateExpiredError`` for the other outcomes; what it found on the way is in
``findings`` either way. ``run_check`` turns that, a timeout, a refused connection or a
check's own bug into one ``Observation``: a check never raises into the engine.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiosmtplib

from monitor.checks.auth_records import run_auth_records
from monitor.checks.dns import run_dns
from monitor.checks.relay import run_relay
from monitor.checks.round_trip import run_round_trip
from monitor.checks.smtp import run_smtp
from monitor.checks.tls import run_tls
from monitor.config import Check
from monitor.observation import (
    CertificateExpiredError,
    CheckContext,
    CheckFailedError,
    CheckStandbyError,
    CheckWarningError,
    Clock,
    Findings,
    Observation,
)
from monitor.verdicts import Outcome

RUNNERS: dict[str, Callable[[Any, CheckContext, Findings], Awaitable[str]]] = {
    "smtp": run_smtp,
    "submission": run_smtp,
    "smtps": run_smtp,
    "tls": run_tls,
    "dns": run_dns,
    "auth_records": run_auth_records,
    "relay": run_relay,
    "round_trip": run_round_trip,
}


def _oneline(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


async def run_check(check: Check, context: CheckContext, clock: Clock) -> Observation:
    """Run ``check`` once within its timeout; never raises (but for cancellation)."""
    found = Findings()
    start = clock.monotonic()
    outcome = Outcome.FAILURE
    try:
        async with asyncio.timeout(check.timeout):
            detail = await RUNNERS[check.kind](check, context, found)
        outcome = Outcome.SUCCESS
    except CheckWarningError as exc:
        outcome, detail = Outcome.WARNING, str(exc)
    except CertificateExpiredError as exc:
        outcome, detail = Outcome.EXPIRED, str(exc)
    except CheckStandbyError as exc:
        outcome, detail = Outcome.STANDBY, str(exc)
    except CheckFailedError as exc:
        detail = str(exc)
    except TimeoutError:
        detail = f"no answer within {check.timeout:g}s"
    except (OSError, ssl.SSLError, aiosmtplib.SMTPException) as exc:
        detail = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a check's own bug must not stop the others: it is reported
        detail = f"check error {type(exc).__name__}: {exc}"
    seconds = clock.monotonic() - start
    return Observation(
        check=check.name,
        kind=check.kind,
        outcome=outcome,
        seconds=round(seconds, 6),
        detail=_oneline(detail),
        at=context.now,
        facts=found.facts,
        answers=found.answers,
        changes=tuple(found.changes),
    )
